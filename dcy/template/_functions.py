"""Template functions under consul-template's names, and the helpers its users reach for.

Data functions (``service``, ``key``, ``ls``, ...) read the current snapshot of a watch through
a :class:`Dependencies` object, which records every query a render touched. A query with no
answer yet makes the render incomplete (the caller writes nothing and renders again once the
answer is in); so does a ``key`` that does not exist, which is reported after a while instead
of blocking silently forever.

Helpers take the piped value first, as jinja filters do: ``{{ "a,b" | split(",") }}``.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from dcy._node_specs import CatalogNodeSpec, CatalogNodesSpec
from dcy._query import ServiceQuery
from dcy._specs import CatalogServicesSpec, HealthServiceSpec
from dcy.template._env import EnvDenied, EnvPolicy
from dcy.template._records import (
    CatalogNode,
    CatalogService,
    KeyPair,
    NodeDetail,
    NodeServiceEntry,
    ServiceEntry,
    as_plain,
)

MISSING: Any = object()


class Dependencies(Protocol):
    """Where data functions get snapshot values; implemented by the renderer."""

    def value(self, spec: Any) -> Any:
        """The current value of ``spec``'s watch, or MISSING if it has not answered yet."""
        ...

    def missing_key(self, key: str) -> None:
        """Record that ``key`` does not exist (the render is then incomplete)."""
        ...

    def key_spec(self, key: str, *, datacenter: str | None) -> Any: ...

    def prefix_spec(self, prefix: str, *, datacenter: str | None) -> Any: ...

    def datacenters_spec(self) -> Any: ...


class TemplateError(Exception):
    """A template failed at render time; the message names the template and line."""


_MAX_KNOWN_QUERIES = 4096


