"""An asyncio NSQ consumer built for throughput: messages are handled in batches.

Written from NSQ's TCP protocol spec (https://nsq.io/clients/tcp_protocol_spec.html): a
generic client costs ~100 µs of CPU per message (an object, a callback and a system call per
FIN), more than our services spend on the message itself. Here every complete frame nsqd sent
is parsed in one pass when the socket is read (:mod:`svc._nsq_frames`), the handler gets all
of their bodies at once, and the whole batch is finished (FIN) in one write once the handler
is done.

* Discovery: every nsqlookupd is asked ``/lookup?topic=`` at start and every
  ``lookupd_poll_interval`` seconds, each by its own poller (a hanging one delays no other);
  :meth:`NsqReader.set_lookupds` changes the list while running (the services follow the
  ``nsqlookupd`` service in Consul). Each producer gets a connection, reconnected with
  backoff while a lookupd still names it.
* Negotiation: nsqd's IDENTIFY answer sets the connection's RDY ceiling (``max_rdy_count``),
  its message timeout (``msg_timeout``, ``max_msg_timeout``); the largest frame accepted is
  derived from nsqd's ``--max-msg-size`` (asked over its HTTP API, else nsqd's default).
* Malformed frames: a frame whose header cannot be right (size below 4 or above the
  negotiated maximum, an unknown type, a message shorter than its header) closes that
  connection with the reason logged; it is reconnected with backoff like any lost one.
* Liveness: nsqd sends a heartbeat every ``heartbeat_interval``; a connection that received
  nothing for ``HEARTBEAT_TIMEOUT_INTERVALS`` of them is dead (a half-open TCP connection
  would hold its messages forever) and is dropped and reconnected, whatever lookupd says.
* Flow control: ``max_in_flight`` is split evenly across the ready connections (``RDY``); nsqd
  never has more messages in flight to a connection than its RDY count.
* Work in progress: while a batch's handler has not completed, its messages are touched
  (``TOUCH``) every half message timeout, so nsqd does not give them to another consumer.
* At least once: a message is finished only after the handler for its batch completed; a
  lost connection leaves its messages to nsqd, which delivers them again after their timeout.
  Messages are never dropped for having been tried too often, only logged.
* Backoff: a batch whose handler raised is requeued (``REQ``) with a delay from dcy's one
  retry policy, and every connection stops taking messages (RDY 0) for that delay; then one
  connection takes one message at a time (RDY 1) until a batch succeeds, which restores the
  full RDY. Another failure backs off again, for longer.
* Unbuffered delivery by default: nsqd writes each message to the socket as it is sent. With
  its output buffering on, nsqd flushes on a per-connection timer, and the wake-ups of that
  timer reorder the consumers waiting for the channel's next message: on a steady flow one
  consumer of three took 40% of the messages, run after run, instead of a third (unbuffered
  it is an exact rotation). Bursts lost no throughput by it (bench/pipeline.py): one read
  still parses every frame that has arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import aiohttp

from dcy import Backoff
from svc._nsq_frames import (
    DEFAULT_MAX_MSG_SIZE,
    FRAME_RESPONSE,
    HEADER_SIZE,
    MalformedFrame,
    NsqProtocolError,
    max_frame_size,
    parse_frames,
)

__all__ = ["BatchHandler", "MalformedFrame", "NsqProtocolError", "NsqReader"]

log = logging.getLogger("svc.nsq.reader")

# Reconnecting to an nsqd (dcy's one retry policy; the cap is the reader's backoff_cap).
RECONNECT_BACKOFF = Backoff(base=0.05, cap=2.0)
# After a handler failed: how long no connection takes messages (and the failed batch waits
# in nsqd before it is delivered again). Grows with failures in a row; a success resets it.
HANDLER_BACKOFF = Backoff(base=0.5, cap=30.0)
# A connection that lived this long (seconds) was not a failed attempt.
STABLE_CONNECTION = 5.0
# A connection that received nothing for this many heartbeat intervals is dead. nsqd itself
# drops a client that stays silent for two of them.
HEARTBEAT_TIMEOUT_INTERVALS = 2
# nsqd's defaults, for an nsqd that answers IDENTIFY with a bare OK (no negotiation).
DEFAULT_MSG_TIMEOUT = 60.0
DEFAULT_MAX_MSG_TIMEOUT = 15 * 60.0

# handler(bodies) finishes its work at once (returns None) or returns what to wait for.
BatchHandler = Callable[[list[bytes]], Awaitable[None] | None]

MAGIC = b"  V2"
HEARTBEAT = b"_heartbeat_"
# Errors after which nsqd keeps the connection open (the spec's non-fatal ones).
_HARMLESS_ERRORS = (b"E_FIN_FAILED", b"E_REQ_FAILED", b"E_TOUCH_FAILED")


@dataclass(slots=True)
class _InHand:
    """A batch whose handler is still working: touched until it completes."""

    ids: list[bytes]
    received_at: float
    touch: asyncio.TimerHandle | None = None


class _Connection(asyncio.Protocol):
    """One nsqd connection: frames in, commands out; the batching lives here."""

    def __init__(self, reader: NsqReader, address: str, max_msg_size: int) -> None:
        self.reader = reader
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.ready = False  # subscribed: messages may flow
        self.rdy = 0  # the RDY count last sent
        self.remaining = 0  # messages nsqd may still send before we renew RDY
        self.in_flight = 0
        # Until IDENTIFY tells: nsqd's defaults, or what we asked for.
        self.max_rdy = 2500
        self.max_frame = max_frame_size(max_msg_size)
        requested = reader.identify.get("msg_timeout")
        self.msg_timeout = requested / 1000 if requested else DEFAULT_MSG_TIMEOUT
        self.max_msg_timeout = DEFAULT_MAX_MSG_TIMEOUT
        # nsqd's heartbeat_interval -1 turns heartbeats off, and with them this check.
        interval = reader.identify["heartbeat_interval"] / 1000
        self.heartbeat_timeout = HEARTBEAT_TIMEOUT_INTERVALS * interval if interval > 0 else None
        loop = self._loop = asyncio.get_running_loop()
        self.last_read = loop.time()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._close_acknowledged: asyncio.Future[None] = loop.create_future()
        self._buffer = bytearray()
        self._responses: asyncio.Queue[bytes | NsqProtocolError] = asyncio.Queue()
        self._liveness: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.last_read = self._loop.time()
        if self.heartbeat_timeout is not None:
            self._liveness = self._loop.call_later(self.heartbeat_timeout, self._check_alive)

    def connection_lost(self, exc: Exception | None) -> None:
        self.ready = False
        if self._liveness is not None:
            self._liveness.cancel()
        self._responses.put_nowait(NsqProtocolError(f"connection lost: {exc or 'closed'}"))
        if not self.closed.done():
            self.closed.set_result(None)
        self.reader._connection_gone(self)

    def data_received(self, data: bytes) -> None:
        self.last_read = self._loop.time()
        buffer = self._buffer
        buffer += data
        if len(buffer) < HEADER_SIZE:
            return
        try:
            frames = parse_frames(buffer, self.max_frame)
        except MalformedFrame as exc:
            self._malformed(exc)
            return
        del buffer[: frames.consumed]
        for kind, reply in frames.replies:
            if kind == FRAME_RESPONSE:
                self._on_response(reply)
            else:
                self._on_error(reply)
        if frames.ids:
            self._on_messages(frames.ids, frames.bodies, frames.most_attempts)

    def _malformed(self, exc: MalformedFrame) -> None:
        """Past a bad header the stream cannot be read: drop the connection (nsqd delivers
        its unfinished messages again) and let the reader reconnect."""
        log.error("nsqd %s sent a malformed frame: %s; closing the connection", self.address, exc)
        self.reader.malformed_frames += 1
        self._buffer.clear()
        self._responses.put_nowait(exc)
        self.ready = False
        if self.transport is not None:
            self.transport.abort()

    def _check_alive(self) -> None:
        self._liveness = None
        assert self.heartbeat_timeout is not None
        if self.transport is None or self.transport.is_closing():
            return
        silent = self._loop.time() - self.last_read
        if silent >= self.heartbeat_timeout:
            log.warning(
                "nsqd %s: nothing received for %.1fs (%d heartbeat intervals); reconnecting",
                self.address,
                silent,
                HEARTBEAT_TIMEOUT_INTERVALS,
            )
            self.reader.heartbeat_timeouts += 1
            self.transport.abort()
            return
        self._liveness = self._loop.call_later(self.heartbeat_timeout - silent, self._check_alive)

    # -- frames ----------------------------------------------------------------------------
    def _on_response(self, data: bytes) -> None:
        if data == HEARTBEAT:
            self.reader.heartbeats += 1
            self.write(b"NOP\n")
        elif data == b"CLOSE_WAIT":
            if not self._close_acknowledged.done():
                self._close_acknowledged.set_result(None)
        elif not self.ready:
            self._responses.put_nowait(data)
        else:
            log.debug("nsqd %s said %r", self.address, data[:100])

    def _on_error(self, data: bytes) -> None:
        if not self.ready:
            self._responses.put_nowait(NsqProtocolError(data.decode(errors="replace")))
        elif data.startswith(_HARMLESS_ERRORS):
            log.warning("nsqd %s: %s", self.address, data.decode(errors="replace"))
        else:
            log.error("nsqd %s: %s; closing", self.address, data.decode(errors="replace"))
            self.close()

    def _on_messages(self, ids: list[bytes], bodies: list[bytes], most_attempts: int) -> None:
        reader = self.reader
        self.in_flight += len(ids)
        self.remaining -= len(ids)
        if reader.warn_attempts and most_attempts > reader.warn_attempts:
            log.warning(
                "%s/%s: a message was delivered %d times (it keeps failing?)",
                reader.topic,
                reader.channel,
                most_attempts,
            )
        if reader.closing:
            self._settle(ids, ok=False, delay_ms=0)
            return
        try:
            outcome = reader.handler(bodies)
        except Exception:
            log.exception("handling %d %s messages failed", len(ids), reader.topic)
            reader._batch_failed(self, ids)
            return
        if outcome is None:
            self._settle(ids, ok=True)
            reader._batch_succeeded()
            return
        future = asyncio.ensure_future(outcome)
        reader._handling.add(future)
        batch = _InHand(ids, self._loop.time())
        if not future.done():
            batch.touch = self._loop.call_later(self.msg_timeout / 2, self._touch, batch, future)
        future.add_done_callback(lambda done: self._handled(done, batch))

    def _touch(self, batch: _InHand, future: asyncio.Future[None]) -> None:
        """Tell nsqd the batch is still being worked on: each TOUCH restarts its messages'
        timeout, up to nsqd's max_msg_timeout after their delivery."""
        batch.touch = None
        if future.done() or self.transport is None or self.transport.is_closing():
            return
        self.write(b"".join(b"TOUCH %s\n" % message_id for message_id in batch.ids))
        self.reader.touches += len(batch.ids)
        held = self._loop.time() - batch.received_at
        if held + self.msg_timeout >= self.max_msg_timeout:
            log.warning(
                "%d %s messages in hand for %.0fs: at nsqd's max_msg_timeout (%.0fs) they are "
                "delivered again",
                len(batch.ids),
                self.reader.topic,
                held,
                self.max_msg_timeout,
            )
            return
        batch.touch = self._loop.call_later(self.msg_timeout / 2, self._touch, batch, future)

    def _handled(self, future: asyncio.Future[None], batch: _InHand) -> None:
        self.reader._handling.discard(future)
        if batch.touch is not None:
            batch.touch.cancel()
        error = None if future.cancelled() else future.exception()
        if future.cancelled() or error is not None:
            log.error(
                "handling %d %s messages failed",
                len(batch.ids),
                self.reader.topic,
                exc_info=error,
            )
            self.reader._batch_failed(self, batch.ids)
        else:
            self._settle(batch.ids, ok=True)
            self.reader._batch_succeeded()

    def _settle(self, ids: list[bytes], *, ok: bool, delay_ms: int = 0) -> None:
        """FIN (or REQ) a batch in one write, renewing RDY in the same write when due."""
        self.in_flight -= len(ids)
        if self.transport is None or self.transport.is_closing():
            return  # nsqd delivers them again once they time out
        if ok:
            commands = b"FIN " + b"\nFIN ".join(ids) + b"\n"
        else:
            commands = b"".join(b"REQ %s %d\n" % (i, delay_ms) for i in ids)
        if self.ready and self.rdy > 0 and (self.remaining <= 1 or self.remaining < self.rdy // 4):
            commands += b"RDY %d\n" % self.rdy
            self.remaining = self.rdy
        self.transport.write(commands)

    # -- commands --------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send_rdy(self, count: int) -> None:
        count = min(count, self.max_rdy)
        if count != self.rdy:
            self.rdy = self.remaining = count
            self.write(b"RDY %d\n" % count)

    async def _response(self, timeout: float) -> bytes:
        outcome = await asyncio.wait_for(self._responses.get(), timeout)
        if isinstance(outcome, NsqProtocolError):
            raise outcome
        return outcome

    async def handshake(self, identify: dict[str, Any], timeout: float) -> None:
        body = json.dumps(identify).encode()
        self.write(MAGIC + b"IDENTIFY\n" + struct.pack(">l", len(body)) + body)
        answer = await self._response(timeout)
        if answer != b"OK":  # feature negotiation: nsqd's settings, as JSON
            self._negotiated(answer)
        topic, channel = self.reader.topic, self.reader.channel
        self.write(b"SUB %s %s\n" % (topic.encode(), channel.encode()))
        answer = await self._response(timeout)
        if answer != b"OK":
            raise NsqProtocolError(f"SUB answered {answer!r}")
        self.ready = True

    def _negotiated(self, answer: bytes) -> None:
        try:
            settings = json.loads(answer)
            self.max_rdy = int(settings.get("max_rdy_count", self.max_rdy))
            if "msg_timeout" in settings:
                self.msg_timeout = int(settings["msg_timeout"]) / 1000
            if "max_msg_timeout" in settings:
                self.max_msg_timeout = int(settings["max_msg_timeout"]) / 1000
        except (ValueError, TypeError, AttributeError) as exc:
            raise NsqProtocolError(f"IDENTIFY answered {answer[:200]!r}: {exc}") from exc
        if self.max_rdy < 1 or self.msg_timeout <= 0 or self.max_msg_timeout <= 0:
            raise NsqProtocolError(f"IDENTIFY answered impossible settings: {answer[:200]!r}")

    async def finish(self, timeout: float) -> None:
        """Say goodbye: CLS, then close once nsqd acknowledged it (or ``timeout`` passed)."""
        self.ready = False
        self.write(b"CLS\n")
        await asyncio.wait((self._close_acknowledged, self.closed), timeout=timeout)
        self.close()

    def close(self) -> None:
        self.ready = False
        if self.transport is not None:
            self.transport.close()


class NsqReader:
    """Consumes ``topic`` on ``channel`` from every nsqd that the nsqlookupds name.

    ``handler`` gets the bodies of each batch of messages read from one connection; the batch
    is finished once it returns (or once what it returned completes) and requeued, with
    backoff, if it raises. Call :meth:`start` on a running loop, :meth:`close` to stop."""

    def __init__(
        self,
        topic: str,
        channel: str,
        lookupds: Iterable[str],
        handler: BatchHandler,
        *,
        max_in_flight: int = 1000,
        lookupd_poll_interval: float = 2.0,
        lookupd_timeout: float = 5.0,
        heartbeat_interval_ms: int = 30_000,
        output_buffer_size: int = -1,
        output_buffer_timeout_ms: int = 25,
        msg_timeout_ms: int | None = None,
        handler_backoff: Backoff = HANDLER_BACKOFF,
        warn_attempts: int = 10,
        client_id: str | None = None,
        connect_timeout: float = 5.0,
        backoff_cap: float = 2.0,
    ) -> None:
        self.topic = topic
        self.channel = channel
        self.lookupds = _lookupd_urls(lookupds)
        self.handler = handler
        self.max_in_flight = max_in_flight
        self.lookupd_poll_interval = lookupd_poll_interval
        self.lookupd_timeout = lookupd_timeout
        self.handler_backoff = handler_backoff
        self.warn_attempts = warn_attempts
        self.connect_timeout = connect_timeout
        self.backoff_cap = backoff_cap
        hostname = socket.gethostname()
        self.identify: dict[str, Any] = {
            "client_id": client_id or hostname,
            "hostname": hostname,
            "feature_negotiation": True,
            "heartbeat_interval": heartbeat_interval_ms,
            # -1 means unbuffered (see the module's docstring), and nsqd then ignores the
            # timeout. With a buffer, nsqd holds messages until it fills or the timer ticks:
            # 250ms by default, 25ms at the least (--min-output-buffer-timeout).
            "output_buffer_timeout": output_buffer_timeout_ms,
            "output_buffer_size": output_buffer_size,
            "user_agent": "dcy-svc/1",
        }
        if msg_timeout_ms is not None:
            self.identify["msg_timeout"] = msg_timeout_ms
        self.closing = False
        # Counters, for tests and metrics.
        self.connects = 0  # connections that completed the handshake, ever
        self.lookups = 0  # answers from lookupds
        self.heartbeats = 0
        self.heartbeat_timeouts = 0
        self.malformed_frames = 0
        self.touches = 0  # messages touched (one TOUCH each)
        self.backoffs = 0  # times delivery was stopped after a failed batch
        self._connections: set[_Connection] = set()
        self._known: dict[str, str | None] = {}  # producer TCP address → its HTTP base URL
        self._producers: dict[str, asyncio.Task[None]] = {}
        self._handling: set[asyncio.Future[None]] = set()
        self._pollers: dict[str, asyncio.Task[None]] = {}  # lookupd URL → its poller
        self._answers: dict[str, dict[str, str | None]] = {}  # lookupd URL → its producers
        self._session: aiohttp.ClientSession | None = None
        self._closers: list[Callable[[], Awaitable[None]]] = []
        # Backoff after handler failures: paused (RDY 0 everywhere) until the timer fires,
        # then on trial (RDY 1 on one connection) until a batch succeeds.
        self._failures = handler_backoff.start()
        self._paused: asyncio.TimerHandle | None = None
        self._pause_delay = 0.0
        self._on_trial = False

    @property
    def connected(self) -> int:
        """Connections subscribed and ready for messages."""
        return sum(1 for c in self._connections if c.ready)

    @property
    def backing_off(self) -> bool:
        """Whether delivery is held back (paused or on trial) after a failed batch."""
        return self._paused is not None or self._on_trial

    def start(self) -> NsqReader:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.lookupd_timeout)
            )
            self._sync_pollers()
        return self

    def set_max_in_flight(self, count: int) -> None:
        """Messages in flight at most, across connections; 0 stops delivery (RDY 0)."""
        self.max_in_flight = max(0, count)
        self._distribute_rdy()

    def set_lookupds(self, lookupds: Iterable[str]) -> None:
        """Poll these nsqlookupds from now on (asked at once when the list changed)."""
        urls = _lookupd_urls(lookupds)
        if urls != self.lookupds:
            log.info("nsqlookupds for %s: %s", self.topic, ", ".join(urls) or "none")
            self.lookupds = urls
            if self._session is not None and not self.closing:
                self._sync_pollers()

    def close_with(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Await ``closer()`` when the reader closes (what feeds it, e.g. a watch)."""
        self._closers.append(closer)

    def abort_connections(self) -> None:
        """Drop every connection at once, as a network failure would (failure drills)."""
        for connection in list(self._connections):
            if connection.transport is not None:
                connection.transport.abort()

    async def close(self, timeout: float = 5.0) -> None:
        """Stop taking messages, let handlers in progress finish (their batches are
        finished), then close every connection cleanly."""
        if self.closing:
            return
        self.closing = True
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        for connection in self._connections:
            connection.send_rdy(0)
        for closer in self._closers:
            try:
                await closer()
            except Exception:  # one closer failing must not keep connections open
                log.exception("%s/%s: closing failed", self.topic, self.channel)
        for task in (*self._pollers.values(), *self._producers.values()):
            task.cancel()
        if self._handling:
            await asyncio.wait(set(self._handling), timeout=timeout)
        await asyncio.gather(
            *(c.finish(timeout=1.0) for c in list(self._connections)), return_exceptions=True
        )
        await asyncio.gather(
            *self._pollers.values(), *self._producers.values(), return_exceptions=True
        )
        if self._session is not None:
            await self._session.close()

    # -- backoff after failed batches --------------------------------------------------------
    def _batch_failed(self, connection: _Connection, ids: list[bytes]) -> None:
        """Requeue the batch after the policy's next delay and stop delivery meanwhile. A
        failure while already paused requeues with the same delay and does not escalate:
        those batches were delivered before the pause."""
        if self._paused is None:
            delay = self._failures.next_delay() or self.handler_backoff.cap
            self._pause_delay = delay
            self._on_trial = False
            self.backoffs += 1
            log.warning(
                "%s/%s: a batch failed (%d in a row); no messages for %.2fs",
                self.topic,
                self.channel,
                self._failures.failures,
                delay,
            )
            self._paused = asyncio.get_running_loop().call_later(delay, self._end_pause)
            # RDY 0 goes out before the REQ below: nsqd reads them in order, so it cannot
            # hand out another message between the two.
            self._distribute_rdy()
        connection._settle(ids, ok=False, delay_ms=round(self._pause_delay * 1000))

    def _end_pause(self) -> None:
        self._paused = None
        self._on_trial = True
        self._distribute_rdy()

    def _batch_succeeded(self) -> None:
        if self._paused is not None:
            return  # delivered before the pause: says nothing about the cure
        if self._on_trial:
            log.info("%s/%s: a batch succeeded; full speed again", self.topic, self.channel)
            self._on_trial = False
            self._distribute_rdy()
        if self._failures.failures:
            self._failures.reset()

    # -- discovery -------------------------------------------------------------------------
    def _sync_pollers(self) -> None:
        """One poller per lookupd, so that a hanging one delays no other."""
        loop = asyncio.get_running_loop()
        for url in sorted(set(self.lookupds) - self._pollers.keys()):
            self._pollers[url] = loop.create_task(self._poll(url))
        for url in self._pollers.keys() - set(self.lookupds):
            self._pollers.pop(url).cancel()
            self._answers.pop(url, None)
        self._update_known()

    async def _poll(self, url: str) -> None:
        while not self.closing:
            answer = await self._ask_lookupd(url)
            # A lookupd that cannot be reached keeps its last answer: its producers are
            # still there, most likely, and their connections do not depend on it.
            if answer is not None and url in self._pollers:
                self.lookups += 1
                self._answers[url] = answer
                self._update_known()
            await asyncio.sleep(self.lookupd_poll_interval)

    def _update_known(self) -> None:
        """The producers are those the lookupds named last; new ones get a connection."""
        known: dict[str, str | None] = {}
        for answer in self._answers.values():
            known.update(answer)
        self._known = known
        if self.closing:
            return
        for address in known.keys() - self._producers.keys():
            task = asyncio.get_running_loop().create_task(self._keep_connected(address))
            self._producers[address] = task

    async def _ask_lookupd(self, url: str) -> dict[str, str | None] | None:
        assert self._session is not None
        try:
            async with self._session.get(
                f"{url}/lookup",
                params={"topic": self.topic},
                headers={"Accept": "application/vnd.nsq; version=1.0"},
            ) as response:
                payload = await response.json(content_type=None)
                status = response.status
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            log.warning("nsqlookupd %s: %s", url, exc or type(exc).__name__)
            return None
        found: dict[str, str | None] = {}
        if status != 200 or not isinstance(payload, dict):  # no such topic yet
            return found
        data = payload.get("data", payload)  # before nsq 1.0 the answer was wrapped
        try:
            for producer in data.get("producers") or []:
                host = producer["broadcast_address"]
                host = f"[{host}]" if ":" in host else host
                http_port = producer.get("http_port")
                http = f"http://{host}:{int(http_port)}" if http_port else None
                found[f"{host}:{int(producer['tcp_port'])}"] = http
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            log.warning("nsqlookupd %s: unexpected answer (%r): %s", url, exc, data)
        return found

    async def _keep_connected(self, address: str) -> None:
        retry = replace(RECONNECT_BACKOFF, cap=self.backoff_cap).start()
        try:
            while not self.closing and address in self._known:
                try:
                    connection = await self._connect(address)
                except (OSError, TimeoutError, NsqProtocolError, ValueError) as exc:
                    delay = retry.next_delay() or self.backoff_cap
                    if retry.failures in (1, 10) or retry.failures % 100 == 0:
                        log.warning("nsqd %s: %s; retrying", address, exc)
                    await asyncio.sleep(delay)
                    continue
                connected_at = asyncio.get_running_loop().time()
                await connection.closed
                if not self.closing:
                    log.info("nsqd %s: connection closed; reconnecting", address)
                    # Connections that keep closing at once (nsqd shutting down, a malformed
                    # stream) back off like refused ones; one that lived a while starts the
                    # policy afresh.
                    if asyncio.get_running_loop().time() - connected_at > STABLE_CONNECTION:
                        retry.reset()
                    await asyncio.sleep(retry.next_delay() or self.backoff_cap)
        finally:
            self._producers.pop(address, None)

    async def _max_msg_size(self, address: str) -> int:
        """nsqd's --max-msg-size, asked over its HTTP API; its default if it cannot say."""
        http = self._known.get(address)
        if http is None or self._session is None:
            return DEFAULT_MAX_MSG_SIZE
        try:
            async with self._session.get(f"{http}/config/max_msg_size") as response:
                if response.status == 200:
                    return max(1, int(await response.json(content_type=None)))
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, TypeError) as exc:
            log.debug("nsqd %s: --max-msg-size unknown (%s); using the default", address, exc)
        return DEFAULT_MAX_MSG_SIZE

    async def _connect(self, address: str) -> _Connection:
        host, port = address.rsplit(":", 1)
        max_msg_size = await self._max_msg_size(address)
        loop = asyncio.get_running_loop()
        _, connection = await asyncio.wait_for(
            loop.create_connection(
                lambda: _Connection(self, address, max_msg_size), host.strip("[]"), int(port)
            ),
            self.connect_timeout,
        )
        try:
            await connection.handshake(self.identify, self.connect_timeout)
        except BaseException:
            connection.close()
            raise
        self.connects += 1
        self._connections.add(connection)
        log.info("consuming %s/%s from nsqd %s", self.topic, self.channel, address)
        self._distribute_rdy()
        return connection

    def _connection_gone(self, connection: _Connection) -> None:
        if connection in self._connections:
            self._connections.discard(connection)
            self._distribute_rdy()

    def _distribute_rdy(self) -> None:
        ready = sorted((c for c in self._connections if c.ready), key=lambda c: c.address)
        if not ready:
            return
        if self.closing or self.max_in_flight == 0 or self._paused is not None:
            shares = [0] * len(ready)
        elif self._on_trial:
            # One message at a time, on one connection, until a batch succeeds.
            shares = [1] + [0] * (len(ready) - 1)
        else:
            shares = [max(1, self.max_in_flight // len(ready))] * len(ready)
        for connection, share in zip(ready, shares, strict=True):
            connection.send_rdy(share)


def _lookupd_urls(lookupds: Iterable[str]) -> list[str]:
    return sorted({u if "://" in u else f"http://{u}" for u in lookupds})
