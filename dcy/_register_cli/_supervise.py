"""The life of one dcy-register run: start (or watch) the process, register once Consul
answers, forward signals, deregister when the process ends, return its exit code.

The process never waits for Consul: a Procfile starts the agent and its services together, and
an agent restart must not restart the services. Registration follows when the agent answers;
from then on each ``Registration`` keeps itself registered through agent restarts.

A refusal that no retry cures ends the run as it does at the start, whenever it comes: when
Consul refuses for good to keep a service registered (its token was deleted or lost
``service:write``: a heartbeat, a re-registration or the watch of the entry is refused),
dcy-register says which request was refused, stops the program (SIGTERM, as on an ending
signal) and exits 1. A supervisor restarting it then meets the same refusal at once, loudly,
instead of a program that runs on while nothing keeps it in the catalog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from dcy._backoff import Backoff, Retry, retrying
from dcy._dcy import Dcy
from dcy._errors import ConsulUnavailable, DcyError
from dcy._register import Registration, define_service
from dcy._register_cli._command_check import keep_checking, run_check
from dcy._register_cli._plan import CommandCheck, Plan, ServicePlan
from dcy._register_cli._process import CannotStart, ChildProcess, WatchedProcess

log = logging.getLogger("dcy.register_cli")

FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
# Signals that end a program by convention: its services leave the catalog at once, so
# clients stop calling while it shuts down instead of after.
ENDING = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
# An agent that answers but cannot register yet (no cluster leader, say): try again soon.
REGISTER_BACKOFF = Backoff(base=0.5, cap=5.0)
FAILED = 1


class _Fatal(Exception):
    """Registration cannot succeed (refused, TLS, gave up waiting): stop the program."""


class Supervisor:
    """Runs :class:`Plan` once; :meth:`run` returns the exit code for dcy-register."""

    def __init__(self, plan: Plan, dcy: Dcy) -> None:
        self.plan = plan
        self.dcy = dcy
        self._target: ChildProcess | WatchedProcess | None = None
        self._registrations: list[Registration] = []
        self._attempted: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._registrar: asyncio.Task[None] | None = None
        self._leaving: asyncio.Task[None] | None = None
        self._failed = False
        self._stop = asyncio.Event()
        self._stop_code = 0

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in FORWARDED:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            try:
                self._target = await self._start_target()
            except CannotStart as exc:
                log.error("%s", exc)
                return exc.exit_code
            log.info(
                "%s %s; registering %s once Consul answers at %s",
                "started" if isinstance(self._target, ChildProcess) else "watching",
                self._target.description,
                ", ".join(s.name for s in self.plan.services),
                self.dcy.config.address,
            )
            self._registrar = asyncio.create_task(self._register_all(), name="dcy-register")
            self._registrar.add_done_callback(self._on_registrar_done)
            code = await self._wait_for_end(self._target)
            await self._start_leaving()
            return FAILED if self._failed else code
        finally:
            for sig in FORWARDED:
                loop.remove_signal_handler(sig)
            await self.dcy.aclose()

    async def _start_target(self) -> ChildProcess | WatchedProcess:
        if self.plan.pid is not None:
            return WatchedProcess(self.plan.pid)
        return await ChildProcess.start(self.plan.command)

    async def _wait_for_end(self, target: ChildProcess | WatchedProcess) -> int:
        ended = asyncio.create_task(target.wait())
        stopped = asyncio.create_task(self._stop.wait())
        await asyncio.wait({ended, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if ended.done():
            code = ended.result()
            log.info("%s ended (exit code %d)", target.description, code)
            return code
        ended.cancel()
        return self._stop_code

    # -- signals -----------------------------------------------------------------------------
    def _on_signal(self, sig: int) -> None:
        target = self._target
        if target is None:  # arrived before the start: end like the default action would
            self._stop_code = 128 + sig
            self._stop.set()
            return
        if target.forwards_signals:
            log.info("forwarding %s to %s", signal.Signals(sig).name, target.description)
            target.send(sig)
            if sig in ENDING:
                self._start_leaving()
        elif sig in (*ENDING, signal.SIGHUP):
            log.info("%s: no longer watching %s", signal.Signals(sig).name, target.description)
            self._stop_code = 128 + sig
            self._stop.set()

    # -- registration ------------------------------------------------------------------------
    def _on_registrar_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("%s", task.exception())
        self._give_up("its services cannot be registered")

    def _on_registration_lost(self, registration: Registration) -> None:
        log.error("Consul no longer keeps %s registered: %s", registration.service_id,
                  registration.error)  # fmt: skip
        self._give_up(f"{registration.service_id} can no longer be kept registered")

    def _give_up(self, why: str) -> None:
        """Stop the program (or stop watching it) because of a refusal; the exit code is 1."""
        if self._failed:
            return
        self._failed = True
        if self._target is not None and self._target.forwards_signals:
            log.error("stopping %s: %s", self._target.description, why)
            self._target.send(signal.SIGTERM)
        else:
            self._stop.set()

    async def _register_all(self) -> None:
        await self._connect()
        for service in self.plan.services:
            # The command's first verdict goes out right after the registration: a TTL check
            # starts out passing, and a failing service should not look healthy for a whole
            # interval.
            first = (
                await run_check(service.check) if isinstance(service.check, CommandCheck) else None
            )
            registration = await self._register(service)
            self._registrations.append(registration)
            if isinstance(service.check, CommandCheck):
                task = asyncio.create_task(keep_checking(registration, service.check, first))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _connect(self) -> None:
        # Dcy waits for the agent as long as --wait-for-consul says, reporting as it goes.
        try:
            await self.dcy.open()
        except ConsulUnavailable as exc:
            raise _Fatal(f"gave up waiting for Consul: {exc}") from exc
        except DcyError as exc:
            raise _Fatal(f"cannot use Consul at {self.dcy.config.address}: {exc}") from exc

    async def _register(self, service: ServicePlan) -> Registration:
        assert self.dcy.agent is not None
        # The ID as dcy will compute it, known before the request: a registration cut short
        # by the program's exit is still deregistered.
        service_id = define_service(
            service.name,
            service.port,
            agent=self.dcy.agent,
            service_id=service.service_id,
            check=service.dcy_check,
        ).service_id
        self._attempted.add(service_id)

        def report(exc: BaseException, retry: Retry, delay: float) -> None:
            log.warning("cannot register %s yet (retry in %.1fs): %s", service_id, delay, exc)

        try:
            registration = await retrying(
                lambda: self.dcy.register(
                    service.name,
                    service.port,
                    address=service.address,
                    service_id=service_id,
                    tags=service.tags,
                    meta=service.meta,
                    check=service.dcy_check,
                    deregister_after=service.deregister_after,
                    on_lost=self._on_registration_lost,
                ),
                REGISTER_BACKOFF,
                on_retry=report,
            )
        except DcyError as exc:
            raise _Fatal(f"Consul refused to register {service_id}: {exc}") from exc
        definition = registration.definition
        log.info(
            "registered %s (%s at %s:%d, %s)",
            service_id,
            service.name,
            definition.address,
            definition.port,
            service.describe_check(),
        )
        return registration

    def _start_leaving(self) -> asyncio.Task[None]:
        """Deregistration starts once (on an ending signal or the end of the process); every
        caller waits for that same run."""
        if self._leaving is None:
            self._leaving = asyncio.create_task(self._leave(), name="dcy-deregister")
        return self._leaving

    async def _leave(self) -> None:
        """Stop registering and checking, then deregister everything."""
        pending = list(self._tasks)
        if self._registrar is not None:
            pending.append(self._registrar)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for registration in self._registrations:
            self._attempted.discard(registration.service_id)
            try:
                await registration.deregister()
                log.info("deregistered %s", registration.service_id)
            except DcyError as exc:
                log.warning(
                    "could not deregister %s (%s): its check fails, and Consul removes it %gs "
                    "after that",
                    registration.service_id,
                    exc,
                    registration.definition.deregister_after,
                )
        if self._attempted and self.dcy.agent is not None:
            for service_id in sorted(self._attempted):
                with contextlib.suppress(DcyError, RuntimeError):
                    await self.dcy.api.deregister_service(service_id)
