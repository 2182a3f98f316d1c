"""The queries the watch engine runs, one small frozen class per Consul endpoint.

Equal specs share one loop, so a spec holds exactly what its request depends on. ``decode``
turns a body into an immutable value that compares cheaply, so the engine can tell a real
change from an index that moved for an unrelated reason.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from dcy._consul import ConsulAPI, Index, QueryResult
from dcy._query import Instance

# Consul answers a hash-blocking query for an unknown agent service at once with a 404, so an
# absent service cannot be waited on: poll it at this pace until it exists again.
ABSENT_POLL_INTERVAL = 1.0
_ABSENT = "absent"


@dataclass(frozen=True, slots=True)
class HealthServiceSpec:
    """Every instance of a service (all health states; filtering happens locally)."""

    name: str
    tag: str | None = None
    datacenter: str | None = None

    async def fetch(self, api: ConsulAPI, index: Index, wait: float) -> QueryResult:
        return await api.health_service(
            self.name, tag=self.tag, datacenter=self.datacenter, index=index, wait=wait
        )

    def decode(self, body: Any) -> tuple[Instance, ...]:
        instances = (Instance.from_health_entry(entry) for entry in body or ())
        return tuple(sorted(instances, key=lambda i: (i.node, i.id)))

    def __str__(self) -> str:
        tag = f"{self.tag}." if self.tag else ""
        dc = f"@{self.datacenter}" if self.datacenter else ""
        return f"health {tag}{self.name}{dc}"


@dataclass(frozen=True, slots=True)
class CatalogServicesSpec:
    """The names of every service in a datacenter, each with the union of its tags."""

    datacenter: str | None = None

    async def fetch(self, api: ConsulAPI, index: Index, wait: float) -> QueryResult:
        return await api.catalog_services(datacenter=self.datacenter, index=index, wait=wait)

    def decode(self, body: Any) -> MappingProxyType[str, tuple[str, ...]]:
        return MappingProxyType({name: tuple(tags or ()) for name, tags in (body or {}).items()})

    def __str__(self) -> str:
        return f"catalog services{'@' + self.datacenter if self.datacenter else ''}"


@dataclass(frozen=True, slots=True)
class AgentServiceSpec:
    """One service registered with the local agent; the value is None when the agent does
    not know it (never registered, deregistered, or forgotten by a restarted agent)."""

    service_id: str

    async def fetch(self, api: ConsulAPI, index: Index, wait: float) -> QueryResult:
        if index == _ABSENT:
            await asyncio.sleep(ABSENT_POLL_INTERVAL)
            index = ""
        result = await api.agent_service(self.service_id, index=index, wait=wait)
        return result if result.body is not None else QueryResult(_ABSENT, None)

    def decode(self, body: Any) -> str | None:
        # Presence is all the keeper of a registration needs; the ID says it.
        return None if body is None else str(body.get("ID") or self.service_id)

    def __str__(self) -> str:
        return f"agent service {self.service_id}"