class DataFunctions:
    """The functions bound to one render: each call records its dependency."""

    def __init__(
        self,
        deps: Dependencies,
        *,
        domain: str,
        sandbox: Path | None,
        env_policy: EnvPolicy | None = None,
        error_on_missing_key: bool = False,
        record_cache: dict[Any, tuple[Any, Any]] | None = None,
        query_cache: dict[Any, Any] | None = None,
    ) -> None:
        self._deps = deps
        self._queries: dict[Any, Any] = query_cache if query_cache is not None else {}
        # Snapshot values are immutable and kept until they change, so their records are
        # built once per value, not once per render (a big template renders thousands).
        self._record_cache = record_cache if record_cache is not None else {}
        self._domain = domain
        self._sandbox = sandbox.resolve() if sandbox is not None else None
        self._env_policy = env_policy if env_policy is not None else EnvPolicy()
        self._error_on_missing_key = error_on_missing_key
        self.files: set[Path] = set()

    def globals(self) -> dict[str, Callable[..., Any]]:
        return {
            "service": self.service,
            "services": self.services,
            "node": self.node,
            "nodes": self.nodes,
            "key": self.key,
            "keyOrDefault": self.key_or_default,
            "keyExists": self.key_exists,
            "ls": self.ls,
            "safeLs": self.safe_ls,
            "tree": self.tree,
            "safeTree": self.safe_tree,
            "datacenters": self.datacenters,
            "env": self.env,
            "file": self.file,
        }

    # -- catalog and health --------------------------------------------------------------
    def service(self, query: str, states: str | None = None) -> list[ServiceEntry]:
        """``service "tag.name@dc|passing,warning"``; a second argument overrides states."""
        # A big template asks for the same hundreds of services on every render: the parsed
        # query and its watch spec are kept across renders (see TemplateRenderer).
        key = (query, states)
        hashable = type(query) is str and (states is None or type(states) is str)
        known = self._queries.get(key) if hashable else None
        if known is None:
            parsed = ServiceQuery.parse(query, domain=self._domain)
            if states is not None:
                parsed = parsed.with_states(str(states))
            known = (HealthServiceSpec.of(parsed), parsed)
            if len(self._queries) >= _MAX_KNOWN_QUERIES:
                self._queries.clear()  # a template computing endless names: start over
            if hashable:
                self._queries[key] = known
        spec, parsed = known
        value = self._deps.value(spec)
        if value is MISSING:
            return []
        return [e for e in self._records(spec, value, ServiceEntry.of) if parsed.admits(e.Status)]

    def _records(self, spec: Any, value: Any, convert: Callable[[Any], Any]) -> tuple[Any, ...]:
        cached = self._record_cache.get(spec)
        if cached is not None and cached[0] is value:
            return cached[1]  # type: ignore[no-any-return]
        records = tuple(convert(item) for item in value)
        self._record_cache[spec] = (value, records)
        return records

    def services(self, datacenter: str | None = None) -> list[CatalogService]:
        value = self._deps.value(CatalogServicesSpec(_dc(datacenter)))
        if value is MISSING:
            return []
        return [CatalogService(name, tuple(tags)) for name, tags in sorted(value.items())]

    def nodes(self, datacenter: str | None = None) -> list[CatalogNode]:
        value = self._deps.value(CatalogNodesSpec(_dc(datacenter)))
        if value is MISSING:
            return []
        return [CatalogNode.of(n) for n in value]

    def node(self, name: str, datacenter: str | None = None) -> NodeDetail | None:
        value = self._deps.value(CatalogNodeSpec(name, _dc(datacenter)))
        if value is MISSING or value is None:
            return None
        return NodeDetail(
            CatalogNode.of(value.node), tuple(NodeServiceEntry.of(s) for s in value.services)
        )

    def datacenters(self) -> list[str]:
        value = self._deps.value(self._deps.datacenters_spec())
        return [] if value is MISSING else list(value)

    # -- KV ------------------------------------------------------------------------------
    def key(self, path: str) -> str:
        """The value of a key; a key that does not exist holds the render back."""
        value = self._key_value(path)
        if value is MISSING:
            return ""
        if value is None:
            if self._error_on_missing_key:
                raise TemplateError(f"key {path!r} does not exist")
            self._deps.missing_key(path)
            return ""
        return str(value)

    def key_or_default(self, path: str, default: str = "") -> str:
        value = self._key_value(path)
        if value is MISSING:
            return default
        return default if value is None else str(value)

    def key_exists(self, path: str) -> bool:
        value = self._key_value(path)
        return value is not MISSING and value is not None

    def ls(self, prefix: str) -> list[KeyPair]:
        """Keys directly under ``prefix`` (not in sub-folders)."""
        return [p for p in self.tree(prefix) if "/" not in p.Key]

    def safe_ls(self, prefix: str) -> list[KeyPair]:
        """``ls`` that refuses to render an empty listing: it waits for keys instead."""
        pairs = self.ls(prefix)
        if not pairs:
            self._deps.missing_key(prefix.rstrip("/") + "/")
        return pairs

    def tree(self, prefix: str) -> list[KeyPair]:
        """Every key under ``prefix``, recursively; folder placeholders are left out."""
        path, datacenter = _split_dc(prefix)
        folder = path.strip("/") + "/" if path.strip("/") else ""
        value = self._deps.value(self._deps.prefix_spec(folder, datacenter=datacenter))
        if value is MISSING:
            return []
        pairs = []
        for full_key, entry in sorted(value.items()):
            relative = full_key[len(folder) :]
            if not relative or relative.endswith("/"):
                continue
            pairs.append(
                KeyPair(
                    relative,
                    full_key,
                    _text(entry),
                    getattr(entry, "flags", 0),
                    getattr(entry, "session", None) or "",
                )
            )
        return pairs

    def safe_tree(self, prefix: str) -> list[KeyPair]:
        pairs = self.tree(prefix)
        if not pairs:
            self._deps.missing_key(prefix.rstrip("/") + "/")
        return pairs

    def _key_value(self, path: str) -> Any:
        key, datacenter = _split_dc(path)
        value = self._deps.value(self._deps.key_spec(key.strip("/"), datacenter=datacenter))
        if value is MISSING or value is None:
            return value
        return _text(value)

    # -- local ---------------------------------------------------------------------------
    def env(self, name: str, default: str = "") -> str:
        """An environment variable, unless the env policy denies it (see _env.py)."""
        try:
            return self._env_policy.read(str(name), str(default), os.environ)
        except EnvDenied as exc:
            raise TemplateError(str(exc)) from None

    def file(self, path: str) -> str:
        """A regular file's UTF-8 content, only from inside the sandbox folder
        (``-sandbox-path``). A relative path is taken from the sandbox folder, an absolute one
        must lie inside it; ``..`` and symlinks are resolved first, and where they lead must
        still be inside. Without a sandbox folder file() is disabled."""
        if self._sandbox is None:
            raise TemplateError(
                f"file({path!r}): file() is disabled: no sandbox folder is set "
                "(-sandbox-path, or sandbox_path in the config)"
            )
        target = (self._sandbox / str(path)).resolve()
        try:
            inside = target.relative_to(self._sandbox)
        except ValueError:
            raise TemplateError(f"file({path!r}) is outside the sandbox {self._sandbox}") from None
        self.files.add(target)
        try:
            data = _read_regular_file(self._sandbox, inside.parts)
        except OSError as exc:
            raise TemplateError(f"file({path!r}): {exc.strerror or exc}") from exc
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise TemplateError(f"file({path!r}) is not UTF-8 text") from None
        if text.strip() and text.strip() in self._env_policy.protected_values:
            # A token file that happens to lie in the sandbox folder.
            raise TemplateError(f"file({path!r}) holds the renderer's Consul token")
        return text


