"""NSQ for the services: every daemon found through Consul, publishing in batches.

* nsqd is the ``nsqd`` service (its HTTP port in meta ``http_port``), the instance on this
  node preferred; consumers find nsqds through every passing ``nsqlookupd``.
* :class:`BatchPublisher` gathers messages per topic and sends them with one ``/mpub``
  request (one HTTP request per message caps out far below what nsqd takes). A publish
  resolves only once nsqd accepted its batch; batches that failed for a passing reason (no
  nsqd, a refused connection, a 5xx) are retried under dcy's one retry policy, against a
  freshly resolved nsqd, until they are accepted or the publisher is closed: nothing is
  dropped. A batch nsqd refuses (a 4xx: a bad topic, a message too big) fails its futures.
* :func:`transient` is what the services wait out (:func:`patiently`, publishing, the NSQ
  consumer's reconnects): dcy's transient errors, network errors, 5xx answers.
* :func:`start_consumer` runs our batch consumer (:mod:`svc._nsq_reader`) on this loop,
  polling the nsqlookupds that Consul names as they come and go.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import aiohttp

from dcy import (
    Backoff,
    Dcy,
    DcyError,
    Instance,
    LookupFailed,
    Retry,
    Snapshot,
    is_transient,
    retrying,
)
from svc._nsq_reader import BatchHandler, NsqReader

log = logging.getLogger("svc.nsq")
T = TypeVar("T")

# Waiting for a daemon that is starting: it usually answers within a second or two.
STARTUP_BACKOFF = Backoff(base=0.1, cap=2.0)
PUBLISH_BACKOFF = Backoff(base=0.05, cap=2.0)


def transient(exc: BaseException) -> bool:
    """Whether waiting may cure ``exc``: dcy's transient errors, no passing instance of a
    daemon yet (it is starting, or restarting), connections refused or broken, timeouts,
    and answers that say "not now" (429, 5xx)."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return exc.status == 429 or exc.status >= 500
    return is_transient(exc) or isinstance(
        exc, LookupFailed | aiohttp.ClientError | OSError | TimeoutError
    )


async def nsqd_http_url(dcy: Dcy) -> str:
    """The HTTP address of an nsqd, preferring the one on this node."""
    instances = await passing_instances(dcy, "nsqd")
    assert dcy.agent is not None
    local = [i for i in instances if i.node == dcy.agent.node_name]
    chosen = (local or list(instances))[0]
    return f"http://{_http_hostport(chosen)}"


async def ensure_channel(
    dcy: Dcy, session: aiohttp.ClientSession, topic: str, channel: str
) -> None:
    """Create the topic and channel on every nsqd up front: messages published before the
    first consumer connects then wait in the channel, and lookupd can name the producers at
    once instead of after a poll interval."""
    for instance in await passing_instances(dcy, "nsqd"):
        base = f"http://{_http_hostport(instance)}"
        for path, params in (
            ("/topic/create", {"topic": topic}),
            ("/channel/create", {"topic": topic, "channel": channel}),
        ):
            async with session.post(base + path, params=params) as response:
                if response.status != 200:
                    detail = (await response.text()).strip()
                    raise aiohttp.ClientResponseError(
                        response.request_info,
                        response.history,
                        status=response.status,
                        message=f"nsqd {base} refused {path} for {topic}/{channel}: {detail}",
                    )


async def patiently(what: str, attempt: Callable[[], Awaitable[T]]) -> T:
    """Retry ``attempt`` until it succeeds: a service started before NSQ is up (or before
    Consul has seen it pass) waits for it instead of dying. Only what waiting can cure is
    retried (:func:`transient`); anything else is raised."""

    def report(exc: BaseException, retry: Retry, delay: float) -> None:
        if retry.failures == 1 or retry.failures % 30 == 0:
            log.warning("waiting for %s: %s", what, exc)

    return await retrying(attempt, STARTUP_BACKOFF, retry_if=transient, on_retry=report)


async def lookupd_http_addresses(dcy: Dcy) -> list[str]:
    return passing_lookupd_urls(await passing_instances(dcy, "nsqlookupd"))


async def passing_instances(dcy: Dcy, name: str) -> tuple[Instance, ...]:
    """The passing instances of ``name``; NoHealthyInstances or ServiceNotFound (which
    :func:`patiently` waits out) when there is none yet."""
    await dcy.pick(name)  # raises the LookupFailed that says why there is none
    return await dcy.instances(name)


def _http_hostport(instance: Instance) -> str:
    port = instance.meta.get("http_port") or str(instance.port + 1)
    host = f"[{instance.address}]" if ":" in instance.address else instance.address
    return f"{host}:{port}"


@dataclass
class _Batch:
    bodies: list[bytes] = field(default_factory=list)
    # (number of bodies queued up to and including a caller's, the future it waits on)
    waiters: list[tuple[int, asyncio.Future[None]]] = field(default_factory=list)


