"""Test doubles for code that uses dcy: an in-memory Consul behind the same seam.

    fake = FakeConsul()
    fake.add_service("worker", port=9002)
    async with Dcy(api=fake) as dcy:
        instance = await dcy.pick("worker")

:class:`FakeConsul` keeps Consul's blocking-query rules (a query with the current index waits
for a change or for ``wait``; indexes only grow), counts every call, and can play an outage
(``fake.unavailable = True``) or an ACL refusal (``fake.deny = True``; of some operations
only: ``fake.deny_methods = {"session_renew"}``, named as the methods). It runs no health
checks: set statuses with :meth:`FakeConsul.set_status` or through TTL updates.

Its KV store and sessions follow Consul 1.14 (check-and-set, acquire/release, lock-delay,
sessions invalidated 2 x TTL after their last renewal); :meth:`FakeConsul.expire_session` and
:meth:`FakeConsul.fail_node` invalidate sessions on demand.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from dcy._answers import (
    CHECK_CRITICAL,
    INVALID_SESSION,
    INVALID_SESSION_TTL,
    MISSING_CHECK,
    SESSION_NOT_FOUND,
    UNKNOWN_CHECK_ID,
    Refusal,
    classify,
)
from dcy._consul import (
    AgentInfo,
    Index,
    QueryResult,
    check_health_state,
    check_session_behavior,
    kv_write_params,
)
from dcy._coordinates import coordinates_by_datacenter, datacenters_by_distance
from dcy._errors import ConsulUnavailable, DcyError

__all__ = ["FakeConsul"]


@dataclass
class _Service:
    definition: dict[str, Any]
    node: str
    datacenter: str
    check_ids: list[str] = field(default_factory=list)


# Consul invalidates a session only after twice its TTL without a renewal
# (https://developer.hashicorp.com/consul/docs/dynamic-app-config/sessions).
SESSION_TTL_MULTIPLIER = 2


@dataclass
class _KvStore:
    """One datacenter's KV: entries as the seam returns them, plus what Consul tracks to
    answer blocking queries and lock-delays."""

    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    tombstones: dict[str, int] = field(default_factory=dict)  # deleted key → index
    lock_delays: dict[str, float] = field(default_factory=dict)  # key → monotonic expiry
    index: int = 0  # the newest change of the whole table

    def changed(self, key: str, recurse: bool) -> int:
        """The index a blocking read of ``key`` (or the prefix) waits to move past."""
        if recurse:
            if not key:
                return self.index
            touched = [e["ModifyIndex"] for k, e in self.entries.items() if k.startswith(key)]
            touched += [i for k, i in self.tombstones.items() if k.startswith(key)]
            return max(touched, default=0)
        entry = self.entries.get(key)
        return entry["ModifyIndex"] if entry else self.tombstones.get(key, 0)


@dataclass
class _Session:
    id: str
    name: str
    node: str
    ttl: float
    lock_delay: float
    behavior: str
    node_checks: tuple[str, ...]
    service_checks: tuple[str, ...]
    create_index: int
    timer: asyncio.TimerHandle | None = None

    def info(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Name": self.name,
            "Node": self.node,
            "LockDelay": int(self.lock_delay * 1e9),
            "Behavior": self.behavior,
            "TTL": f"{self.ttl:g}s" if self.ttl else "",
            "NodeChecks": list(self.node_checks),
            "ServiceChecks": [{"ID": c, "Namespace": ""} for c in self.service_checks] or None,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.create_index,
        }


class FakeConsul:
    """An in-memory stand-in for a Consul agent, implementing ``dcy``'s ConsulAPI."""

    # As an HTTP/1.1 agent: each blocking query holds a connection of the budget.
    streams_per_connection = 1

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
        self.unreachable_datacenters: set[str] = set()  # as when all their servers are down
        self.deny = False
        self.deny_methods: set[str] = set()
        self.calls: Counter[str] = Counter()
        self.blocking_calls: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self._index = 1
        self._services: dict[str, _Service] = {}
        self._checks: dict[str, dict[str, Any]] = {}
        # (datacenter, node, check id) → a node-level check (no ServiceID), like serfHealth
        self._node_checks: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._modified: dict[tuple[str, str], int] = {}  # (dc, service name) → index
        self._catalog_modified: dict[str, int] = {}
        # dc → the checks table's newest write: a check added, changed or removed, and any
        # deregistration (Consul moves it then even for an instance without checks)
        self._checks_modified: dict[str, int] = {}
        # dc → the newest write that changed a check itself: only that wakes a blocking
        # /v1/health/state/any (a deregistration without checks moves the index silently)
        self._check_rows_modified: dict[str, int] = {}
        self._wan: dict[str, list[dict[str, Any]]] = {}  # datacenter → its servers' coordinates
        self._changed: asyncio.Event | None = None
        self.closed = False
        self._kv: dict[str, _KvStore] = {}  # datacenter → its KV
        self._sessions: dict[str, _Session] = {}
        self.node_health = "passing"  # serfHealth of the local node, for sessions
        # Answers of the undecoded reads (health_state_bytes, kv_bytes) indented as a dev
        # agent writes them, or compact as any other agent does.
        self.pretty_json = False
        self.ui_services_endpoint = True  # False: /v1/internal/ui/services answers 404

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
            self._checks[check_id].update(Status=status, Output=output, ModifyIndex=self._index + 1)
        self._touch(service.datacenter, service.definition["Name"])
        self._checks_written(service.datacenter)
        self._invalidate_sessions_of_failed_checks()

    def set_node_check(
        self,
        node: str,
        status: str,
        *,
        check_id: str = "node-check",
        datacenter: str | None = None,
    ) -> None:
        """Register (or update) a node-level check: like Consul, it counts in the health of
        every instance on that node, whose services' indexes move with it."""
        dc = datacenter or self.datacenter
        key = (dc, node, check_id)
        index = self._index + 1
        check = self._node_checks.get(key) or {
            "Node": node,
            "CheckID": check_id,
            "Name": check_id,
            "Notes": "",
            "Output": "",
            "ServiceID": "",
            "ServiceName": "",
            "CreateIndex": index,
        }
        check.update(Status=status, ModifyIndex=index)
        self._node_checks[key] = check
        names = {
            s.definition["Name"]
            for s in self._services.values()
            if s.node == node and s.datacenter == dc
        }
        self._index = index
        for name in names:
            self._modified[(dc, name)] = index
        self._modified[(dc, "")] = index  # the checks table moved even with no service there
        self._checks_written(dc)
        self._wake()

    def remove_service(self, service_id: str) -> None:
        service = self._services.pop(service_id)
        for check_id in service.check_ids:
            self._checks.pop(check_id, None)
        self._touch(service.datacenter, service.definition["Name"], catalog=True)
        self._checks_written(service.datacenter, rows=bool(service.check_ids))
        self._invalidate_sessions_of_failed_checks()

    def forget_everything(self) -> None:
        """What a restarted dev agent does: registrations, keys and sessions are gone."""
        for service_id in list(self._services):
            self.remove_service(service_id)
        self._kv.clear()
        self._sessions.clear()
        self._wake()

    def set_datacenter_reachable(self, datacenter: str, reachable: bool) -> None:
        """Lose or regain every server of ``datacenter``: its health queries fail (blocking
        ones in flight at once) while the rest of the fake keeps answering."""
        if reachable:
            self.unreachable_datacenters.discard(datacenter)
        else:
            self.unreachable_datacenters.add(datacenter)
        self._wake()

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
        # An index no answer has makes a query in flight return when its datacenter is lost.
        await self._block(
            "health_service",
            lambda: -1 if dc in self.unreachable_datacenters else self._modified.get(key, 1),
            index,
            wait,
        )
        if dc in self.unreachable_datacenters:
            raise ConsulUnavailable(f"no path to datacenter {dc}", address="fake")
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
                services.setdefault(s.definition["Name"], set()).update(
                    s.definition.get("Tags") or ()
                )
        body = {name: sorted(tags) for name, tags in sorted(services.items())}
        return QueryResult(self._catalog_modified.get(dc, 1), body)

    async def catalog_nodes(
        self, *, datacenter: str | None = None, index: Index = 0, wait: float | None = None
    ) -> QueryResult:
        dc = datacenter or self.datacenter
        await self._block("catalog_nodes", lambda: self._catalog_modified.get(dc, 1), index, wait)
        return QueryResult(self._catalog_modified.get(dc, 1), self._nodes(dc))

    async def catalog_node(
        self,
        node: str,
        *,
        datacenter: str | None = None,
        index: Index = 0,
        wait: float | None = None,
    ) -> QueryResult:
        dc = datacenter or self.datacenter
        await self._block("catalog_node", lambda: self._catalog_modified.get(dc, 1), index, wait)
        found = [n for n in self._nodes(dc) if n["Node"] == node]
        if not found:
            return QueryResult(self._catalog_modified.get(dc, 1), None)
        services = {
            s.definition["ID"]: self._health_entry(s)["Service"]
            for s in self._services.values()
            if s.datacenter == dc and s.node == node
        }
        return QueryResult(
            self._catalog_modified.get(dc, 1), {"Node": found[0], "Services": services}
        )

    def _nodes(self, dc: str) -> list[dict[str, Any]]:
        names = {self.node_name} if dc == self.datacenter else set()
        names |= {s.node for s in self._services.values() if s.datacenter == dc}
        return [
            {
                "Node": name,
                "Address": self.node_address,
                "Datacenter": dc,
                "Meta": {},
                "TaggedAddresses": {"lan": self.node_address},
            }
            for name in sorted(names)
        ]

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
            raise _refusal(
                UNKNOWN_CHECK_ID, f"PUT /v1/agent/check/update/{check_id}", check_id=check_id
            )
        check.update(Status=status, Output=output, ModifyIndex=self._index + 1)
        self._touch(self.datacenter, check["ServiceName"])
        self._checks_written(self.datacenter)
        self._invalidate_sessions_of_failed_checks()

    # -- KV and sessions ---------------------------------------------------------------------
    async def kv_get(
        self,
        key: str,
        *,
        recurse: bool = False,
        index: Index = 0,
        wait: float | None = None,
        datacenter: str | None = None,
    ) -> QueryResult:
        store = self._kv_store(datacenter or self.datacenter)
        await self._block("kv_get", lambda: store.changed(key, recurse), index, wait)
        if recurse:
            found = [e for k, e in sorted(store.entries.items()) if k.startswith(key)]
        else:
            found = [store.entries[key]] if key in store.entries else []
        # Consul's index: a key's ModifyIndex, or the newest change under a prefix; when
        # there is nothing to report, the index of the whole KV table.
        changed = store.changed(key, recurse)
        answer_index = changed if changed and (found or recurse) else store.index
        return QueryResult(max(answer_index, 1), [dict(e) for e in found] or None)

    async def kv_bytes(
        self,
        prefix: str,
        *,
        index: Index = 0,
        wait: float | None = None,
        datacenter: str | None = None,
    ) -> QueryResult:
        # The same request as kv_get with recurse, undecoded: counted (and refused) as it is.
        result = await self.kv_get(
            prefix, recurse=True, index=index, wait=wait, datacenter=datacenter
        )
        if result.body is None:
            return result
        entries = [
            {
                "LockIndex": e["LockIndex"],
                "Key": e["Key"],
                "Flags": e["Flags"],
                "Value": base64.b64encode(e["Value"]).decode() if e["Value"] else None,
                "Session": e["Session"] or None,
                "CreateIndex": e["CreateIndex"],
                "ModifyIndex": e["ModifyIndex"],
            }
            for e in result.body
        ]
        return QueryResult(result.index, self._encode(entries))

    async def kv_put(
        self,
        key: str,
        value: bytes,
        *,
        cas: int | None = None,
        acquire: str | None = None,
        release: str | None = None,
        flags: int | None = None,
    ) -> bool:
        self._enter("kv_put")
        kv_write_params(cas=cas, acquire=acquire, release=release)
        store = self._kv_store(self.datacenter)
        old = store.entries.get(key)
        entry = {
            "Key": key,
            "Value": bytes(value),
            "Flags": flags or 0,
            "Session": old["Session"] if old else None,
            "CreateIndex": old["CreateIndex"] if old else self._index + 1,
            # Consul 1.14 resets LockIndex on a plain write, keeping the lock holder.
            "LockIndex": 0,
        }
        if cas is not None and (old["ModifyIndex"] if old else 0) != cas:
            return False
        if acquire is not None:
            if acquire not in self._sessions:
                raise _refusal(INVALID_SESSION, f"PUT /v1/kv/{key}", session_id=acquire)
            if store.lock_delays.get(key, 0.0) > time.monotonic():
                return False
            if old is not None and old["Session"] not in (None, acquire):
                return False
            entry["Session"] = acquire
            if old is None:
                entry["LockIndex"] = 1
            else:  # a new holder counts as one more acquisition; the holder itself does not
                entry["LockIndex"] = old["LockIndex"] + (old["Session"] != acquire)
        if release is not None:
            if old is None or old["Session"] != release:
                return False
            entry["Session"] = None
            entry["LockIndex"] = old["LockIndex"]
        self._index += 1
        entry["ModifyIndex"] = self._index
        store.entries[key] = entry
        store.index = self._index
        self._wake()
        return True

    async def kv_delete(self, key: str, *, recurse: bool = False, cas: int | None = None) -> bool:
        self._enter("kv_delete")
        kv_write_params(cas=cas, recurse=recurse)
        store = self._kv_store(self.datacenter)
        if recurse:
            doomed = [k for k in store.entries if k.startswith(key)]
        else:
            doomed = [key] if key in store.entries else []
        if cas is not None and doomed and store.entries[key]["ModifyIndex"] != cas:
            return False
        if doomed:
            self._index += 1
            for k in doomed:
                del store.entries[k]
                store.tombstones[k] = self._index
            store.index = self._index
            self._wake()
        return True

    async def session_create(
        self,
        *,
        name: str,
        ttl: float,
        lock_delay: float,
        behavior: str = "release",
        node_checks: tuple[str, ...] = ("serfHealth",),
        service_checks: tuple[str, ...] = (),
    ) -> str:
        self._enter("session_create")
        check_session_behavior(behavior)
        operation = "PUT /v1/session/create"
        if ttl != 0 and not 10 <= ttl <= 86400:
            raise _refusal(INVALID_SESSION_TTL, operation, nanoseconds=f"{ttl * 1e9:.0f}")
        for check_id in node_checks:
            if check_id != "serfHealth":
                raise _refusal(MISSING_CHECK, operation, check_id=check_id)
            if self.node_health != "passing":
                raise _refusal(CHECK_CRITICAL, operation, check_id=check_id)
        for check_id in service_checks:
            check = self._checks.get(check_id)
            if check is None:
                raise _refusal(MISSING_CHECK, operation, check_id=check_id)
            if check["Status"] == "critical":
                raise _refusal(CHECK_CRITICAL, operation, check_id=check_id)
        self._index += 1
        session = _Session(
            id=str(uuid.uuid4()),
            name=name,
            node=self.node_name,
            ttl=ttl,
            lock_delay=min(lock_delay, 60.0),  # Consul caps lock-delay at 60s
            behavior=behavior,
            node_checks=tuple(node_checks),
            service_checks=tuple(service_checks),
            create_index=self._index,
        )
        self._sessions[session.id] = session
        self._arm_session_timer(session)
        return session.id

    async def session_renew(self, session_id: str) -> None:
        self._enter("session_renew")
        session = self._sessions.get(session_id)
        if session is None:
            raise _refusal(
                SESSION_NOT_FOUND, f"PUT /v1/session/renew/{session_id}", session_id=session_id
            )
        self._arm_session_timer(session)

    async def session_destroy(self, session_id: str) -> None:
        self._enter("session_destroy")
        self.expire_session(session_id)

    async def session_info(self, session_id: str) -> dict[str, Any] | None:
        self._enter("session_info")
        session = self._sessions.get(session_id)
        return None if session is None else session.info()

    # -- KV and sessions: driving the fake from a test ---------------------------------------
    def expire_session(self, session_id: str) -> None:
        """Invalidate a session now, as its TTL running out or a failed node check would:
        its locks are released (or deleted, for behavior "delete") and get its lock-delay."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return
        if session.timer is not None:
            session.timer.cancel()
        store = self._kv_store(self.datacenter)
        held = [k for k, e in store.entries.items() if e["Session"] == session_id]
        if not held:
            return
        self._index += 1
        for key in held:
            if session.lock_delay > 0:
                store.lock_delays[key] = time.monotonic() + session.lock_delay
            if session.behavior == "delete":
                del store.entries[key]
                store.tombstones[key] = self._index
            else:
                store.entries[key] = {
                    **store.entries[key],
                    "Session": None,
                    "ModifyIndex": self._index,
                }
        store.index = self._index
        self._wake()

    def fail_node(self) -> None:
        """serfHealth of this node goes critical: every session that lists it is invalidated,
        and new ones are refused until :meth:`heal_node`."""
        self.node_health = "critical"
        for session in list(self._sessions.values()):
            if "serfHealth" in session.node_checks:
                self.expire_session(session.id)

    def _invalidate_sessions_of_failed_checks(self) -> None:
        """Consul ends a session once one of its service checks is critical or gone (a
        warning keeps it)."""
        for session in list(self._sessions.values()):
            checks = (self._checks.get(c) for c in session.service_checks)
            if any(check is None or check["Status"] == "critical" for check in checks):
                self.expire_session(session.id)

    def heal_node(self) -> None:
        self.node_health = "passing"

    @property
    def sessions(self) -> dict[str, dict[str, Any]]:
        """Every live session: ID → what ``session_info`` answers."""
        return {sid: session.info() for sid, session in self._sessions.items()}

    def _arm_session_timer(self, session: _Session) -> None:
        if session.timer is not None:
            session.timer.cancel()
        if session.ttl:
            session.timer = asyncio.get_running_loop().call_later(
                session.ttl * SESSION_TTL_MULTIPLIER, self.expire_session, session.id
            )

    def _kv_store(self, datacenter: str) -> _KvStore:
        return self._kv.setdefault(datacenter, _KvStore())

    # -- health states and datacenters ------------------------------------------------------
    def add_datacenter(
        self,
        name: str,
        *,
        vec: Iterable[float] = (0.0,) * 8,
        height: float = 1e-05,
        adjustment: float = 0.0,
        node: str | None = None,
    ) -> None:
        """Make a WAN-joined datacenter known, with one server at this network coordinate
        (seconds, as Consul reports them); calling it again adds another server."""
        coordinate = {"Vec": list(vec), "Error": 1.5, "Adjustment": adjustment, "Height": height}
        servers = self._wan.setdefault(name, [])
        servers.append({"Node": node or f"server-{len(servers)}.{name}", "Coord": coordinate})

    async def health_state(
        self,
        state: str = "any",
        *,
        datacenter: str | None = None,
        index: Index = 0,
        wait: float | None = None,
    ) -> QueryResult:
        check_health_state(state)
        dc = datacenter or self.datacenter

        await self._block("health_state", self._checks_block(dc, index), index, wait)
        return QueryResult(self._checks_index(dc), self._checks_in(dc, state))

    async def health_state_bytes(
        self, *, datacenter: str | None = None, index: Index = 0, wait: float | None = None
    ) -> QueryResult:
        dc = datacenter or self.datacenter
        # The same request as health_state, undecoded: counted (and refused) as it is.
        await self._block("health_state", self._checks_block(dc, index), index, wait)
        return QueryResult(self._checks_index(dc), self._encode(self._checks_in(dc, "any")))

    async def health_state_index(self, *, datacenter: str | None = None) -> Index:
        self._enter("health_state_index")
        return self._checks_index(datacenter or self.datacenter)

    async def ui_services(self, *, datacenter: str | None = None) -> QueryResult:
        self._enter("ui_services")
        dc = datacenter or self.datacenter
        index = max(self._checks_index(dc), self._catalog_modified.get(dc, 1))
        if not self.ui_services_endpoint:
            return QueryResult(index, None)
        summaries: dict[str, dict[str, Any]] = {}
        for service in self._services.values():
            if service.datacenter != dc:
                continue
            name = service.definition["Name"]
            summary = summaries.setdefault(
                name,
                {
                    "Name": name,
                    "Datacenter": dc,
                    "Tags": set(),
                    "Nodes": set(),
                    "InstanceCount": 0,
                    "ChecksPassing": 0,
                    "ChecksWarning": 0,
                    "ChecksCritical": 0,
                },
            )
            summary["Tags"].update(service.definition.get("Tags") or ())
            summary["Nodes"].add(service.node)
            summary["InstanceCount"] += 1
            for check in self._health_entry(service)["Checks"]:
                summary[f"Checks{str(check['Status']).capitalize()}"] += 1
        body = [
            {**summary, "Tags": sorted(summary["Tags"]) or None, "Nodes": sorted(summary["Nodes"])}
            for _, summary in sorted(summaries.items())
        ]
        return QueryResult(index, body)

    def _checks_index(self, dc: str) -> int:
        return self._checks_modified.get(dc, 1)

    def _checks_written(self, dc: str, *, rows: bool = True) -> None:
        self._checks_modified[dc] = self._index
        if rows:
            self._check_rows_modified[dc] = self._index

    def _checks_block(self, dc: str, index: Index) -> Callable[[], int]:
        """What a blocking read of the checks waits on: a check written after ``index``."""

        def current() -> int:
            if isinstance(index, int) and self._check_rows_modified.get(dc, 1) <= index:
                return index  # nothing to wake for, even if the index moved
            return self._checks_index(dc)

        return current

    def _checks_in(self, dc: str, state: str) -> list[dict[str, Any]]:
        checks = [
            dict(self._checks[c])
            for s in self._services.values()
            if s.datacenter == dc
            for c in s.check_ids
            if state == "any" or self._checks[c]["Status"] == state
        ]
        checks += [
            dict(c)
            for (d, _, _), c in self._node_checks.items()
            if d == dc and (state == "any" or c["Status"] == state)
        ]
        checks.sort(key=lambda c: (c["Node"], c["CheckID"]))
        return checks

    def _encode(self, body: Any) -> bytes:
        """An answer's bytes as the agent writes them: compact, or indented by four spaces
        as a dev agent (or ``?pretty``) does."""
        if self.pretty_json:
            return (json.dumps(body, indent=4) + "\n").encode()
        return orjson.dumps(body)

    async def catalog_datacenters(self) -> list[str]:
        self._enter("catalog_datacenters")
        known = {self.datacenter, *self._wan, *(s.datacenter for s in self._services.values())}
        coordinates = coordinates_by_datacenter(self._coordinates(sorted(known)))
        rest = datacenters_by_distance(self.datacenter, sorted(known), coordinates)
        return [self.datacenter, *rest]

    async def coordinate_datacenters(self) -> list[dict[str, Any]]:
        self._enter("coordinate_datacenters")
        known = {self.datacenter, *self._wan, *(s.datacenter for s in self._services.values())}
        return self._coordinates(sorted(known))

    def _coordinates(self, datacenters: list[str]) -> list[dict[str, Any]]:
        origin = {"Vec": [0.0] * 8, "Error": 1.5, "Adjustment": 0.0, "Height": 1e-05}
        return [
            {
                "Datacenter": dc,
                "AreaID": "wan",
                "Coordinates": [dict(c) for c in self._wan.get(dc, ())]
                or [{"Node": f"{self.node_name}.{dc}", "Coord": dict(origin)}],
            }
            for dc in datacenters
        ]

    async def aclose(self) -> None:
        self.closed = True

    # -- internals -------------------------------------------------------------------------
    def _enter(self, method: str) -> None:
        self.calls[method] += 1
        if self.unavailable:
            raise ConsulUnavailable("fake Consul is unavailable", address="fake")
        if self.deny or method in self.deny_methods:
            raise classify(403, "Permission denied", operation=method, address="fake")

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
                    # asyncio.timeout, not wait_for: Python 3.11's wait_for can lose a
                    # cancellation that arrives as the event is set, leaving a stopped
                    # watch blocked here for good.
                    async with asyncio.timeout(remaining):
                        await event.wait()
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
        # A check ID registered again keeps its status unless the definition sets one (the
        # agent does so even when the check's type changes, until the new check first runs).
        previous = {c: self._checks.pop(c) for c in (old.check_ids if old else ())}
        kept = {c: check["Status"] for c, check in previous.items()}
        service = _Service(definition, node, dc)
        raw_checks = _raw_checks(definition)
        checks_written = False
        for number, raw in enumerate(raw_checks, start=1):
            suffix = f":{number}" if len(raw_checks) > 1 else ""
            check_id = raw.get("CheckID") or raw.get("ID") or f"service:{service_id}{suffix}"
            self._checks[check_id] = {
                "Node": node,
                "CheckID": check_id,
                "Name": raw.get("Name") or f"Service '{definition['Name']}' check",
                "Status": raw.get("Status") or kept.get(check_id) or "critical",
                "Notes": raw.get("Notes") or "",
                "Output": "",
                "ServiceID": service_id,
                "ServiceName": definition["Name"],
                # Written in the same Raft index as the registration, as Consul does.
                "CreateIndex": self._index + 1,
                "ModifyIndex": self._index + 1,
            }
            before = previous.get(check_id)
            if before is not None and all(
                before[f] == self._checks[check_id][f] for f in ("Status", "Name", "Notes")
            ):
                # Consul writes a check again only when it changed.
                for field_name in ("CreateIndex", "ModifyIndex"):
                    self._checks[check_id][field_name] = before[field_name]
            else:
                checks_written = True
            service.check_ids.append(check_id)
        self._services[service_id] = service
        self._touch(dc, definition["Name"], catalog=True)
        if checks_written or previous.keys() - set(service.check_ids):
            self._checks_written(dc)
        self._invalidate_sessions_of_failed_checks()

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
            "Checks": [
                *(
                    dict(c)
                    for (d, n, _), c in self._node_checks.items()
                    if d == service.datacenter and n == service.node
                ),
                *(dict(self._checks[c]) for c in service.check_ids),
            ],
        }

    def _service_hash(self, service_id: str) -> str:
        service = self._services.get(service_id)
        if service is None:
            return ""
        digest = hashlib.sha256(json.dumps(service.definition, sort_keys=True).encode())
        return digest.hexdigest()[:16]


def _raw_checks(definition: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    checks = list(definition.get("Checks") or ())
    if definition.get("Check"):
        checks.append(definition["Check"])
    return checks


def _refusal(refusal: Refusal, operation: str, **fields: str) -> DcyError:
    """The error the real seam raises when Consul answers with this refusal: the fake words
    it as Consul does and classifies it through the same table."""
    return classify(refusal.status, refusal.answer(**fields), operation=operation, address="fake")
