"""The command line: service flags (or ``--config FILE``), Consul flags, then ``-- command``."""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from dcy._cli import CONSUL_FLAGS_TITLE, ConsulFlags, add_consul_flags
from dcy._defaults import MIN_DEREGISTER_AFTER
from dcy._durations import parse_duration
from dcy._register_cli._config_file import load_services
from dcy._register_cli._plan import (
    CHECK_KINDS,
    Plan,
    ServicePlan,
    UsageError,
    build_check,
    validate_services,
)

DESCRIPTION = """\
Run a program (or watch a running one) and keep it registered in Consul while it lives:
registered with a real health check once the agent answers, re-registered after agent
restarts, deregistered when the program exits. Signals are forwarded to the program and its
exit code is passed through (128+N for a death by signal N, as a shell reports it)."""

EPILOG = """\
examples:
  dcy-register --name redis --port 6379 --check tcp -- redis-server --port 6379
  dcy-register --name web --port 8080 --check http --http-path /ping -- ./web
  dcy-register --name db --port 5432 --check-cmd 'pg_isready -q' --pid 4242
  dcy-register --config services.hcl -- nsqd

--check-cmd is split like a shell splits words but never run by one (no $VARS, no pipes):
exit 0 passing, 1 warning, anything else critical. Consul is found through CONSUL_HTTP_ADDR,
CONSUL_HTTP_TOKEN & co. unless -http-addr/-token say otherwise; until it answers the program
already runs, and the services are registered as soon as it does."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dcy-register",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    service = parser.add_argument_group("service (or --config)")
    service.add_argument("--name", help="service name, e.g. redis")
    service.add_argument("--port", type=int, help="the port the service listens on")
    service.add_argument("--id", dest="service_id", help="service ID (default name-node-port)")
    service.add_argument("--address", help="address to announce (default: the agent's node)")
    service.add_argument("--tag", action="append", default=[], help="a tag (repeatable)")
    service.add_argument("--tags", action="append", default=[], help="comma-separated tags")
    service.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE")
    service.add_argument(
        "--deregister-after",
        default=None,
        metavar="DURATION",
        help=f"critical this long → removed from the catalog (min {MIN_DEREGISTER_AFTER:g}s)",
    )
    service.add_argument("--config", metavar="FILE", help="services from an HCL or YAML file")

    check = parser.add_argument_group("health check (default: tcp)")
    check.add_argument("--check", choices=CHECK_KINDS, help="check kind")
    check.add_argument("--http-path", help="path for --check http (default /health)")
    check.add_argument("--check-url", metavar="URL", help="HTTP check of this URL")
    check.add_argument("--check-cmd", metavar="COMMAND", help="command check, run without shell")
    check.add_argument("--interval", metavar="DURATION", help="check interval (default 5s)")
    check.add_argument("--timeout", metavar="DURATION", help="check timeout")
    check.add_argument("--ttl", metavar="DURATION", help="TTL of --check ttl (default 10s)")

    process = parser.add_argument_group("process (a command after --, or an existing PID)")
    process.add_argument("--pid", "--attach", dest="pid", type=int, metavar="PID")

    add_consul_flags(parser.add_argument_group(CONSUL_FLAGS_TITLE), wait_default=None)
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning"))
    return parser


def parse_plan(argv: Sequence[str]) -> tuple[Plan, str]:
    """The validated plan and the log level; raises UsageError on anything wrong."""
    args_part, command = _split_command(argv)
    args = _parser().parse_args(args_part)
    services = _services_from(args)
    validate_services(services)
    if command and args.pid is not None:
        raise UsageError("give either a command after -- or --pid, not both")
    if not command and args.pid is None:
        raise UsageError("nothing to run: give a command after -- (or --pid PID)")
    if args.pid is not None:
        _require_process(args.pid)
    consul = ConsulFlags.from_args(args)
    return Plan(tuple(services), tuple(command), args.pid, consul), args.log_level


def _split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    items = list(argv)
    if "--" in items:
        cut = items.index("--")
        return items[:cut], items[cut + 1 :]
    return items, []


def _services_from(args: argparse.Namespace) -> list[ServicePlan]:
    flags = {
        "--name": args.name,
        "--port": args.port,
        "--id": args.service_id,
        "--address": args.address,
        "--tag": args.tag or None,
        "--tags": args.tags or None,
        "--meta": args.meta or None,
        "--check": args.check,
        "--http-path": args.http_path,
        "--check-url": args.check_url,
        "--check-cmd": args.check_cmd,
        "--interval": args.interval,
        "--timeout": args.timeout,
        "--ttl": args.ttl,
        "--deregister-after": args.deregister_after,
    }
    if args.config is not None:
        given = [flag for flag, value in flags.items() if value is not None]
        if given:
            raise UsageError(f"--config describes the services; drop {', '.join(given)}")
        return load_services(Path(args.config))
    if args.name is None or args.port is None:
        raise UsageError("give --name and --port (or --config FILE)")
    name = args.name
    check = build_check(
        args.check,
        url=args.check_url,
        http_path=args.http_path,
        command=_command_words(args.check_cmd) if args.check_cmd is not None else None,
        interval=_duration(args.interval, "--interval"),
        timeout=_duration(args.timeout, "--timeout"),
        ttl=_duration(args.ttl, "--ttl"),
        service=name,
    )
    tags = [*args.tag, *(t.strip() for group in args.tags for t in group.split(","))]
    return [
        ServicePlan(
            name=name,
            port=args.port,
            service_id=args.service_id,
            address=args.address,
            tags=tuple(tags),
            meta=_meta(args.meta),
            check=check,
            deregister_after=_duration(args.deregister_after, "--deregister-after")
            or MIN_DEREGISTER_AFTER,
        )
    ]


def _command_words(text: str) -> tuple[str, ...]:
    try:
        words = tuple(shlex.split(text))
    except ValueError as exc:
        raise UsageError(f"--check-cmd {text!r}: {exc}") from exc
    if not words:
        raise UsageError("--check-cmd is empty")
    return words


def _meta(pairs: Sequence[str]) -> dict[str, str]:
    meta: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--meta {pair!r}: use KEY=VALUE")
        meta[key] = value
    return meta


def _duration(value: str | None, what: str) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value, what=what)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _require_process(pid: int) -> None:
    if pid <= 0:
        raise UsageError(f"--pid {pid}: not a process ID")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise UsageError(f"--pid {pid}: no such process") from None
    except PermissionError:
        pass  # it exists; watching it needs no permission to signal it
