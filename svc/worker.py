"""worker: squares the numbers of each reading (the "heavy computation").

* every mode: ``POST /`` with a reading returns its result ``{id, ts, values, squares,
  worker}``; a malformed reading gets 400 with the reason;
* ``--mode nsq``: consumes ``sensor_values`` on channel ``worker`` (workers share the load)
  and publishes results to ``worker_result``; a message is finished only once its result is
  accepted by nsqd, so a killed worker loses nothing (NSQ delivers it again);
* ``--mode push``: ``POST /push`` computes and pushes the result to an app's ``/result``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import aiohttp
from aiohttp import web
from prometheus_client import Counter

from dcy import DcyError, HttpClient
from svc._nsq import (
    BatchPublisher,
    ensure_channel,
    nsqd_http_url,
    patiently,
    start_consumer,
)
from svc._nsq_reader import NsqReader
from svc._readings import BadReading, parse_reading, square
from svc._runtime import Runtime, Settings, cannot_heal, serve

log = logging.getLogger("svc.worker")
IN_TOPIC, CHANNEL, OUT_TOPIC = "sensor_values", "worker", "worker_result"


class Worker:
    def __init__(self, settings: Settings, max_in_flight: int, msg_timeout: float = 10.0) -> None:
        self.settings = settings
        self.max_in_flight = max_in_flight
        self.msg_timeout = msg_timeout
        self.runtime: Runtime | None = None
        self.reader: NsqReader | None = None
        self.publisher: BatchPublisher | None = None
        self._session: aiohttp.ClientSession | None = None
        self._client: HttpClient | None = None
        self._taking_work = True
        self.processed: Counter | None = None
        self.rejected: Counter | None = None

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/", self._compute)
        app.router.add_post("/push", self._push)

    async def _read(self, request: web.Request) -> tuple[object, web.Response | None]:
        if not self._taking_work:
            return None, web.json_response({"error": "shutting down"}, status=503)
        try:
            reading = parse_reading(await request.read())
        except BadReading as exc:
            if self.rejected is not None:
                self.rejected.inc()
            return None, web.json_response({"error": f"bad reading: {exc}"}, status=400)
        return reading, None

    async def _compute(self, request: web.Request) -> web.Response:
        reading, error = await self._read(request)
        if error is not None:
            return error
        result = square(reading, self.settings.instance)  # type: ignore[arg-type]
        self._count("http")
        return web.json_response(result.as_json())

    async def _push(self, request: web.Request) -> web.Response:
        reading, error = await self._read(request)
        if error is not None:
            return error
        assert self._client is not None
        result = square(reading, self.settings.instance)  # type: ignore[arg-type]
        try:
            async with self._client.post("http://app/result", json=result.as_json()) as resp:
                resp.raise_for_status()
        except (aiohttp.ClientError, DcyError) as exc:
            if cannot_heal(exc) and self.runtime is not None:
                self.runtime.fail(exc)
            return web.json_response({"error": f"app unreachable: {exc}"}, status=502)
        self._count("push")
        return web.json_response({"id": result.id, "pushed": True}, status=202)

    def _count(self, via: str) -> None:
        if self.processed is not None:
            self.processed.labels(via).inc()

    async def start(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.processed = Counter(
            "worker_processed", "Readings squared", ["via"], registry=runtime.registry
        )
        self.rejected = Counter(
            "worker_rejected", "Malformed readings refused", registry=runtime.registry
        )
        assert runtime.dcy is not None
        if self.settings.mode == "push":
            self._client = await runtime.dcy.http_client(attempts=3, budget=2.0).__aenter__()
        if self.settings.mode != "nsq":
            return
        dcy = runtime.dcy
        self._session = aiohttp.ClientSession()
        self.publisher = BatchPublisher(self._session, lambda: nsqd_http_url(dcy))
        session = self._session
        await patiently("nsqd", lambda: ensure_channel(dcy, session, IN_TOPIC, CHANNEL))
        self.reader = await start_consumer(
            dcy,
            IN_TOPIC,
            CHANNEL,
            self._on_batch,
            max_in_flight=self.max_in_flight,
            msg_timeout=self.msg_timeout,
        )

    def _on_batch(self, bodies: list[bytes]) -> asyncio.Future[None] | None:
        """The batch is finished once its results, published in one go, are accepted."""
        assert self.publisher is not None
        results: list[bytes] = []
        for body in bodies:
            try:
                reading = parse_reading(body)
            except BadReading as exc:
                # Redelivering a malformed message cannot fix it: log it and let it go.
                log.error("dropping malformed message: %s: %r", exc, body[:200])
                if self.rejected is not None:
                    self.rejected.inc()
                continue
            results.append(square(reading, self.settings.instance).encode())
        if not results:
            return None
        if self.processed is not None:
            self.processed.labels("nsq").inc(len(results))
        return self.publisher.publish_many(OUT_TOPIC, results)

    async def hand_over(self) -> None:
        pass  # nothing another instance takes over

    async def stop_intake(self) -> None:
        self._taking_work = False
        if self.reader is not None:
            # RDY 0 everywhere: no new messages; those in flight still finish.
            self.reader.set_max_in_flight(0)

    async def drain(self) -> None:
        # HTTP requests in flight finish in the runtime's server shutdown after this.
        if self.reader is not None:
            # Waits for the batches in hand (their results published), finishes them.
            await self.reader.close()
        if self._client is not None:
            await self._client.aclose()
        if self.publisher is not None:
            await self.publisher.aclose()
        if self._session is not None:
            await self._session.close()

    def not_ready(self) -> str | None:
        if not self._taking_work:
            return "shutting down"
        if self.publisher is not None and self.publisher.last_error:
            return f"nsqd unreachable: {self.publisher.last_error}"
        return None


def _extend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=2000,
        help="nsq mode: messages in flight at once (default 2000)",
    )
    parser.add_argument(
        "--msg-timeout",
        type=_msg_timeout,
        default=10.0,
        help="nsq mode: seconds before nsqd hands a reading this worker has not finished to "
        "another worker, e.g. after a crash (default 10; nsqd's own default is 60)",
    )


def _msg_timeout(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 1 <= seconds <= 900:
        raise argparse.ArgumentTypeError(f"{text}: nsqd takes 1 to 900 seconds (--max-msg-timeout)")
    return seconds


def main(argv: list[str] | None = None) -> int:
    return serve(
        "worker",
        "Squares the numbers of each reading.",
        lambda settings, args: Worker(settings, args.max_in_flight, args.msg_timeout),
        _extend,
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
