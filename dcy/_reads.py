"""The reads that bypass the watch engine, each a deliberate one-shot read.

dcy reads Consul through the watch engine: one long-lived blocking query per distinct
question, shared by every user in the process. These reads are not watches, on purpose:

* :func:`read_agent` — who the agent is (datacenter, node, DNS domain and port), once when a
  client opens: nothing can be watched before it is known, and it does not change while the
  agent runs.
* :func:`read_key` and :func:`read_prefix` — ``dcy.kv.get``/``entry``/``list``: the caller
  wants the value now, typically once at start; a watch would hold a blocking query open for
  a key nobody looks at again, and a cached snapshot could miss the caller's own write made
  a moment before. Live values are ``dcy.kv.watch``, which is a watch.
* :func:`read_lock` — a leadership reads its lock key once, right after acquiring it, to
  learn the index of its own acquisition (Consul's PUT answers only true or false).

Datacenter lists, which Consul cannot block on, are polled through the engine
(``DatacentersByDistanceSpec``), not here.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING

from dcy._consul import AgentInfo, ConsulAPI

if TYPE_CHECKING:  # loaded with dcy.kv or a leadership, not by every client
    from dcy._kv_specs import KeyPrefixSpec, KeyValue


async def read_agent(api: ConsulAPI) -> AgentInfo:
    return await api.agent_info()


async def read_key(api: ConsulAPI, key: str, *, datacenter: str | None = None) -> KeyValue | None:
    from dcy._kv_specs import KeyValue

    result = await api.kv_get(key, datacenter=datacenter)
    return KeyValue.from_entry(result.body[0]) if result.body else None


async def read_prefix(api: ConsulAPI, spec: KeyPrefixSpec) -> MappingProxyType[str, KeyValue]:
    result = await api.kv_get(spec.prefix, recurse=True, datacenter=spec.datacenter)
    return spec.decode(result.body)


async def read_lock(api: ConsulAPI, key: str) -> KeyValue | None:
    return await read_key(api, key)
