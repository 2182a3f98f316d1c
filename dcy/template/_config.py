"""The renderer's configuration: consul-template's HCL stanzas and flags, merged.

Config files (``-config FILE|DIR``, a folder means its ``*.hcl`` files in name order) are read
first, in order; flags given on the command line win over them, and the ``CONSUL_*`` environment
fills in what neither sets, exactly as for every other dcy client.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dcy._durations import parse_duration, parse_wait
from dcy._watch import MIN_BLOCKING, WatchOptions
from dcy.template._env import EnvPolicy
from dcy.template._spec import TemplateSpec, parse_command, spec_from_mapping


class ConfigError(ValueError):
    """The configuration cannot be used; the message says where and why."""


@dataclass(frozen=True, slots=True)
class ConsulSettings:
    address: str | None = None
    token: str | None = None
    ssl: bool | None = None
    ssl_verify: bool | None = None
    ca_cert: str | None = None
    ca_path: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None
    retry_backoff: float = 0.25
    retry_max_backoff: float = 60.0
    # How long one blocking query may wait on the agent's side (consul-template's
    # block_query_wait); also what bounds noticing an agent that stopped answering: a
    # query gets no answer within wait + wait/16 + 10 s, and the data is reported stale.
    block_query_wait: float = 60.0
    # The most connections to the agent, whatever the templates watch (dcy's budget; past
    # it, change detectors and re-fetches instead of a blocking query per query).
    max_connections: int = WatchOptions().max_connections


@dataclass(frozen=True, slots=True)
class ExecSettings:
    command: tuple[str, ...] = ()
    reload_signal: signal.Signals | None = None
    kill_signal: signal.Signals = signal.SIGTERM
    kill_timeout: float = 30.0
    splay: float = 0.0


@dataclass(frozen=True, slots=True)
class RunConfig:
    consul: ConsulSettings = ConsulSettings()
    templates: tuple[TemplateSpec, ...] = ()
    wait: tuple[float, float] | None = None
    exec: ExecSettings = ExecSettings()
    log_level: str = "info"
    pid_file: Path | None = None
    kill_signal: signal.Signals = signal.SIGTERM
    reload_signal: signal.Signals = signal.SIGHUP
    status_addr: str | None = None
    missing_key_timeout: float = 30.0
    sandbox_path: Path | None = None
    env: EnvPolicy = field(default_factory=EnvPolicy)
    fatal_commands: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def load_config_paths(paths: list[str], base: RunConfig | None = None) -> RunConfig:
    config = base or RunConfig()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".hcl", ".json"))
        elif path.is_file():
            files = [path]
        else:
            raise ConfigError(f"-config {raw}: no such file or directory")
        for file in files:
            config = merge_file(config, file)
    return config


def merge_file(config: RunConfig, path: Path) -> RunConfig:
    # python-hcl2 (with lark) costs ~30 ms to import: only a run with -config pays it.
    import hcl2

    options = hcl2.SerializationOptions(strip_string_quotes=True, explicit_blocks=False)
    try:
        with path.open() as handle:
            data = hcl2.load(handle, serialization_options=options)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc
    except Exception as exc:  # python-hcl2 raises lark's errors, which have no common base
        raise ConfigError(f"{path}: not valid HCL: {exc}") from exc
    try:
        return merge_mapping(config, data, base=path.parent)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def merge_mapping(config: RunConfig, data: dict[str, Any], *, base: Path) -> RunConfig:
    known = {
        "consul",
        "template",
        "wait",
        "exec",
        "log_level",
        "pid_file",
        "kill_signal",
        "reload_signal",
        "status_addr",
        "missing_key_timeout",
        "sandbox_path",
        "env",
        "fatal_commands",
    }
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}")
    updates: dict[str, Any] = {}
    if "consul" in data:
        updates["consul"] = _consul(config.consul, _block(data["consul"], "consul"))
    if "template" in data:
        stanzas = data["template"] if isinstance(data["template"], list) else [data["template"]]
        updates["templates"] = config.templates + tuple(
            spec_from_mapping(_block(s, "template"), base=base) for s in stanzas
        )
    if "wait" in data:
        updates["wait"] = _wait(data["wait"])
    if "exec" in data:
        updates["exec"] = _exec(config.exec, _block(data["exec"], "exec"))
    for name in ("kill_signal", "reload_signal"):
        if name in data:
            updates[name] = parse_signal(data[name])
    if "log_level" in data:
        updates["log_level"] = parse_log_level(data["log_level"])
    if "pid_file" in data:
        updates["pid_file"] = Path(data["pid_file"])
    if "status_addr" in data:
        updates["status_addr"] = str(data["status_addr"])
    if "missing_key_timeout" in data:
        updates["missing_key_timeout"] = parse_duration(data["missing_key_timeout"])
    if "sandbox_path" in data:
        updates["sandbox_path"] = base / Path(data["sandbox_path"])
    if "fatal_commands" in data:
        updates["fatal_commands"] = bool(data["fatal_commands"])
    if "env" in data:
        updates["env"] = _env(config.env, _block(data["env"], "env"))
    return replace(config, **updates)


def _block(value: Any, name: str) -> dict[str, Any]:
    # explicit_blocks=False turns `name { ... }` into a list holding one mapping.
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a block")
    return value


def _consul(current: ConsulSettings, raw: dict[str, Any]) -> ConsulSettings:
    updates: dict[str, Any] = {}
    for key in ("address", "token"):
        if key in raw:
            updates[key] = str(raw[key])
    if "ssl" in raw:
        ssl = _block(raw["ssl"], "ssl")
        mapping = {"enabled": "ssl", "verify": "ssl_verify"}
        for key, target in mapping.items():
            if key in ssl:
                updates[target] = bool(ssl[key])
        for key, target in (
            ("ca_cert", "ca_cert"),
            ("ca_path", "ca_path"),
            ("cert", "cert"),
            ("key", "key"),
            ("server_name", "server_name"),
        ):
            if key in ssl:
                updates[target] = str(ssl[key])
    if "retry" in raw:
        retry = _block(raw["retry"], "retry")
        if "backoff" in retry:
            updates["retry_backoff"] = parse_duration(retry["backoff"], what="retry.backoff")
        if "max_backoff" in retry:
            updates["retry_max_backoff"] = parse_duration(
                retry["max_backoff"], what="retry.max_backoff"
            )
    if "max_connections" in raw:
        updates["max_connections"] = parse_max_connections(
            raw["max_connections"], what="consul.max_connections"
        )
    return replace(current, **updates)


def parse_max_connections(value: Any, *, what: str) -> int:
    """A connection budget: a whole number leaving room for blocking queries beside the
    connections kept for writes and re-fetches."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    lowest = WatchOptions().reserved_connections + MIN_BLOCKING
    if number is None or number < lowest:
        raise ValueError(
            f"invalid {what} {value!r}: a whole number >= {lowest} "
            f"({WatchOptions().reserved_connections} connections are kept for writes and "
            f"re-fetches, at least {MIN_BLOCKING} are for blocking queries)"
        )
    return number


