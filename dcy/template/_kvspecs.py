"""The queries behind ``key``/``ls``/``tree`` and ``datacenters``.

KV queries use dcy's own KV watch specs, so a renderer and a service in one process share one
watch per key or prefix.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from dcy._consul import ConsulAPI, Index, QueryResult

# /v1/catalog/datacenters cannot block; the list changes when a datacenter joins or leaves.
DATACENTERS_POLL_INTERVAL = 30.0


@dataclass(frozen=True, slots=True)
class DatacentersSpec:
    """Every datacenter Consul knows, sorted by name."""

    poll_interval: float = DATACENTERS_POLL_INTERVAL

    async def fetch(self, api: ConsulAPI, index: Index, wait: float) -> QueryResult:
        if index:
            await asyncio.sleep(min(self.poll_interval, wait))
        names = sorted(await api.catalog_datacenters())
        # The list itself is the index: the watch wakes its users only when it changes.
        return QueryResult("datacenters:" + ",".join(names), names)

    def decode(self, body: Any) -> tuple[str, ...]:
        return tuple(body or ())

    def __str__(self) -> str:
        return "datacenters"


class TemplateSpecs:
    """Builds the watch specs template functions depend on. ``local_node``: the agent's node
    name, what consul-template's ``node`` without a name reads."""

    def __init__(self, local_node: str | None = None) -> None:
        self.local_node = local_node

    def key(self, key: str, datacenter: str | None) -> Any:
        from dcy._kv_specs import KeySpec

        return KeySpec(key, datacenter)

    def prefix(self, prefix: str, datacenter: str | None) -> Any:
        from dcy._kv_specs import KeyPrefixSpec

        return KeyPrefixSpec(prefix, datacenter)

    def datacenters(self) -> Any:
        return DatacentersSpec()
