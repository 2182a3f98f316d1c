"""The queries the watch engine runs, one small frozen class per Consul endpoint.

Equal specs share one loop, so a spec holds exactly what its request depends on. ``decode``
turns a body into an immutable value that compares cheaply, so the engine can tell a real
change from an index that moved for an unrelated reason.

Specs with one user live beside it: KV keys in ``dcy._kv_specs``, the lock key in
``dcy._leader``, nodes (for templates) in ``dcy._node_specs``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from dcy._consul import ConsulAPI, Index, QueryResult
from dcy._errors import ConsulUnavailable, DcyError
from dcy._query import Instance, ServiceQuery


@dataclass(frozen=True, slots=True)
class HealthServiceSpec:
    """Every instance of a service (all health states; filtering happens locally)."""

    name: str
    tag: str | None = None
    datacenter: str | None = None

    @classmethod
    def of(cls, query: ServiceQuery, *, datacenter: str | None = None) -> HealthServiceSpec:
        """The watch behind a parsed query (``datacenter`` when the query names none).
        States are filtered locally, so ``worker|passing`` and ``worker|any`` share it."""
        return cls(query.name, query.tag, query.datacenter or datacenter)

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


# Datacenters and their coordinates change rarely and neither endpoint blocks: poll this often.
DATACENTER_POLL_INTERVAL = 30.0


@dataclass(frozen=True, slots=True)
class DatacentersByDistanceSpec:
    """Every known datacenter except ``local``, nearest first by WAN coordinates."""

    local: str
    poll_interval: float = DATACENTER_POLL_INTERVAL

    async def fetch(self, api: ConsulAPI, index: Index, wait: float) -> QueryResult:
        if index:
            await asyncio.sleep(self.poll_interval)
        # Loaded here, not at import: only datacenter failover needs it.
        from dcy._coordinates import coordinates_by_datacenter, datacenters_by_distance

        known = await api.catalog_datacenters()
        try:
            coordinates = coordinates_by_datacenter(await api.coordinate_datacenters())
        except ConsulUnavailable:
            raise
        except DcyError:
            # Without coordinates (refused by an ACL), Consul's catalog order is by distance too.
            coordinates = {}
        order = datacenters_by_distance(self.local, known, coordinates)
        # The order is the index: the loop publishes only when it changes, and a non-empty
        # index makes the next fetch wait for poll_interval.
        return QueryResult("datacenters:" + " ".join(order), list(order))

    def decode(self, body: Any) -> tuple[str, ...]:
        return tuple(body or ())

    def __str__(self) -> str:
        return f"datacenters by distance from {self.local}"