def _env(current: EnvPolicy, raw: dict[str, Any]) -> EnvPolicy:
    # What env() may read; consul-template's exec.env has the same two lists.
    unknown = sorted(set(raw) - {"allowlist", "denylist"})
    if unknown:
        raise ValueError(f"unknown env setting(s) {', '.join(unknown)}: use allowlist, denylist")
    return current.merged(
        env_patterns(raw.get("allowlist", []), "env.allowlist"),
        env_patterns(raw.get("denylist", []), "env.denylist"),
    )


def env_patterns(value: Any, what: str) -> tuple[str, ...]:
    """A list of variable-name patterns (``APP_*``), each a non-empty string."""
    items = value if isinstance(value, list | tuple) else [value]
    if not all(isinstance(i, str) and i.strip() for i in items):
        raise ValueError(f"{what} must be a list of variable names or patterns, got {value!r}")
    return tuple(i.strip() for i in items)


def _wait(value: Any) -> tuple[float, float]:
    if isinstance(value, str):
        return parse_wait(value)
    block = _block(value, "wait")
    low = parse_duration(block.get("min", 0), what="wait.min")
    high = parse_duration(block.get("max", low * 4), what="wait.max")
    if high < low:
        raise ValueError("wait: max is below min")
    return low, high


def _exec(current: ExecSettings, raw: dict[str, Any]) -> ExecSettings:
    updates: dict[str, Any] = {}
    if "command" in raw:
        updates["command"] = parse_command(raw["command"])
    if "reload_signal" in raw:
        updates["reload_signal"] = (
            parse_signal(raw["reload_signal"]) if raw["reload_signal"] else None
        )
    if "kill_signal" in raw:
        updates["kill_signal"] = parse_signal(raw["kill_signal"])
    if "kill_timeout" in raw:
        updates["kill_timeout"] = parse_duration(raw["kill_timeout"], what="exec.kill_timeout")
    if "splay" in raw:
        updates["splay"] = parse_duration(raw["splay"], what="exec.splay")
    return replace(current, **updates)


def parse_signal(value: Any) -> signal.Signals:
    text = str(value).strip().upper()
    name = text if text.startswith("SIG") else f"SIG{text}"
    try:
        return signal.Signals[name]
    except KeyError:
        raise ValueError(f"unknown signal {value!r}: use e.g. SIGHUP, SIGTERM, SIGUSR1") from None


def parse_log_level(value: Any) -> str:
    level = str(value).strip().lower()
    if level == "warn":
        level = "warning"
    if level not in ("trace", "debug", "info", "warning", "error"):
        raise ValueError(f"unknown log level {value!r}: use debug, info, warn or error")
    return "debug" if level == "trace" else level