def _read_regular_file(root: Path, parts: tuple[str, ...]) -> bytes:
    """Read ``root/parts...`` without following any symlink on the way. The path was resolved
    just before, so it held none then; walking it with O_NOFOLLOW makes sure no component was
    swapped for a link to outside the sandbox since. O_NONBLOCK: a FIFO must not hang the
    renderer before it is refused as not a regular file."""
    if not parts:
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))  # the sandbox itself
    folder = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=folder)
            os.close(folder)
            folder = inner
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=folder)
    finally:
        os.close(folder)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return handle.read()


def _dc(datacenter: str | None) -> str | None:
    if datacenter is None:
        return None
    return datacenter.lstrip("@") or None


def _split_dc(path: str) -> tuple[str, str | None]:
    key, _, datacenter = path.partition("@")
    return key, datacenter or None


def _text(entry: Any) -> str:
    # Templates render text; a binary value shows replacement characters rather than
    # failing the whole file.
    raw = getattr(entry, "raw", entry)
    if isinstance(raw, bytes):
        return raw.decode("utf-8", errors="replace")
    return "" if raw is None else str(raw)


# -- helpers (filters and globals) -----------------------------------------------------------
def by_tag(entries: Iterable[Any]) -> dict[str, list[Any]]:
    """Group services (or instances) by each of their tags, tags sorted."""
    groups: dict[str, list[Any]] = {}
    for entry in entries:
        for tag in entry.Tags:
            groups.setdefault(tag, []).append(entry)
    return dict(sorted(groups.items()))


def by_key(pairs: Iterable[KeyPair]) -> dict[str, dict[str, KeyPair]]:
    """Group a ``tree`` by its first path segment: ``{"web": {"port": pair, ...}}``."""
    groups: dict[str, dict[str, KeyPair]] = {}
    for pair in pairs:
        top, _, rest = pair.Key.partition("/")
        if rest:
            groups.setdefault(top, {})[rest] = pair
    return dict(sorted(groups.items()))


def to_json(value: Any) -> str:
    return json.dumps(as_plain(value), sort_keys=True, separators=(",", ":"))


def to_json_pretty(value: Any) -> str:
    return json.dumps(as_plain(value), sort_keys=True, indent=2)


def parse_json(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise TemplateError(f"parseJSON: {exc}") from exc


def split(value: str, separator: str) -> list[str]:
    return value.split(separator) if value else []


def join(values: Iterable[Any], separator: str) -> str:
    return separator.join(str(v) for v in values)


def contains(container: Any, item: Any) -> bool:
    return item in container


def contains_any(container: Any, items: Iterable[Any]) -> bool:
    return any(i in container for i in items)


def contains_all(container: Any, items: Iterable[Any]) -> bool:
    return all(i in container for i in items)


def regex_replace_all(value: str, pattern: str, replacement: str) -> str:
    # Go's $1 references become Python's \1.
    return re.sub(pattern, re.sub(r"\$(\d+)", r"\\\1", replacement), value)


def regex_match(value: str, pattern: str) -> bool:
    return re.search(pattern, value) is not None


def parse_bool(value: str) -> bool:
    lowered = str(value).strip().lower()
    if lowered in ("1", "t", "true", "yes", "on"):
        return True
    if lowered in ("0", "f", "false", "no", "off", ""):
        return False
    raise TemplateError(f"parseBool: {value!r} is not a boolean")


def parse_int(value: str) -> int:
    try:
        return int(str(value).strip(), 0)
    except ValueError as exc:
        raise TemplateError(f"parseInt: {value!r} is not an integer") from exc


def parse_float(value: str) -> float:
    try:
        return float(value)
    except ValueError as exc:
        raise TemplateError(f"parseFloat: {value!r} is not a number") from exc


HELPERS: Mapping[str, Callable[..., Any]] = {
    "byTag": by_tag,
    "byKey": by_key,
    "toJSON": to_json,
    "toJSONPretty": to_json_pretty,
    "parseJSON": parse_json,
    "split": split,
    "join": join,
    "contains": contains,
    "containsAny": contains_any,
    "containsAll": contains_all,
    "regexReplaceAll": regex_replace_all,
    "regexMatch": regex_match,
    "replaceAll": lambda value, old, new: str(value).replace(old, new),
    "toLower": lambda value: str(value).lower(),
    "toUpper": lambda value: str(value).upper(),
    "toTitle": lambda value: str(value).title(),
    "trimSpace": lambda value: str(value).strip(),
    "parseBool": parse_bool,
    "parseInt": parse_int,
    "parseFloat": parse_float,
    "sha256Hex": lambda value: hashlib.sha256(str(value).encode()).hexdigest(),
    "base64Encode": lambda value: base64.b64encode(str(value).encode()).decode(),
    "base64Decode": lambda value: base64.b64decode(str(value)).decode(),
}
