"""Several services from one HCL or YAML file (``--config FILE``).

HCL (``.hcl``; anything but ``.yaml``/``.yml``/``.json`` is read as HCL)::

    service {
      name = "nsqd"
      id   = "nsqd"
      port = 4150
      tags = ["tcp"]
      meta = { http_port = "4151" }
      check {
        http     = "http://127.0.0.1:4151/ping"   # or tcp = true, ttl = "10s",
        interval = "5s"                           # args = ["redis-cli", "ping"],
        timeout  = "2s"                           # http_path = "/health"
      }
    }

YAML (``.yaml``/``.yml``; JSON is YAML too)::

    services:
      - name: redis
        port: 6379
        check: {args: [redis-cli, ping], interval: 5s}

``check`` may also be a bare kind (``check = "ttl"``, ``"none"``). Unknown keys are errors: a
typo must not silently become a service without a check.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dcy._defaults import MIN_DEREGISTER_AFTER
from dcy._durations import parse_duration
from dcy._register_cli._plan import RegisterCheck, ServicePlan, UsageError, build_check

_SERVICE_KEYS = {
    "name",
    "id",
    "port",
    "address",
    "tags",
    "meta",
    "check",
    "deregister_after",
    "deregister_critical_service_after",
}
_CHECK_KEYS = {"tcp", "http", "http_path", "ttl", "args", "interval", "timeout"}


def load_services(path: Path) -> list[ServicePlan]:
    """Every service the file describes, in order; UsageError for anything unreadable."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read --config {path}: {exc.strerror or exc}") from exc
    document = _parse(path, text)
    if not isinstance(document, dict):
        raise UsageError(f"{path}: expected service blocks (or a services list) at the top")
    unknown = set(document) - {"service", "services"}
    if unknown:
        raise UsageError(f"{path}: unknown top-level key(s) {sorted(unknown)}: use service")
    entries: list[Any] = []
    for key in ("service", "services"):
        value = document.get(key)
        if value is None:
            continue
        entries.extend(value if isinstance(value, list) else [value])
    if not entries:
        raise UsageError(f"{path}: no service defined")
    return [_service(path, index, entry) for index, entry in enumerate(entries, 1)]


def _parse(path: Path, text: str) -> Any:
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UsageError(f"{path} is not valid YAML: {exc}") from exc
    import hcl2
    from hcl2 import SerializationOptions

    options = SerializationOptions(
        strip_string_quotes=True, explicit_blocks=False, with_comments=False
    )
    try:
        return hcl2.loads(text, serialization_options=options)
    except Exception as exc:  # lark raises many unrelated types for a syntax error
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{path} is not valid HCL: {first_line}") from exc


def _service(path: Path, index: int, entry: Any) -> ServicePlan:
    where = f"{path}: service #{index}"
    if not isinstance(entry, dict):
        raise UsageError(f"{where}: expected a block of settings, got {entry!r}")
    unknown = set(entry) - _SERVICE_KEYS
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {sorted(unknown)}")
    name = entry.get("name")
    if not isinstance(name, str):
        raise UsageError(f"{where}: needs a name")
    where = f"{path}: service {name!r}"
    port = entry.get("port")
    if not isinstance(port, int) or isinstance(port, bool):
        raise UsageError(f"{where}: needs an integer port, got {port!r}")
    tags = entry.get("tags", [])
    if not isinstance(tags, list):
        raise UsageError(f"{where}: tags must be a list of strings")
    meta = entry.get("meta", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise UsageError(f"{where}: meta must map keys to strings (quote numbers)")
    after_raw = entry.get("deregister_after", entry.get("deregister_critical_service_after"))
    return ServicePlan(
        name=name,
        port=port,
        service_id=_optional_str(entry, "id", where),
        address=_optional_str(entry, "address", where),
        tags=tuple(tags),
        meta=dict(meta),
        check=_check(entry.get("check"), where, name),
        deregister_after=_seconds(after_raw, where) or MIN_DEREGISTER_AFTER,
    )


def _check(raw: Any, where: str, name: str) -> RegisterCheck | None:
    if raw is None:
        return build_check(None, service=name)
    if isinstance(raw, str):
        return build_check(raw, service=name)
    if isinstance(raw, list):
        # HCL blocks arrive as lists; Consul's own `checks` lists have no single-check form.
        if len(raw) != 1:
            raise UsageError(f"{where}: give exactly one check block")
        raw = raw[0]
    if not isinstance(raw, Mapping):
        raise UsageError(f"{where}: check must be a block or a kind, got {raw!r}")
    unknown = set(raw) - _CHECK_KEYS
    if unknown:
        raise UsageError(f"{where}: unknown check key(s) {sorted(unknown)}")
    kinds = [k for k in ("tcp", "ttl") if raw.get(k) not in (None, False)]
    http = raw.get("http")
    url = http if isinstance(http, str) else None
    if http is True or (http is None and "http_path" in raw):
        kinds.append("http")
    args = raw.get("args")
    if args is not None and (
        not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args)
    ):
        raise UsageError(f"{where}: check args must be a non-empty list of strings")
    if len(kinds) + (url is not None) + (args is not None) > 1:
        raise UsageError(f"{where}: a check is one of tcp, http, ttl or args")
    ttl_raw = raw.get("ttl")
    return build_check(
        kinds[0] if kinds else None,
        url=url,
        http_path=_optional_str(raw, "http_path", where),
        command=tuple(args) if args is not None else None,
        interval=_seconds(raw.get("interval"), where),
        timeout=_seconds(raw.get("timeout"), where),
        ttl=None if ttl_raw is True else _seconds(ttl_raw, where),
        service=name,
    )


def _optional_str(entry: Mapping[str, Any], key: str, where: str) -> str | None:
    value = entry.get(key)
    if value is not None and not isinstance(value, str):
        raise UsageError(f"{where}: {key} must be a string, got {value!r}")
    return value


def _seconds(value: Any, where: str) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value, what=f"duration in {where}")
    except (ValueError, TypeError, AttributeError) as exc:
        raise UsageError(str(exc) if isinstance(exc, ValueError) else f"{where}: {exc}") from exc
