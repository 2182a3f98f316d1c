"""What dcy-register was asked to do, validated before anything starts.

A :class:`Plan` is the services to register, the process whose life they follow, and how to
reach Consul. Building one checks every service with dcy's own ``define_service`` (against a
placeholder agent), so a bad name, port, tag or meta fails with exit code 2 before the child
starts and before Consul hears anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from dcy._cli import ConsulFlags
from dcy._consul import AgentInfo
from dcy._defaults import MIN_DEREGISTER_AFTER
from dcy._register import (
    CheckSpec,
    HttpCheck,
    TcpCheck,
    TtlCheck,
    define_service,
)


class UsageError(ValueError):
    """Bad input: reported on stderr with exit code 2, before anything is started."""


@dataclass(frozen=True, slots=True)
class CommandCheck:
    """dcy-register runs ``argv`` (never through a shell) every ``interval``; like Consul's
    script checks, exit 0 is passing, 1 warning, anything else (or a timeout) critical. The
    result feeds a TTL check, so the check goes critical on its own if dcy-register dies."""

    argv: tuple[str, ...]
    interval: float = 5.0
    timeout: float = 5.0

    @property
    def ttl(self) -> float:
        # Three missed runs (plus one slow one) before Consul declares it stale: a heartbeat
        # re-sends the last result every ttl/3 anyway, so this only fires when we are gone.
        return 3 * self.interval + self.timeout


RegisterCheck = CheckSpec | CommandCheck


@dataclass(frozen=True, slots=True)
class ServicePlan:
    """One service to register: the arguments of ``Dcy.register`` plus a command check."""

    name: str
    port: int
    service_id: str | None = None
    address: str | None = None
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict)
    check: RegisterCheck | None = None
    deregister_after: float = MIN_DEREGISTER_AFTER

    @property
    def dcy_check(self) -> CheckSpec | None:
        """The check Consul itself knows about."""
        if isinstance(self.check, CommandCheck):
            return TtlCheck(self.check.ttl)
        return self.check

    def describe_check(self) -> str:
        check = self.check
        if isinstance(check, CommandCheck):
            return f"command {list(check.argv)} every {check.interval:g}s"
        if isinstance(check, HttpCheck):
            return f"HTTP {check.url or check.path} every {check.interval:g}s"
        if isinstance(check, TcpCheck):
            return f"TCP every {check.interval:g}s"
        if isinstance(check, TtlCheck):
            return f"TTL {check.ttl:g}s, kept passing while the process lives"
        return "no check"


@dataclass(frozen=True, slots=True)
class Plan:
    """Services plus exactly one of ``command`` (start it) or ``pid`` (watch it)."""

    services: tuple[ServicePlan, ...]
    command: tuple[str, ...] = ()
    pid: int | None = None
    consul: ConsulFlags = field(default_factory=ConsulFlags)


# Only used to run define_service's checks before the real agent is known.
_PLACEHOLDER_AGENT = AgentInfo(
    datacenter="validation",
    node_name="validation",
    domain="consul",
    dns_port=8600,
    dns_address="127.0.0.1",
    version="",
    node_address="127.0.0.1",
)


def validate_services(services: Sequence[ServicePlan]) -> None:
    """Run dcy's own validation on every service and refuse duplicate IDs."""
    if not services:
        raise UsageError("no service to register: give --name and --port, or --config FILE")
    seen: dict[str, str] = {}
    for service in services:
        try:
            definition = define_service(
                service.name,
                service.port,
                agent=_PLACEHOLDER_AGENT,
                address=service.address,
                service_id=service.service_id,
                tags=service.tags,
                meta=service.meta,
                check=service.dcy_check,
                deregister_after=service.deregister_after,
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        if definition.service_id in seen:
            raise UsageError(
                f"services {seen[definition.service_id]!r} and {service.name!r} would share "
                f"the ID {definition.service_id!r}: give each its own id"
            )
        seen[definition.service_id] = service.name
        if isinstance(service.check, CommandCheck):
            _validate_command_check(service.name, service.check)


def _validate_command_check(name: str, check: CommandCheck) -> None:
    if not check.argv or not all(isinstance(a, str) and a for a in check.argv):
        raise UsageError(f"service {name!r}: the check command is empty")
    if check.interval <= 0 or check.timeout <= 0:
        raise UsageError(f"service {name!r}: check interval and timeout must be positive")


CHECK_KINDS = ("tcp", "http", "ttl", "cmd", "none")
DEFAULT_INTERVAL = 5.0
DEFAULT_TIMEOUT = 2.0
DEFAULT_TTL = 10.0


def build_check(
    kind: str | None,
    *,
    url: str | None = None,
    http_path: str | None = None,
    command: Sequence[str] | None = None,
    interval: float | None = None,
    timeout: float | None = None,
    ttl: float | None = None,
    service: str = "",
) -> RegisterCheck | None:
    """One check from flags or a config block; ``kind`` None is implied by ``url`` (http),
    ``command`` (cmd) or else defaults to tcp, the one check every listening daemon passes."""
    implied = "http" if url is not None else "cmd" if command is not None else None
    if kind is None:
        kind = implied or "tcp"
    if kind not in CHECK_KINDS:
        raise UsageError(
            f"service {service!r}: unknown check {kind!r}: use one of {', '.join(CHECK_KINDS)}"
        )
    if implied is not None and kind != implied:
        given = "a check URL" if implied == "http" else "a check command"
        raise UsageError(f"service {service!r}: check {kind!r} conflicts with {given}")
    if http_path is not None and kind != "http":
        raise UsageError(f"service {service!r}: an HTTP path only fits an http check")
    if ttl is not None and kind != "ttl":
        raise UsageError(f"service {service!r}: a TTL only fits a ttl check")
    for what, value in (("interval", interval), ("timeout", timeout), ("ttl", ttl)):
        if value is not None and value <= 0:
            raise UsageError(f"service {service!r}: check {what} must be positive")
    every = interval if interval is not None else DEFAULT_INTERVAL
    if kind == "tcp":
        return TcpCheck(interval=every, timeout=timeout or DEFAULT_TIMEOUT)
    if kind == "http":
        if url is not None and not url.startswith(("http://", "https://")):
            raise UsageError(f"service {service!r}: check URL {url!r} must start with http(s)://")
        path = http_path if http_path is not None else "/health"
        if not path.startswith("/"):
            raise UsageError(f"service {service!r}: HTTP path {path!r} must start with /")
        return HttpCheck(path=path, url=url, interval=every, timeout=timeout or DEFAULT_TIMEOUT)
    if kind == "ttl":
        return TtlCheck(ttl=ttl or DEFAULT_TTL)
    if kind == "cmd":
        if command is None:
            raise UsageError(f"service {service!r}: a cmd check needs a command")
        # A script usually needs longer than a TCP connect: default to the whole interval.
        return CommandCheck(tuple(command), interval=every, timeout=timeout or every)
    return None
