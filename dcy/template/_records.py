"""What templates see: records with consul-template's field names (``.Address``, ``.Port``,
``.Tags``, ``.ID``, ``.Node``, ``.ServiceMeta``, ...), so its users feel at home."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dcy._node_specs import NodeInfo, NodeService
from dcy._query import Check, Instance


@dataclass(frozen=True, slots=True)
class HealthCheck:
    Node: str
    CheckID: str
    Name: str
    Status: str
    Notes: str
    Output: str
    ServiceID: str
    ServiceName: str

    @classmethod
    def of(cls, check: Check) -> HealthCheck:
        return cls(
            check.node,
            check.check_id,
            check.name,
            check.status,
            check.notes,
            check.output,
            check.service_id,
            check.service_name,
        )


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    """One instance, as ``service "name"`` returns it."""

    ID: str
    Name: str
    Address: str
    Port: int
    Tags: tuple[str, ...]
    ServiceMeta: Mapping[str, str]
    Node: str
    NodeAddress: str
    NodeDatacenter: str
    Status: str
    Checks: tuple[HealthCheck, ...]

    @classmethod
    def of(cls, instance: Instance) -> ServiceEntry:
        return cls(
            instance.id,
            instance.name,
            instance.address,
            instance.port,
            instance.tags,
            instance.meta,
            instance.node,
            instance.node_address,
            instance.datacenter,
            instance.status,
            tuple(HealthCheck.of(c) for c in instance.checks),
        )


@dataclass(frozen=True, slots=True)
class CatalogService:
    """One service name, as ``services`` returns it."""

    Name: str
    Tags: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CatalogNode:
    Node: str
    Address: str
    Datacenter: str
    Meta: Mapping[str, str]
    TaggedAddresses: Mapping[str, str]

    @classmethod
    def of(cls, node: NodeInfo) -> CatalogNode:
        return cls(node.name, node.address, node.datacenter, node.meta, node.tagged_addresses)


@dataclass(frozen=True, slots=True)
class NodeServiceEntry:
    ID: str
    Service: str
    Address: str
    Port: int
    Tags: tuple[str, ...]
    Meta: Mapping[str, str]

    @classmethod
    def of(cls, service: NodeService) -> NodeServiceEntry:
        return cls(
            service.id, service.name, service.address, service.port, service.tags, service.meta
        )


@dataclass(frozen=True, slots=True)
class NodeDetail:
    """``node "name"``: the node and its services."""

    Node: CatalogNode
    Services: tuple[NodeServiceEntry, ...]


@dataclass(frozen=True, slots=True)
class KeyPair:
    """One KV entry as ``ls`` and ``tree`` return it; ``Key`` is relative to the prefix."""

    Key: str
    Path: str
    Value: str
    Flags: int = 0
    Session: str = ""

    def __str__(self) -> str:
        return self.Value


# The plain data fields of the records above: what the sandbox may read without its checks.
RECORD_FIELDS: Mapping[type, frozenset[str]] = {
    cls: frozenset(cls.__dataclass_fields__)
    for cls in (
        HealthCheck,
        ServiceEntry,
        CatalogService,
        CatalogNode,
        NodeServiceEntry,
        NodeDetail,
        KeyPair,
    )
}


def as_plain(value: Any) -> Any:
    """Records and read-only mappings as plain JSON-able data, for ``toJSON``."""
    if hasattr(value, "__dataclass_fields__"):
        return {name: as_plain(getattr(value, name)) for name in value.__dataclass_fields__}
    if isinstance(value, Mapping):
        return {str(k): as_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_plain(v) for v in value]
    return value
