"""The catalog's nodes as watch specs: what templates' ``nodes`` and ``node`` read."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from dcy._consul import ConsulAPI, Index, QueryResult


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
