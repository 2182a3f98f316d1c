"""Consul's key/value store: reads, writes, check-and-set, and live values through watches.

Live configuration without a restart: watch a key (or a prefix, written with a trailing
``/``); the watch engine keeps one blocking query per key and calls back on every change.

    async with Dcy() as dcy:
        level = await dcy.kv.get("app/log_level", "info")

        def on_level(snapshot: Snapshot[KeyValue | None]) -> None:
            if snapshot.value is not None:  # None: the key was deleted
                logging.getLogger().setLevel(snapshot.value.value.upper())

        dcy.kv.watch("app/log_level", on_level)

        async with dcy.kv.watch("app/limits/") as updates:  # every key under the prefix
            async for snapshot in updates:
                limits = {k.rsplit("/", 1)[-1]: int(e.value) for k, e in snapshot.value.items()}

Values are bytes in Consul. ``get``/``KeyValue.value`` decode them as UTF-8 (and name the key
when that fails); ``get_bytes``/``KeyValue.raw`` give them untouched. While Consul cannot be
reached a watch keeps the last value it saw, marked ``stale``: it is never replaced by an
empty answer Consul did not give.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from dcy._consul import ConsulAPI
from dcy._kv_specs import KeyPrefixSpec, KeySpec, KeyValue
from dcy._reads import read_key, read_prefix
from dcy._watch import Callback, Subscription, WatchEngine

Value = str | bytes | bytearray | memoryview


class KeyValueStore:
    """The KV store of the local agent's datacenter (reads may name another one)."""

    def __init__(self, api: ConsulAPI, engine: WatchEngine) -> None:
        self._api = api
        self._engine = engine

    # -- reads ---------------------------------------------------------------------------
    async def entry(self, key: str, *, datacenter: str | None = None) -> KeyValue | None:
        """The entry of ``key`` with its flags, lock holder and indexes; None if absent."""
        return await read_key(self._api, _checked_key(key), datacenter=datacenter)

    async def get(
        self, key: str, default: str | None = None, *, datacenter: str | None = None
    ) -> str | None:
        """The value of ``key`` as text, or ``default`` when the key does not exist.

        Raises UnicodeDecodeError (a ValueError) when the value is not UTF-8."""
        entry = await self.entry(key, datacenter=datacenter)
        return default if entry is None else entry.value

    async def get_bytes(
        self, key: str, default: bytes | None = None, *, datacenter: str | None = None
    ) -> bytes | None:
        """The value of ``key`` as stored, or ``default`` when the key does not exist."""
        entry = await self.entry(key, datacenter=datacenter)
        return default if entry is None else entry.raw

    async def list(
        self, prefix: str = "", *, datacenter: str | None = None
    ) -> MappingProxyType[str, KeyValue]:
        """Every key under ``prefix`` (all keys for ""), in key order."""
        return await read_prefix(
            self._api, KeyPrefixSpec(_checked_key(prefix, allow_empty=True), datacenter)
        )

    # -- writes --------------------------------------------------------------------------
    async def put(
        self, key: str, value: Value, *, flags: int | None = None, cas: int | None = None
    ) -> bool:
        """Write ``value`` (text as UTF-8, bytes as they are). With ``cas`` the write is a
        check-and-set: 0 writes only a new key, N only if the key's ``modify_index`` is
        still N; the answer says whether it happened. Without ``cas`` it is always True."""
        if flags is not None and (isinstance(flags, bool) or not 0 <= flags < 2**64):
            raise ValueError(f"flags must be an unsigned 64-bit int, got {flags!r}")
        return await self._api.kv_put(_checked_key(key), _encode(key, value), flags=flags, cas=cas)

    async def cas(self, key: str, value: Value, index: int, *, flags: int | None = None) -> bool:
        """``put`` as a check-and-set: True only if the key still has ``modify_index`` ==
        ``index`` (0: only if it does not exist yet)."""
        return await self.put(key, value, flags=flags, cas=index)

    async def delete(self, key: str, *, recurse: bool = False, cas: int | None = None) -> bool:
        """Delete ``key`` (every key under it with ``recurse``). Deleting a missing key is
        True; with ``cas`` it happens only at that ``modify_index``."""
        if recurse and not key:
            raise ValueError("refusing to delete the whole KV store: name a prefix")
        return await self._api.kv_delete(_checked_key(key), recurse=recurse, cas=cas)

    # -- watches -------------------------------------------------------------------------
    def watch(
        self, key_or_prefix: str, callback: Callback | None = None, *, datacenter: str | None = None
    ) -> Subscription[Any]:
        """Snapshots of a key (``KeyValue`` or None) or, for a name ending in ``/``, of a
        prefix (a read-only mapping key → ``KeyValue``), as they change. Pass a callback
        (sync or async) or iterate the subscription with ``async for``."""
        if key_or_prefix.endswith("/"):
            return self.watch_prefix(key_or_prefix, callback, datacenter=datacenter)
        return self.watch_key(key_or_prefix, callback, datacenter=datacenter)

    def watch_key(
        self, key: str, callback: Callback | None = None, *, datacenter: str | None = None
    ) -> Subscription[KeyValue | None]:
        """Snapshots of one key; the value is None while the key does not exist."""
        return self._engine.subscribe(KeySpec(_checked_key(key), datacenter), callback)

    def watch_prefix(
        self, prefix: str, callback: Callback | None = None, *, datacenter: str | None = None
    ) -> Subscription[MappingProxyType[str, KeyValue]]:
        """Snapshots of every key under ``prefix`` ("" for all keys)."""
        spec = KeyPrefixSpec(_checked_key(prefix, allow_empty=True), datacenter)
        return self._engine.subscribe(spec, callback)


def _checked_key(key: str, *, allow_empty: bool = False) -> str:
    if not isinstance(key, str):
        raise TypeError(f"a KV key is a str, got {type(key).__name__}: {key!r}")
    if not key and not allow_empty:
        raise ValueError("a KV key must not be empty")
    if key.startswith("/"):
        # Consul's HTTP router would see "//" and redirect; keys never start with "/".
        raise ValueError(f"a KV key must not start with '/': {key!r}")
    return key


def _encode(key: str, value: Value) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(
        f"the value for {key!r} must be str or bytes, got {type(value).__name__}: {value!r}"
    )
