"""The small runtime every service shares: flags, an aiohttp app with /health and /metrics,
registration through dcy, and a graceful stop.

Stop order on SIGTERM/SIGINT: hand over what another instance takes over (the app's
leadership, released while still registered: its session is bound to this instance's
liveness check), deregister (peers stop sending), stop taking new work, finish what is in
flight, close connections, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol, TypeGuard

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from dcy import AclDenied, Dcy, DcyError, HttpCheck, Registration, TcpCheck, TlsError

Mode = Literal["http", "nsq", "push"]
MODES: tuple[str, ...] = ("http", "nsq", "push")
VERSION = "0.1.0"

log = logging.getLogger("svc")


def cannot_heal(exc: BaseException) -> TypeGuard[DcyError]:
    """Whether ``exc`` is a refusal no retry can cure: the token lacks a permission, or TLS
    with the agent failed. A service that meets one stops (exit 1) instead of retrying it
    forever while looking alive."""
    return isinstance(exc, AclDenied | TlsError)


@dataclass(frozen=True, slots=True)
class Settings:
    name: str
    mode: Mode
    host: str
    port: int
    advertise: str
    consul: str | None
    instance: str
    check_interval: float
    log_level: str


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=name, description=description)
    env = os.environ.get
    parser.add_argument(
        "--mode",
        choices=MODES,
        default=env("SVC_MODE", "http"),
        help="http (app orchestrates), nsq (messaging) or push (coupled)",
    )
    parser.add_argument("--host", default=env("SVC_HOST", "127.0.0.1"), help="listen address")
    parser.add_argument(
        "--port", type=int, default=int(env("SVC_PORT", "0")), help="listen port (0: any free port)"
    )
    parser.add_argument(
        "--advertise",
        default=env("SVC_ADVERTISE"),
        help="address registered in Consul (default: the listen address)",
    )
    parser.add_argument(
        "--consul",
        default=None,
        help="Consul address (default: CONSUL_HTTP_ADDR, else 127.0.0.1:8500)",
    )
    parser.add_argument(
        "--check-interval",
        type=float,
        default=1.0,
        help="seconds between Consul's health checks of this instance",
    )
    parser.add_argument(
        "--log-level",
        default=env("SVC_LOG_LEVEL", "info"),
        choices=("debug", "info", "warning", "error"),
    )
    return parser


def settings_from(name: str, args: argparse.Namespace, parser: argparse.ArgumentParser) -> Settings:
    if args.mode not in MODES:  # an invalid SVC_MODE from the environment
        parser.error(f"invalid mode {args.mode!r}: choose from {', '.join(MODES)}")
    if not 0 <= args.port <= 65535:
        parser.error(f"invalid port {args.port}")
    return Settings(
        name=name,
        mode=args.mode,
        host=args.host,
        port=args.port,
        advertise=args.advertise or ("127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host),
        consul=args.consul,
        instance=f"{name}-{socket.gethostname()}-{os.getpid()}",
        check_interval=args.check_interval,
        log_level=args.log_level,
    )


class Service(Protocol):
    """What a service plugs into the runtime."""

    def routes(self, app: web.Application) -> None: ...

    async def start(self, runtime: Runtime) -> None: ...

    async def hand_over(self) -> None:
        """First on a stop signal, while still registered: give up what another instance
        should take over at once."""
        ...

    async def stop_intake(self) -> None: ...

    async def drain(self) -> None: ...

    def not_ready(self) -> str | None:
        """None when ready to serve; otherwise a short reason for /health."""
        ...


class Runtime:
    def __init__(self, settings: Settings, service: Service) -> None:
        self.settings = settings
        self.service = service
        self.registry = CollectorRegistry()
        Gauge(
            "svc_gc_frozen_objects",
            "Objects of the start-up heap moved out of the garbage collector's reach",
            registry=self.registry,
        ).set_function(gc.get_freeze_count)
        self.port = settings.port
        self._stop = asyncio.Event()
        self.dcy: Dcy | None = None
        self.registration: Registration | None = None
        self.registered = asyncio.Event()
        self.fatal: Exception | None = None

    @property
    def tags(self) -> list[str]:
        return [f"mode-{self.settings.mode}", f"version-{VERSION}"]

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        self.service.routes(app)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.host, self.settings.port)
        await site.start()
        self.port = int(runner.addresses[-1][1])
        try:
            async with Dcy(self.settings.consul, wait_for_agent=30) as dcy:
                self.dcy = dcy
                await self.service.start(self)
                registration = await dcy.register(
                    self.settings.name,
                    self.port,
                    address=self.settings.advertise,
                    service_id=f"{self.settings.name}-{self.settings.advertise}-{self.port}",
                    tags=self.tags,
                    meta={"mode": self.settings.mode, "version": VERSION, "pid": str(os.getpid())},
                    check=HttpCheck(
                        interval=self.settings.check_interval,
                        timeout=min(2.0, self.settings.check_interval),
                    ),
                    # What the app's leadership binds to: /health fails under load or while
                    # a peer is away, a TCP connect only once the process is gone.
                    liveness=TcpCheck(
                        interval=self.settings.check_interval,
                        timeout=min(2.0, self.settings.check_interval),
                    ),
                    # Consul refuses for good to keep this instance registered (its token
                    # was deleted, say): an instance nobody can find should not look alive.
                    on_lost=self._registration_lost,
                )
                self.registration = registration
                self.registered.set()
                # The heap built while starting (modules, dcy, aiohttp, prometheus) never
                # becomes garbage; left in the collector's care, each full collection walked it
                # and held a reading for ~40 ms (1 in 40 at 2 readings/s). Frozen, it is skipped.
                gc.collect()
                gc.freeze()
                log.info(
                    "%s ready on %s:%s (mode %s)",
                    self.settings.name,
                    self.settings.advertise,
                    self.port,
                    self.settings.mode,
                )
                await self._stop.wait()
                log.info("stopping: handing over, deregistering, finishing in-flight work")
                try:
                    await self.service.hand_over()
                except Exception:
                    # Leaving Consul and finishing the work in flight matter more.
                    log.exception("handing over failed")
                try:
                    await registration.deregister()
                except DcyError as exc:
                    # The agent may be stopping too; in-flight work still has to finish.
                    log.warning("could not deregister (%s): Consul reaps it once critical", exc)
                await self.service.stop_intake()
                await self.service.drain()
        except DcyError as exc:
            log.error("%s", exc)
            return 1
        finally:
            await runner.cleanup()
        return 1 if self.fatal is not None else 0

    def stop(self) -> None:
        self._stop.set()

    def fail(self, exc: Exception) -> None:
        """Stop gracefully because of ``exc`` (see :func:`cannot_heal`, or work that cannot go
        on); the exit status is 1."""
        if self.fatal is None:
            self.fatal = exc
            log.error("stopping: %s", exc)
        self._stop.set()

    def _registration_lost(self, registration: Registration) -> None:
        assert registration.error is not None
        self.fail(registration.error)

    async def _health(self, _: web.Request) -> web.Response:
        reason = self.service.not_ready()
        if reason is None:
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "not ready", "reason": reason}, status=503)

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )


def serve(
    name: str,
    description: str,
    build: Callable[[Settings, argparse.Namespace], Service],
    extend: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: list[str] | None = None,
) -> int:
    """Parse flags (usage errors exit 2), build the service, run it until a signal."""
    parser = base_parser(name, description)
    if extend is not None:
        extend(parser)
    args = parser.parse_args(argv)
    settings = settings_from(name, args, parser)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s {name} %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    service = build(settings, args)
    return asyncio.run(_run(settings, service))


async def _run(settings: Settings, service: Service) -> int:
    return await Runtime(settings, service).run()


Background = Callable[[], Awaitable[None]]
