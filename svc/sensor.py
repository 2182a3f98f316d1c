"""sensor: makes readings of three random numbers.

* every mode: ``GET /`` returns a fresh reading ``{id, ts, values}``;
* ``--mode nsq``: publishes readings to topic ``sensor_values`` at ``--rate`` per second
  (``--burst N`` publishes N readings as fast as nsqd takes them first, for benchmarks);
* ``--mode push`` (the coupled variant): POSTs each reading to a worker's ``/push``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys

import aiohttp
from aiohttp import web
from prometheus_client import Counter

from dcy import DcyError
from svc._nsq import BatchPublisher, nsqd_http_url
from svc._readings import ReadingSource
from svc._runtime import Runtime, Settings, cannot_heal, serve

log = logging.getLogger("svc.sensor")
TOPIC = "sensor_values"


class Sensor:
    def __init__(self, settings: Settings, rate: float, burst: int) -> None:
        self.settings = settings
        self.rate = rate
        self.burst = burst
        self.source = ReadingSource(settings.instance)
        self.runtime: Runtime | None = None
        self.publisher: BatchPublisher | None = None
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.Task[None] | None = None
        self._push_failures = 0
        self.readings: Counter | None = None

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._reading)

    async def _reading(self, _: web.Request) -> web.Response:
        reading = self.source.next()
        if self.readings is not None:
            self.readings.labels("http").inc()
        return web.json_response(reading.as_json())

    async def start(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.readings = Counter(
            "sensor_readings", "Readings made", ["via"], registry=runtime.registry
        )
        if self.settings.mode == "nsq":
            assert runtime.dcy is not None
            dcy = runtime.dcy
            self._session = aiohttp.ClientSession()
            self.publisher = BatchPublisher(self._session, lambda: nsqd_http_url(dcy))
            self._loop = asyncio.get_running_loop().create_task(self._publish_loop())
        elif self.settings.mode == "push":
            self._loop = asyncio.get_running_loop().create_task(self._push_loop())

    async def _publish_loop(self) -> None:
        assert self.runtime is not None
        try:
            await self._publish()
        except Exception as exc:
            # The publisher retries what passes (an outage, nsqd restarting); what reaches
            # here will not heal: a refusal (the token may not read nsqd) or a batch nsqd
            # refuses (a 4xx). Stop, with exit status 1, instead of serving on while
            # publishing nothing.
            self.runtime.fail(exc)

    async def _publish(self) -> None:
        assert self.publisher is not None and self.readings is not None
        if self.burst:
            await self.publisher.publish_many(
                TOPIC, [self.source.next().encode() for _ in range(self.burst)]
            )
            self.readings.labels("nsq").inc(self.burst)
            log.info("burst of %d readings published", self.burst)
        while self.rate > 0:
            await self.publisher.publish(TOPIC, self.source.next().encode())
            self.readings.labels("nsq").inc()
            await asyncio.sleep(1 / self.rate)

    async def _push_loop(self) -> None:
        assert self.runtime is not None and self.runtime.dcy is not None
        assert self.readings is not None
        async with self.runtime.dcy.http_client(attempts=3, budget=2.0) as client:
            while self.rate > 0:
                reading = self.source.next()
                try:
                    async with client.post("http://worker/push", json=reading.as_json()) as resp:
                        resp.raise_for_status()
                    self._push_failures = 0
                    self.readings.labels("push").inc()
                except (aiohttp.ClientError, DcyError) as exc:
                    if cannot_heal(exc):
                        self.runtime.fail(exc)
                        return
                    self._push_failures += 1
                    log.warning("push of %s failed: %s", reading.id, exc)
                await asyncio.sleep(1 / self.rate)

    async def hand_over(self) -> None:
        pass  # nothing another instance takes over

    async def stop_intake(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop

    async def drain(self) -> None:
        if self.publisher is not None:
            await self.publisher.aclose()
            # The count a consumer can check itself against: every reading up to this one
            # was accepted by nsqd.
            log.info("published %d readings to nsqd", self.publisher.published)
        if self._session is not None:
            await self._session.close()

    def not_ready(self) -> str | None:
        if self.publisher is not None and self.publisher.last_error:
            return f"nsqd unreachable: {self.publisher.last_error}"
        if self._push_failures >= 3:
            return "no worker accepts pushed readings"
        return None


def _extend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rate",
        type=float,
        default=1.0,
        help="readings per second in nsq and push modes (default 1)",
    )
    parser.add_argument(
        "--burst", type=int, default=0, help="nsq mode: publish this many readings at once first"
    )


def main(argv: list[str] | None = None) -> int:
    return serve(
        "sensor",
        "Makes readings of three random numbers.",
        lambda settings, args: Sensor(settings, args.rate, args.burst),
        _extend,
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
