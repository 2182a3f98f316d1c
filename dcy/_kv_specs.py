"""KV entries, and the watch specs of a key and of a prefix (``dcy.kv``, leaderships,
templates' ``key``/``ls``/``tree``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from dcy._consul import ConsulAPI, Index, QueryResult


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
