"""consul-template's dependencies (``health.service(web|passing)``, ``kv.list(app/)``, ...) as
dcy watch specs, and the watch values as the JSON the Go helper turns into consul-template's
own structures.

The Go helper names what a template used in consul-template's words (the ``String()`` of its
dependency types); this module is the one place that maps those names onto dcy's watches, so
the watch engine stays the only thing that talks to Consul. Health and node answers travel as
Consul's own JSON (the helper converts them exactly as consul-template's fetch does: address
fallback, aggregated status, sorted tags); KV answers, which dcy already decoded, are sent in
consul-template's KeyPair shape.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from dcy._consul import ConsulAPI, Index, QueryResult
from dcy._kv_specs import KeyPrefixSpec, KeySpec, KeyValue
from dcy._node_specs import CatalogNodeSpec
from dcy._specs import CatalogServicesSpec, HealthServiceSpec
from dcy.template._kvspecs import DatacentersSpec


class UnsupportedDependency(ValueError):
    """A template asks for data dcy-template does not watch; the message says which."""


@dataclass(frozen=True, slots=True)
class RawInstance:
    """One health entry kept as Consul's JSON; ``node`` lets the health change detector
    (dcy._detect) tell which watches a node's change concerns."""

    node: str
    json: str


@dataclass(frozen=True, slots=True)
class GoHealthServiceSpec(HealthServiceSpec):
    """The health query of ``service``, with every field Consul answered (consul-template
    shows NodeID, NodeMeta, tagged addresses, weights...). A subclass, so the engine's change
    detectors cover it past the connection budget like any health query; never equal to the
    plain spec, since its values differ."""

    def decode(self, body: Any) -> tuple[RawInstance, ...]:  # type: ignore[override]
        return tuple(
            RawInstance(str((entry.get("Node") or {}).get("Node") or ""), _dumps(entry))
            for entry in body or ()
        )


@dataclass(frozen=True, slots=True)
class GoCatalogNodeSpec(CatalogNodeSpec):
    """``node``: Consul's JSON of one node and its services ("null" when unknown)."""

    def decode(self, body: Any) -> str:  # type: ignore[override]
        return _dumps(body if body and body.get("Node") else None)


@dataclass(frozen=True, slots=True)
class GoCatalogNodesSpec:
    """``nodes``: Consul's JSON of every node of a datacenter."""

    datacenter: str | None = None

    async def fetch(self, api: ConsulAPI, index: Index, wait: float) -> QueryResult:
        return await api.catalog_nodes(datacenter=self.datacenter, index=index, wait=wait)

    def decode(self, body: Any) -> str:
        return _dumps(body or [])

    def __str__(self) -> str:
        return f"catalog nodes{'@' + self.datacenter if self.datacenter else ''} (raw)"


def _dumps(value: Any) -> str:
    # orjson: each answer of a watched service is encoded here again for the helper, on the
    # way from a change to its file (a tenth of a millisecond less than json at 5 instances).
    return orjson.dumps(value).decode()


@dataclass(frozen=True, slots=True)
class Dependency:
    """One consul-template dependency: its watch, and how a value of it is sent."""

    name: str  # consul-template's String() of it
    spec: Any
    kind: str  # health, services, nodes, node, key, block, list, datacenters
    prefix: str = ""  # kv.list: keys are made relative to it

    @property
    def blocks_while_absent(self) -> bool:
        """``key`` waits for its key to exist (kv.block): nothing is sent while it does not."""
        return self.kind == "block"

    def payload(self, value: Any) -> str | None:
        """The JSON the helper gets for ``value``; None when nothing is to be sent yet."""
        if self.kind == "health":
            return "[" + ",".join(item.json for item in value) + "]"
        if self.kind in ("node", "nodes"):
            return str(value)
        if self.kind == "services":
            return _dumps({name: list(tags) for name, tags in value.items()})
        if self.kind in ("key", "block"):
            if value is None:
                return None if self.kind == "block" else "null"
            return _dumps(_text(value))
        if self.kind == "list":
            return _dumps([self._pair(entry) for entry in value.values()])
        return _dumps(list(value))  # datacenters

    def _pair(self, entry: KeyValue) -> Mapping[str, Any]:
        relative = entry.key[len(self.prefix) :] if entry.key.startswith(self.prefix) else entry.key
        return {
            "Path": entry.key,
            "Key": relative.lstrip("/"),
            "Value": _text(entry),
            "CreateIndex": entry.create_index,
            "ModifyIndex": entry.modify_index,
            "LockIndex": entry.lock_index,
            "Flags": entry.flags,
            "Session": entry.session or "",
        }


def _text(entry: KeyValue) -> str:
    return entry.raw.decode("utf-8", errors="replace")


_CALL = re.compile(r"\A(?P<kind>[a-z]+\.[a-z]+)(?:\((?P<arg>.*)\))?\Z", re.DOTALL)


def dependency(name: str, *, local_node: str | None) -> Dependency:
    """The watch behind one of consul-template's dependency names.
    Raises UnsupportedDependency for what dcy does not watch (Vault, Nomad, ``~near``
    sorting, namespaces, partitions, peers)."""
    match = _CALL.match(name)
    if match is None:
        raise UnsupportedDependency(f"{name}: not a dependency dcy-template knows")
    kind, arg = match["kind"], match["arg"] or ""
    if kind == "health.service":
        target, _, _filters = arg.rpartition("|")
        target = target or arg
        first, datacenter = _datacenter(target, name)
        tag, _, service = first.rpartition(".")
        return Dependency(name, GoHealthServiceSpec(service, tag or None, datacenter), "health")
    if kind == "catalog.services":
        _, datacenter = _datacenter(arg, name)
        return Dependency(name, CatalogServicesSpec(datacenter), "services")
    if kind == "catalog.nodes":
        _, datacenter = _datacenter(arg, name)
        return Dependency(name, GoCatalogNodesSpec(datacenter), "nodes")
    if kind == "catalog.node":
        node, datacenter = _datacenter(arg, name)
        node = node or local_node or ""
        if not node:
            raise UnsupportedDependency(f"{name}: the local node's name is unknown")
        return Dependency(name, GoCatalogNodeSpec(node, datacenter), "node")
    if kind in ("kv.get", "kv.block"):
        key, datacenter = _datacenter(arg, name)
        return Dependency(name, KeySpec(key, datacenter), kind[3:].replace("get", "key"))
    if kind == "kv.list":
        prefix, datacenter = _datacenter(arg, name)
        return Dependency(name, KeyPrefixSpec(prefix, datacenter), "list", prefix=prefix)
    if kind == "catalog.datacenters":
        return Dependency(name, DatacentersSpec(), "datacenters")
    raise UnsupportedDependency(f"{name}: dcy-template does not watch {kind}")


def _datacenter(text: str, name: str) -> tuple[str, str | None]:
    """``thing@dc`` → (thing, dc); namespaces, partitions, peers and ``~near`` are refused."""
    if "~" in text:
        raise UnsupportedDependency(f"{name}: sorting by distance (~near) is not supported")
    head, *options = text.split("@")
    datacenter = None
    for option in options:
        if "=" in option:
            raise UnsupportedDependency(
                f"{name}: {option.split('=')[0]} (namespaces, partitions, peers) is not supported"
            )
        datacenter = option or None
    return head, datacenter
