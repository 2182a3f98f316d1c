"""app: the orchestrator, and the one place that logs results.

* ``--mode http``: every ``--interval`` seconds it asks a sensor for a reading, sends it to a
  worker and logs the result — the whole workflow in :meth:`App.cycle`, by service name
  through dcy's HTTP client;
* ``--mode nsq``: consumes ``worker_result`` on channel ``app`` and logs each result;
* ``--mode push`` (the coupled variant): workers POST results to ``/result``; it logs them.

With several apps, only the leader (dcy leader election on ``app``) orchestrates or consumes;
the others stand by and take over when it dies. Results are logged to stdout as one JSON line
each (id, values, squares, worker, latency_ms), never twice for one reading id: NSQ delivers at
least once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time
from collections import OrderedDict
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import Counter, Histogram

from dcy import Backoff, DcyError, HttpClient
from svc._nsq import ensure_channel, patiently, start_consumer
from svc._nsq_reader import NsqReader
from svc._readings import BadReading, Result, compact_json, parse_reading, parse_result
from svc._runtime import Runtime, Settings, cannot_heal, serve

log = logging.getLogger("svc.app")

# After a leadership that failed (an outage that outlasted it, an error in the work): bid again
# soon, then at most every few seconds.
CONTEND_BACKOFF = Backoff(base=0.5, cap=5.0)

TOPIC, CHANNEL = "worker_result", "app"


class ResultLog:
    """One JSON line per reading on stdout, each reading id at most once."""

    def __init__(self, remember: int = 1_000_000) -> None:
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._remember = remember
        self._flusher: asyncio.TimerHandle | None = None
        self.logged = 0
        self.duplicates = 0

    def log(self, result: Result) -> bool:
        if result.id in self._seen:
            self.duplicates += 1
            return False
        self._seen[result.id] = None
        if len(self._seen) > self._remember:
            self._seen.popitem(last=False)
        line = {
            "id": result.id,
            "values": list(result.values),
            "result": list(result.squares),
            "worker": result.worker,
            "latency_ms": round((time.time() - result.ts) * 1000, 3),
        }
        sys.stdout.write(compact_json(line) + "\n")
        self.logged += 1
        # Flush soon, not per line: at 10,000 results/s a flush per line costs more than the
        # work itself, and 20 ms is well within what anyone reading the log notices.
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().call_later(0.02, self._flush)
        return True

    def _flush(self) -> None:
        self._flusher = None
        sys.stdout.flush()


class App:
    def __init__(self, settings: Settings, interval: float, ttl: float, lock_delay: float) -> None:
        self.settings = settings
        self.interval = interval
        self.ttl = ttl
        self.lock_delay = lock_delay
        self.results = ResultLog()
        self.runtime: Runtime | None = None
        self.leader = False
        self._task: asyncio.Task[None] | None = None
        self._reader: NsqReader | None = None
        self._failed_cycles = 0
        self._taking_work = True
        self.cycles: Counter | None = None
        self.latency: Histogram | None = None

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/result", self._pushed_result)

    async def start(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.cycles = Counter(
            "app_cycles", "Orchestration cycles", ["outcome"], registry=runtime.registry
        )
        self.latency = Histogram(
            "app_result_latency_seconds",
            "Sensor to app latency",
            registry=runtime.registry,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5),
        )
        if self.settings.mode != "push":
            self._task = asyncio.get_running_loop().create_task(self._lead())

    # -- leadership ------------------------------------------------------------------------
    async def _lead(self) -> None:
        assert self.runtime is not None and self.runtime.dcy is not None
        dcy = self.runtime.dcy
        # The session is bound to this instance's liveness (TCP) check: a killed leader is
        # replaced once Consul's next connect to it fails (--check-interval) plus the
        # lock-delay, not after the session's 2 x TTL. Not to /health: that fails when the app
        # is busy or a peer is away, and a leader would lose its lock under load.
        await self.runtime.registered.wait()
        registration = self.runtime.registration
        assert registration is not None
        retry = CONTEND_BACKOFF.start()
        while self._taking_work:
            try:
                async with dcy.leadership(
                    "app",
                    ttl=self.ttl,
                    lock_delay=self.lock_delay,
                    service_id=registration.service_id,
                    checks=registration.liveness_check_ids,
                ) as lead:
                    self.leader = True
                    self._failed_cycles = 0
                    retry.reset()
                    log.info("leading: %s mode", self.settings.mode)
                    try:
                        await self._work_until(lead.lost)
                    finally:
                        self.leader = False
                        log.info("not leading any more: %s", lead.lost_reason or "stopping")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if cannot_heal(exc):
                    # The token may not lead or reach the peers, or TLS with the agent
                    # fails: contending again cannot help, and an app that looks alive
                    # while doing nothing is worse than one that stops.
                    self.runtime.fail(exc)
                    return
                # Whatever went wrong, an app that stays registered must keep contending:
                # a silently finished task would leave a passing app that does nothing.
                delay = retry.next_delay() or CONTEND_BACKOFF.cap
                log.warning(
                    "leading failed (%s); contending again in %.1fs",
                    exc,
                    delay,
                    exc_info=not isinstance(exc, DcyError),
                )
                await asyncio.sleep(delay)

    async def _work_until(self, lost: asyncio.Event) -> None:
        if self.settings.mode == "nsq":
            assert self.runtime is not None and self.runtime.dcy is not None
            dcy = self.runtime.dcy
            async with aiohttp.ClientSession() as session:
                await patiently("nsqd", lambda: ensure_channel(dcy, session, TOPIC, CHANNEL))
            self._reader = await start_consumer(
                dcy,
                TOPIC,
                CHANNEL,
                self._on_batch,
                max_in_flight=2500,
            )
            try:
                await lost.wait()
            finally:
                await self._reader.close()
                self._reader = None
            return
        assert self.runtime is not None and self.runtime.dcy is not None
        # A cycle's retries fit in its interval; --interval 0 (as fast as possible) still
        # gives them a second, as the client needs a positive budget.
        budget = max(self.interval, 1.0)
        async with self.runtime.dcy.http_client(attempts=3, budget=budget) as client:
            while not lost.is_set():
                started = time.monotonic()
                await self.cycle(client)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        lost.wait(), max(0.0, self.interval - (time.monotonic() - started))
                    )

    # -- the workflow, in one place ----------------------------------------------------------
    async def cycle(self, client: HttpClient) -> None:
        """Ask a sensor, send the reading to a worker, log the result."""
        assert self.cycles is not None
        try:
            async with client.get("http://sensor/") as response:
                response.raise_for_status()
                reading = parse_reading(await response.json())
            async with client.post("http://worker/", json=reading.as_json()) as response:
                response.raise_for_status()
                result = parse_result(await response.json())
        except (aiohttp.ClientError, DcyError, BadReading, ValueError) as exc:
            if cannot_heal(exc):
                raise  # ends the leadership, and the app (see _lead)
            self._failed_cycles += 1
            self.cycles.labels("failed").inc()
            log.warning("cycle failed: %s", exc)
            return
        self._failed_cycles = 0
        self.cycles.labels("ok").inc()
        self._log(result)

    def _log(self, result: Result) -> None:
        if self.results.log(result) and self.latency is not None:
            self.latency.observe(max(0.0, time.time() - result.ts))

    def _on_batch(self, bodies: list[bytes]) -> None:
        for body in bodies:
            try:
                result = parse_result(body)
            except BadReading as exc:
                log.error("dropping malformed result: %s: %r", exc, body[:200])
                continue
            self._log(result)

    async def _pushed_result(self, request: web.Request) -> web.Response:
        if not self._taking_work:
            return web.json_response({"error": "shutting down"}, status=503)
        try:
            result = parse_result(await request.read())
        except BadReading as exc:
            return web.json_response({"error": f"bad result: {exc}"}, status=400)
        self._log(result)
        return web.json_response({"id": result.id, "logged": True})

    # -- lifecycle ---------------------------------------------------------------------------
    async def hand_over(self) -> None:
        """Step down while still registered: leaving Consul first would end the session with
        the instance's liveness check, and the standby would wait out the lock-delay. Intake
        goes on until deregistered (push mode still takes results meanwhile)."""
        if self._task is None:
            return
        self._task.cancel()
        (outcome,) = await asyncio.gather(self._task, return_exceptions=True)
        if isinstance(outcome, Exception):
            log.warning("leadership ended with an error while stepping down: %s", outcome)

    async def stop_intake(self) -> None:
        self._taking_work = False
        if self._reader is not None:
            self._reader.set_max_in_flight(0)

    async def drain(self) -> None:
        if self._reader is not None:
            await self._reader.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        sys.stdout.flush()

    def not_ready(self) -> str | None:
        if not self._taking_work:
            return "shutting down"
        if self.leader and self.settings.mode == "http" and self._failed_cycles >= 3:
            return f"{self._failed_cycles} cycles in a row failed: sensor or worker unreachable"
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "leader": self.leader,
            "logged": self.results.logged,
            "duplicates": self.results.duplicates,
        }


def _extend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--interval", type=float, default=1.0, help="http mode: seconds between cycles (default 1)"
    )
    parser.add_argument(
        "--leader-ttl", type=float, default=10.0, help="leader session TTL (Consul minimum 10s)"
    )
    parser.add_argument(
        "--lock-delay",
        type=float,
        default=1.0,
        help="seconds a lost leader's lock stays blocked (one host: 1s)",
    )


def main(argv: list[str] | None = None) -> int:
    return serve(
        "app",
        "Orchestrates sensor and worker and logs results.",
        lambda settings, args: App(settings, args.interval, args.leader_ttl, args.lock_delay),
        _extend,
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
