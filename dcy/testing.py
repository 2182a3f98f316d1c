"""Test doubles for code that uses dcy: an in-memory Consul behind the same seam.

    fake = FakeConsul()
    fake.add_service("worker", port=9002)
    async with Dcy(api=fake) as dcy:
        instance = await dcy.pick("worker")

:class:`FakeConsul` keeps Consul's blocking-query rules (a query with the current index waits
for a change or for ``wait``; indexes only grow), counts every call, and can play an outage
(``fake.unavailable = True``) or an ACL refusal (``fake.deny = True``). It runs no health
checks: set statuses with :meth:`FakeConsul.set_status` or through TTL updates.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dcy._consul import AgentInfo, Index, QueryResult
from dcy._errors import AclDenied, ConsulUnavailable

__all__ = ["FakeConsul"]


@dataclass
class _Service:
    definition: dict[str, Any]
    node: str
    datacenter: str
    check_ids: list[str] = field(default_factory=list)


class FakeConsul:
    """An in-memory stand-in for a Consul agent, implementing ``dcy``'s ConsulAPI."""

    def __init__(
        self,
        *,
        datacenter: str = "dc1",
        node_name: str = "fake-node",
        node_address: str = "127.0.0.1",
        domain: str = "sd",
    ) -> None:
        self.datacenter = datacenter
        self.node_name = node_name
        self.node_address = node_address
        self.domain = domain
        self.unavailable = False
        self.deny = False
        self.calls: Counter[str] = Counter()
        self.blocking_calls: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self._index = 1
        self._services: dict[str, _Service] = {}
        self._checks: dict[str, dict[str, Any]] = {}
        self._modified: dict[tuple[str, str], int] = {}  # (dc, service name) → index
        self._catalog_modified: dict[str, int] = {}
        self._changed: asyncio.Event | None = None
        self.closed = False

    # -- driving the fake from a test ------------------------------------------------------
    def add_service(
        self,
        name: str,
        *,
        port: int = 8080,
        address: str = "",
        tags: Iterable[str] = (),
        meta: Mapping[str, str] | None = None,
        status: str = "passing",
        node: str | None = None,
        datacenter: str | None = None,
        service_id: str | None = None,
    ) -> str:
        """Register an instance with one check in ``status``; return its service id."""
        service_id = service_id or f"{name}-{port}-{len(self._services)}"
        definition = {
            "ID": service_id,
            "Name": name,
            "Address": address,
            "Port": port,
            "Tags": list(tags),
            "Meta": dict(meta or {}),
            "Check": {
                "CheckID": f"service:{service_id}",
                "Name": f"{name} check",
                "TTL": "10s",
                "Status": status,
            },
        }
        self._store(definition, node or self.node_name, datacenter or self.datacenter)
        return service_id

    def set_status(self, service_id: str, status: str, output: str = "") -> None:
        """Set every check of an instance to ``status`` (passing, warning, critical)."""
        service = self._services[service_id]
        for check_id in service.check_ids:
            self._checks[check_id].update(Status=status, Output=output)
        self._touch(service.datacenter, service.definition["Name"])

    def remove_service(self, service_id: str) -> None:
        service = self._services.pop(service_id)
        for check_id in service.check_ids:
            self._checks.pop(check_id, None)
        self._touch(service.datacenter, service.definition["Name"], catalog=True)

    def forget_everything(self) -> None:
        """What a restarted dev agent does: every registration is gone."""
        for service_id in list(self._services):
            self.remove_service(service_id)

    def set_unavailable(self, unavailable: bool = True) -> None:
        """Start or end an outage; blocking queries in flight fail at once, like a dropped
        connection."""
        self.unavailable = unavailable
        self._wake()

    # -- ConsulAPI -------------------------------------------------------------------------
    async def agent_info(self) -> AgentInfo:
        self._enter("agent_info")
        return AgentInfo(
            datacenter=self.datacenter,
            node_name=self.node_name,
            domain=self.domain,
            dns_port=8600,
            dns_address="127.0.0.1",
            version="fake",
            node_address=self.node_address,
        )

    async def health_service(
        self,
        name: str,
        *,
        tag: str | None = None,
        datacenter: str | None = None,
        index: Index = 0,
        wait: float | None = None,
    ) -> QueryResult:
        dc = datacenter or self.datacenter
        key = (dc, name)
        await self._block("health_service", lambda: self._modified.get(key, 1), index, wait)
        entries = [
            self._health_entry(s)
            for s in self._services.values()
            if s.datacenter == dc
            and s.definition["Name"] == name
            and (tag is None or tag in s.definition["Tags"])
        ]
        return QueryResult(self._modified.get(key, 1), entries)

    async def catalog_services(
        self, *, datacenter: str | None = None, index: Index = 0, wait: float | None = None
    ) -> QueryResult:
        dc = datacenter or self.datacenter
        await self._block(
            "catalog_services", lambda: self._catalog_modified.get(dc, 1), index, wait
        )
        services: dict[str, set[str]] = {}
        for s in self._services.values():
            if s.datacenter == dc:
                services.setdefault(s.definition["Name"], set()).update(s.definition["Tags"])
        body = {name: sorted(tags) for name, tags in sorted(services.items())}
        return QueryResult(self._catalog_modified.get(dc, 1), body)

    async def agent_service(
        self, service_id: str, *, index: Index = "", wait: float | None = None
    ) -> QueryResult:
        await self._block("agent_service", lambda: self._service_hash(service_id), index, wait)
        service = self._services.get(service_id)
        if service is None or service.node != self.node_name:
            return QueryResult("", None)
        return QueryResult(self._service_hash(service_id), dict(service.definition))

    async def register_service(self, definition: Mapping[str, Any]) -> None:
        self._enter("register_service")
        self._store(dict(definition), self.node_name, self.datacenter)

    async def deregister_service(self, service_id: str) -> None:
        self._enter("deregister_service")
        if service_id in self._services:
            self.remove_service(service_id)

    async def update_ttl(self, check_id: str, status: str, output: str = "") -> None:
        self._enter("update_ttl")
        check = self._checks.get(check_id)
        if check is None:
            from dcy._errors import ConsulError

            raise ConsulError(f'Unknown check ID "{check_id}"', status=404)
        check.update(Status=status, Output=output)
        self._touch(self.datacenter, check["ServiceName"])

    async def aclose(self) -> None:
        self.closed = True

    # -- internals -------------------------------------------------------------------------
    def _enter(self, method: str) -> None:
        self.calls[method] += 1
        if self.unavailable:
            raise ConsulUnavailable("fake Consul is unavailable", address="fake")
        if self.deny:
            raise AclDenied(f"Permission denied: {method}", status=403)

    async def _block(self, method: str, current: Any, index: Index, wait: float | None) -> None:
        self._enter(method)
        if not index or wait is None:
            return
        self.blocking_calls[method] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            deadline = time.monotonic() + wait
            while current() == index or (isinstance(index, int) and current() < index):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                event = self._event()
                try:
                    await asyncio.wait_for(event.wait(), remaining)
                except TimeoutError:
                    return
                if self.unavailable:
                    raise ConsulUnavailable("fake Consul went away", address="fake")
        finally:
            self.in_flight -= 1

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _touch(self, dc: str, name: str, *, catalog: bool = False) -> None:
        self._index += 1
        self._modified[(dc, name)] = self._index
        if catalog:
            self._catalog_modified[dc] = self._index
        self._wake()

    def _store(self, definition: dict[str, Any], node: str, dc: str) -> None:
        service_id = definition.get("ID") or definition["Name"]
        definition["ID"] = service_id
        old = self._services.pop(service_id, None)
        for check_id in old.check_ids if old else ():
            self._checks.pop(check_id, None)
        service = _Service(definition, node, dc)
        raw_checks = list(definition.get("Checks") or ())
        if definition.get("Check"):
            raw_checks.append(definition["Check"])
        for number, raw in enumerate(raw_checks, start=1):
            suffix = f":{number}" if len(raw_checks) > 1 else ""
            check_id = raw.get("CheckID") or raw.get("ID") or f"service:{service_id}{suffix}"
            self._checks[check_id] = {
                "Node": node,
                "CheckID": check_id,
                "Name": raw.get("Name") or f"Service '{definition['Name']}' check",
                "Status": raw.get("Status") or "critical",
                "Notes": raw.get("Notes") or "",
                "Output": "",
                "ServiceID": service_id,
                "ServiceName": definition["Name"],
            }
            service.check_ids.append(check_id)
        self._services[service_id] = service
        self._touch(dc, definition["Name"], catalog=True)

    def _health_entry(self, service: _Service) -> dict[str, Any]:
        d = service.definition
        return {
            "Node": {
                "Node": service.node,
                "Address": self.node_address,
                "Datacenter": service.datacenter,
            },
            "Service": {
                "ID": d["ID"],
                "Service": d["Name"],
                "Address": d.get("Address") or "",
                "Port": d.get("Port") or 0,
                "Tags": list(d.get("Tags") or ()),
                "Meta": dict(d.get("Meta") or {}),
            },
            "Checks": [dict(self._checks[c]) for c in service.check_ids],
        }

    def _service_hash(self, service_id: str) -> str:
        service = self._services.get(service_id)
        if service is None:
            return ""
        digest = hashlib.sha256(json.dumps(service.definition, sort_keys=True).encode())
        return digest.hexdigest()[:16]