class BatchPublisher:
    """Publishes to nsqd over HTTP ``/mpub``, batching what arrives within ``linger``.

    Only a busy topic (a batch sent within the last ``busy_window`` seconds) lingers: a lone
    message goes out at once, so a reading a second is not delayed, while under load each
    request carries many messages (a request per message costs the publisher more CPU than
    the message itself)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        resolve: Callable[[], Awaitable[str]],
        *,
        max_batch: int = 1000,
        linger: float = 0.002,
        busy_window: float = 0.05,
    ) -> None:
        self._session = session
        self._resolve = resolve
        self._max_batch = max_batch
        self._linger = linger
        self._busy_window = busy_window
        self._last_sent: dict[str, float] = {}
        self._pending: dict[str, _Batch] = {}
        self._flushers: dict[str, asyncio.Task[None]] = {}
        self._url: str | None = None
        self._closed = False
        self.published = 0
        self.failures = 0
        self.last_error: str | None = None

    def publish_nowait(self, topic: str, body: bytes) -> asyncio.Future[None]:
        """Queue one message; the future resolves once nsqd accepted it."""
        return self.publish_many(topic, [body])

    def publish_many(self, topic: str, bodies: list[bytes]) -> asyncio.Future[None]:
        """Queue messages; one future for all of them, resolved once nsqd accepted the last
        (a future per message costs more than the message at thousands a second)."""
        if self._closed:
            raise RuntimeError("publisher is closed")
        if any(b"\n" in body for body in bodies):
            raise ValueError("an /mpub message cannot contain a newline")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if not bodies:
            future.set_result(None)
            return future
        batch = self._pending.setdefault(topic, _Batch())
        batch.bodies.extend(bodies)
        batch.waiters.append((len(batch.bodies), future))
        if topic not in self._flushers:
            self._flushers[topic] = loop.create_task(self._flush(topic))
        return future

    async def publish(self, topic: str, body: bytes) -> None:
        await self.publish_nowait(topic, body)

    async def _flush(self, topic: str) -> None:
        try:
            while self._pending.get(topic) and self._pending[topic].bodies:
                loop = asyncio.get_running_loop()
                busy = loop.time() - self._last_sent.get(topic, -math.inf) < self._busy_window
                if busy and self._linger and len(self._pending[topic].bodies) < self._max_batch:
                    await asyncio.sleep(self._linger)
                batch = self._pending.pop(topic)
                await self._send(topic, batch)
                self._last_sent[topic] = loop.time()
        finally:
            self._flushers.pop(topic, None)

    async def _send(self, topic: str, batch: _Batch) -> None:
        retry = PUBLISH_BACKOFF.start()
        waiters = iter(batch.waiters)
        waiter = next(waiters, None)
        for start in range(0, len(batch.bodies), self._max_batch):
            bodies = batch.bodies[start : start + self._max_batch]
            refused: BaseException | None = None
            while True:
                try:
                    await self._post(topic, bodies)
                    break
                except (aiohttp.ClientError, OSError, TimeoutError, DcyError) as exc:
                    self.failures += 1
                    self.last_error = str(exc)
                    if not transient(exc):
                        log.error("nsqd refused a batch for %s: %s", topic, exc)
                        refused = exc
                        break
                    self._url = None  # nsqd may have moved: resolve again
                    delay = retry.next_delay() or PUBLISH_BACKOFF.cap
                    if retry.failures in (1, 10) or retry.failures % 100 == 0:
                        log.warning("publishing to %s failed (%s); retrying", topic, exc)
                    await asyncio.sleep(delay)
            retry.reset()
            if refused is None:
                self.published += len(bodies)
                self.last_error = None
            accepted = start + len(bodies)
            while waiter is not None and waiter[0] <= accepted:
                if not waiter[1].done():
                    if refused is None:
                        waiter[1].set_result(None)
                    else:
                        waiter[1].set_exception(refused)
                waiter = next(waiters, None)

    async def _post(self, topic: str, bodies: list[bytes]) -> None:
        if self._url is None:
            self._url = await self._resolve()
        async with self._session.post(
            f"{self._url}/mpub",
            params={"topic": topic},
            data=b"\n".join(bodies),
            timeout=aiohttp.ClientTimeout(total=5),
        ) as response:
            if response.status != 200:
                text = await response.text()
                raise aiohttp.ClientResponseError(
                    response.request_info, (), status=response.status, message=text.strip()
                )

    async def drain(self) -> None:
        """Wait until everything queued so far is accepted."""
        while self._flushers:
            await asyncio.gather(*self._flushers.values(), return_exceptions=True)

    async def aclose(self) -> None:
        await self.drain()
        self._closed = True


async def start_consumer(
    dcy: Dcy,
    topic: str,
    channel: str,
    handler: BatchHandler,
    *,
    max_in_flight: int = 1000,
    msg_timeout: float | None = None,
    lookupd_poll_interval: float = 2.0,
) -> NsqReader:
    """A started batch consumer on the running loop, once Consul names a passing nsqlookupd.

    The reader follows the ``nsqlookupd`` service through a dcy watch: lookupds that start
    passing are polled from then on, those that leave or fail are dropped, without a
    restart (while none passes, the last known ones are kept). Each batch is finished only
    after ``handler`` completed (at-least-once); a handler error requeues the batch with
    backoff. nsqd gives a message to another consumer once it was ``msg_timeout`` seconds in
    flight untouched (its own default, 60s, when None); the reader touches batches still in
    hand every half of it."""
    lookupds = await patiently("nsqlookupd", lambda: lookupd_http_addresses(dcy))
    reader = NsqReader(
        topic,
        channel,
        lookupds,
        handler,
        max_in_flight=max_in_flight,
        lookupd_poll_interval=lookupd_poll_interval,
        # Unbuffered (the reader's default): nsqd's output buffer would hold each reading for
        # up to its flush timer, and its timer wake-ups share a channel's flow unevenly.
        output_buffer_size=-1,
        msg_timeout_ms=None if msg_timeout is None else round(msg_timeout * 1000),
    )

    def follow(snapshot: Snapshot[tuple[Instance, ...]]) -> None:
        urls = passing_lookupd_urls(snapshot.value)
        if urls:
            reader.set_lookupds(urls)
        else:
            log.warning("no passing nsqlookupd in Consul; still polling %s", reader.lookupds)

    subscription = dcy.subscribe("nsqlookupd", follow)
    reader.close_with(subscription.aclose)
    return reader.start()


def passing_lookupd_urls(instances: Iterable[Instance]) -> list[str]:
    return [f"http://{i.hostport}" for i in instances if i.status == "passing"]
