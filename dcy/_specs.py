"""The queries the watch engine runs, one small frozen class per Consul endpoint.

Equal specs share one loop, so a spec holds exactly what its request depends on. ``decode``
turns a body into an immutable value that compares cheaply, so the engine can tell a real
change from an index that moved for an unrelated reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from dcy._consul import ConsulAPI, Index, QueryResult
from dcy._coordinates import coordinates_by_datacenter, datacenters_by_distance
from dcy._errors import ConsulUnavailable, DcyError
from dcy._query import Check, Instance

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
class CatalogNodesSpec:
    """Every node of a datacenter (name, address, datacenter, meta), sorted by name."""

    datacenter: str | None = None

    async def fetch(self, api: ConsulAPI, index: Index, wait: float) -> QueryResult:
        return await api.catalog_nodes(datacenter=self.datacenter, index=index, wait=wait)

    def decode(self, body: Any) -> tuple[NodeInfo, ...]:
        return tuple(sorted((NodeInfo.from_api(n) for n in body or ()), key=lambda n: n.name))

    def __str__(self) -> str:
        return f"catalog nodes{'@' + self.datacenter if self.datacenter else ''}"


@dataclass(frozen=True, slots=True)
class CatalogNodeSpec:
    """One node and the services registered on it; None when the node is unknown."""

    node: str
    datacenter: str | None = None

    async def fetch(self, api: ConsulAPI, index: Index, wait: float) -> QueryResult:
        return await api.catalog_node(self.node, datacenter=self.datacenter, index=index, wait=wait)

    def decode(self, body: Any) -> NodeServices | None:
        if not body or not body.get("Node"):
            return None
        services = tuple(
            sorted(
                (NodeService.from_api(s) for s in (body.get("Services") or {}).values()),
                key=lambda s: s.id,
            )
        )
        return NodeServices(NodeInfo.from_api(body["Node"]), services)

    def __str__(self) -> str:
        return f"catalog node {self.node}{'@' + self.datacenter if self.datacenter else ''}"


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    address: str
    datacenter: str
    meta: Mapping[str, str]
    tagged_addresses: Mapping[str, str]

    @classmethod
    def from_api(cls, raw: Mapping[str, Any]) -> NodeInfo:
        return cls(
            name=raw.get("Node") or "",
            address=raw.get("Address") or "",
            datacenter=raw.get("Datacenter") or "",
            meta=MappingProxyType(dict(raw.get("Meta") or {})),
            tagged_addresses=MappingProxyType(dict(raw.get("TaggedAddresses") or {})),
        )

    def __hash__(self) -> int:
        return hash((self.name, self.datacenter))


@dataclass(frozen=True, slots=True)
class NodeService:
    id: str
    name: str
    address: str
    port: int
    tags: tuple[str, ...]
    meta: Mapping[str, str]

    @classmethod
    def from_api(cls, raw: Mapping[str, Any]) -> NodeService:
        return cls(
            id=raw.get("ID") or "",
            name=raw.get("Service") or "",
            address=raw.get("Address") or "",
            port=int(raw.get("Port") or 0),
            tags=tuple(raw.get("Tags") or ()),
            meta=MappingProxyType(dict(raw.get("Meta") or {})),
        )

    def __hash__(self) -> int:
        return hash(self.id)


@dataclass(frozen=True, slots=True)
class NodeServices:
    node: NodeInfo
    services: tuple[NodeService, ...]


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


@dataclass(frozen=True, slots=True)
class HealthStateSpec:
    """Every check of a datacenter, node and service checks alike, in any state."""

    datacenter: str | None = None

    async def fetch(self, api: ConsulAPI, index: Index, wait: float) -> QueryResult:
        return await api.health_state("any", datacenter=self.datacenter, index=index, wait=wait)

    def decode(self, body: Any) -> tuple[Check, ...]:
        checks = (Check.from_api(raw) for raw in body or ())
        return tuple(sorted(checks, key=lambda c: (c.node, c.check_id)))

    def __str__(self) -> str:
        return f"health state{'@' + self.datacenter if self.datacenter else ''}"


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


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One KV entry. ``raw`` holds the stored bytes, ``value`` the same bytes as UTF-8 text.

    Equality ignores the indexes, so a watch wakes its consumers when the value, flags or
    lock holder change, not when a key is rewritten with what it already held.
    """

    key: str
    raw: bytes
    flags: int = 0
    session: str | None = None  # the session holding the key's lock, if any
    modify_index: int = field(default=0, compare=False)
    create_index: int = field(default=0, compare=False)
    lock_index: int = field(default=0, compare=False)

    @property
    def value(self) -> str:
        """The value as text; UnicodeDecodeError (a ValueError) naming the key when it is
        binary, so a bad write is found where it is read."""
        try:
            return self.raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UnicodeDecodeError(
                exc.encoding,
                exc.object,
                exc.start,
                exc.end,
                f"{exc.reason}; the value of {self.key!r} is not UTF-8 text (read .raw)",
            ) from None

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> KeyValue:
        """From an entry of ``ConsulAPI.kv_get`` (its ``Value`` already bytes)."""
        return cls(
            key=entry["Key"],
            raw=bytes(entry.get("Value") or b""),
            flags=int(entry.get("Flags") or 0),
            session=entry.get("Session") or None,
            modify_index=int(entry.get("ModifyIndex") or 0),
            create_index=int(entry.get("CreateIndex") or 0),
            lock_index=int(entry.get("LockIndex") or 0),
        )


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One KV key; the value is a :class:`KeyValue`, or None while the key does not exist."""

    key: str
    datacenter: str | None = None

    async def fetch(self, api: ConsulAPI, index: Index, wait: float) -> QueryResult:
        return await api.kv_get(self.key, index=index, wait=wait, datacenter=self.datacenter)

    def decode(self, body: Any) -> KeyValue | None:
        return KeyValue.from_entry(body[0]) if body else None

    def __str__(self) -> str:
        return f"key {self.key}{'@' + self.datacenter if self.datacenter else ''}"


@dataclass(frozen=True, slots=True)
class KeyPrefixSpec:
    """Every key under a prefix: key → :class:`KeyValue`, empty while there is none.

    Folder placeholders (empty keys ending in "/", as the Consul UI creates them) are left
    out, like consul-template's ``tree`` does."""

    prefix: str
    datacenter: str | None = None

    async def fetch(self, api: ConsulAPI, index: Index, wait: float) -> QueryResult:
        return await api.kv_get(
            self.prefix, recurse=True, index=index, wait=wait, datacenter=self.datacenter
        )

    def decode(self, body: Any) -> MappingProxyType[str, KeyValue]:
        entries = (KeyValue.from_entry(entry) for entry in body or ())
        return MappingProxyType(
            {e.key: e for e in entries if not (e.key.endswith("/") and not e.raw)}
        )

    def __str__(self) -> str:
        return f"keys {self.prefix}*{'@' + self.datacenter if self.datacenter else ''}"
