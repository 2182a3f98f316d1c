"""An asyncio NSQ consumer built for throughput: messages are handled in batches.

Written from NSQ's TCP protocol spec (https://nsq.io/clients/tcp_protocol_spec.html): a
generic client costs ~100 µs of CPU per message (an object, a callback and a system call per
FIN), more than our services spend on the message itself. Here every complete frame nsqd sent
is parsed in one pass when the socket is read, the handler gets all of their bodies at once,
and the whole batch is finished (FIN) in one write once the handler is done.

* Discovery: every nsqlookupd is asked ``/lookup?topic=`` at start and every
  ``lookupd_poll_interval`` seconds; each producer gets a connection, reconnected with backoff
  while lookupd still names it.
* Flow control: ``max_in_flight`` is split evenly across the ready connections (``RDY``); nsqd
  never has more messages in flight to a connection than its RDY count.
* At least once: a message is finished only after the handler for its batch completed; if the
  handler raises, the batch is requeued (``REQ``); a lost connection leaves its messages to
  nsqd, which delivers them again after their timeout. Messages are never dropped for having
  been tried too often, only logged.
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
from dataclasses import replace
from typing import Any

import aiohttp

from dcy import Backoff

log = logging.getLogger("svc.nsq.reader")

# Reconnecting to an nsqd (dcy's one retry policy; the cap is the reader's backoff_cap).
RECONNECT_BACKOFF = Backoff(base=0.05, cap=2.0)
# A connection that lived this long (seconds) was not a failed attempt.
STABLE_CONNECTION = 5.0

# handler(bodies) finishes its work at once (returns None) or returns what to wait for.
BatchHandler = Callable[[list[bytes]], Awaitable[None] | None]

MAGIC = b"  V2"
FRAME_RESPONSE, FRAME_ERROR, FRAME_MESSAGE = 0, 1, 2
HEARTBEAT = b"_heartbeat_"
_HEADER = struct.Struct(">ll")
_ATTEMPTS = struct.Struct(">H")
# A message frame's data: timestamp (8 bytes), attempts (2), id (16), then the body.
_ID_START, _BODY_START = 10, 26
# Errors after which nsqd keeps the connection open (the spec's non-fatal ones).
_HARMLESS_ERRORS = (b"E_FIN_FAILED", b"E_REQ_FAILED", b"E_TOUCH_FAILED")


class NsqProtocolError(Exception):
    """nsqd answered the handshake with an error, or with something unexpected."""


class _Connection(asyncio.Protocol):
    """One nsqd connection: frames in, commands out; the batching lives here."""

    def __init__(self, reader: NsqReader, address: str) -> None:
        self.reader = reader
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.ready = False  # subscribed: messages may flow
        self.rdy = 0  # the RDY count last sent
        self.remaining = 0  # messages nsqd may still send before we renew RDY
        self.in_flight = 0
        self.max_rdy = 2500  # nsqd's default --max-rdy-count, until IDENTIFY tells
        loop = self._loop = asyncio.get_running_loop()
        self.last_read = loop.time()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._close_acknowledged: asyncio.Future[None] = loop.create_future()
        self._buffer = bytearray()
        self._responses: asyncio.Queue[bytes | NsqProtocolError] = asyncio.Queue()

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.ready = False
        self._responses.put_nowait(NsqProtocolError(f"connection lost: {exc or 'closed'}"))
        if not self.closed.done():
            self.closed.set_result(None)
        self.reader._connection_gone(self)

    def data_received(self, data: bytes) -> None:
        self.last_read = self._loop.time()
        buffer = self._buffer
        buffer += data
        end = len(buffer)
        if end < 8:
            return
        view = memoryview(buffer)
        pos = 0
        ids: list[bytes] = []
        bodies: list[bytes] = []
        most_attempts = 0
        try:
            while end - pos >= 8:
                size, kind = _HEADER.unpack_from(buffer, pos)
                stop = pos + 4 + size
                if stop > end:
                    break
                start = pos + 8
                if kind == FRAME_MESSAGE:
                    attempts = _ATTEMPTS.unpack_from(buffer, start + 8)[0]
                    most_attempts = max(most_attempts, attempts)
                    ids.append(bytes(view[start + _ID_START : start + _BODY_START]))
                    bodies.append(bytes(view[start + _BODY_START : stop]))
                elif kind == FRAME_RESPONSE:
                    self._on_response(bytes(view[start:stop]))
                else:
                    self._on_error(bytes(view[start:stop]))
                pos = stop
        finally:
            view.release()
        del buffer[:pos]
        if ids:
            self._on_messages(ids, bodies, most_attempts)

    # -- frames ----------------------------------------------------------------------------
    def _on_response(self, data: bytes) -> None:
        if data == HEARTBEAT:
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
            log.exception("handling %d %s messages failed; requeueing", len(ids), reader.topic)
            self._settle(ids, ok=False)
            return
        if outcome is None:
            self._settle(ids, ok=True)
            return
        future = asyncio.ensure_future(outcome)
        reader._handling.add(future)
        future.add_done_callback(lambda done: self._handled(done, ids))

    def _handled(self, future: asyncio.Future[None], ids: list[bytes]) -> None:
        self.reader._handling.discard(future)
        error = None if future.cancelled() else future.exception()
        if future.cancelled() or error is not None:
            log.error(
                "handling %d %s messages failed; requeueing",
                len(ids),
                self.reader.topic,
                exc_info=error,
            )
            self._settle(ids, ok=False)
        else:
            self._settle(ids, ok=True)

    def _settle(self, ids: list[bytes], *, ok: bool, delay_ms: int | None = None) -> None:
        """FIN (or REQ) a batch in one write, renewing RDY in the same write when due."""
        self.in_flight -= len(ids)
        if self.transport is None or self.transport.is_closing():
            return  # nsqd delivers them again once they time out
        if ok:
            commands = b"FIN " + b"\nFIN ".join(ids) + b"\n"
        else:
            delay = self.reader.requeue_delay_ms if delay_ms is None else delay_ms
            commands = b"".join(b"REQ %s %d\n" % (i, delay) for i in ids)
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
            settings = json.loads(answer)
            self.max_rdy = int(settings.get("max_rdy_count", self.max_rdy))
        topic, channel = self.reader.topic, self.reader.channel
        self.write(b"SUB %s %s\n" % (topic.encode(), channel.encode()))
        answer = await self._response(timeout)
        if answer != b"OK":
            raise NsqProtocolError(f"SUB answered {answer!r}")
        self.ready = True

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
    is finished once it returns (or once what it returned completes) and requeued if it
    raises. Call :meth:`start` on a running loop, :meth:`close` to stop."""

    def __init__(
        self,
        topic: str,
        channel: str,
        lookupds: Iterable[str],
        handler: BatchHandler,
        *,
        max_in_flight: int = 1000,
        lookupd_poll_interval: float = 2.0,
        heartbeat_interval_ms: int = 30_000,
        output_buffer_size: int = -1,
        output_buffer_timeout_ms: int = 25,
        msg_timeout_ms: int | None = None,
        requeue_delay_ms: int = 100,
        warn_attempts: int = 10,
        client_id: str | None = None,
        connect_timeout: float = 5.0,
        backoff_cap: float = 2.0,
    ) -> None:
        self.topic = topic
        self.channel = channel
        self.lookupds = [u if "://" in u else f"http://{u}" for u in lookupds]
        self.handler = handler
        self.max_in_flight = max_in_flight
        self.lookupd_poll_interval = lookupd_poll_interval
        self.requeue_delay_ms = requeue_delay_ms
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
        self.connects = 0  # connections that completed the handshake, ever
        self._connections: set[_Connection] = set()
        self._known: set[str] = set()  # the producers lookupd named last
        self._producers: dict[str, asyncio.Task[None]] = {}
        self._handling: set[asyncio.Future[None]] = set()
        self._discovery: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def connected(self) -> int:
        """Connections subscribed and ready for messages."""
        return sum(1 for c in self._connections if c.ready)

    def start(self) -> NsqReader:
        if self._discovery is None:
            self._discovery = asyncio.get_running_loop().create_task(self._discover())
        return self

    def set_max_in_flight(self, count: int) -> None:
        """Messages in flight at most, across connections; 0 stops delivery (RDY 0)."""
        self.max_in_flight = max(0, count)
        self._distribute_rdy()

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
        for connection in self._connections:
            connection.send_rdy(0)
        if self._discovery is not None:
            self._discovery.cancel()
        for task in self._producers.values():
            task.cancel()
        if self._handling:
            await asyncio.wait(set(self._handling), timeout=timeout)
        await asyncio.gather(
            *(c.finish(timeout=1.0) for c in list(self._connections)), return_exceptions=True
        )
        tasks = [t for t in (self._discovery, *self._producers.values()) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    # -- discovery -------------------------------------------------------------------------
    async def _discover(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        while not self.closing:
            found = await self._lookup()
            if found is not None:
                self._known = found
                for address in found - self._producers.keys():
                    task = asyncio.get_running_loop().create_task(self._keep_connected(address))
                    self._producers[address] = task
            self._drop_silent_connections()
            await asyncio.sleep(self.lookupd_poll_interval)

    def _drop_silent_connections(self) -> None:
        """nsqd sends a heartbeat every interval: a connection silent for two of them is
        dead (a half-open TCP connection would otherwise hold its messages forever)."""
        limit = 2 * self.identify["heartbeat_interval"] / 1000
        now = asyncio.get_running_loop().time()
        for connection in list(self._connections):
            if now - connection.last_read > limit and connection.transport is not None:
                log.warning(
                    "nsqd %s: no heartbeat for %.0fs; reconnecting", connection.address, limit
                )
                connection.transport.abort()

    async def _lookup(self) -> set[str] | None:
        """The producers every lookupd that answered names; None if none answered."""
        assert self._session is not None
        found: set[str] | None = None
        for url in self.lookupds:
            try:
                async with self._session.get(
                    f"{url}/lookup",
                    params={"topic": self.topic},
                    headers={"Accept": "application/vnd.nsq; version=1.0"},
                ) as response:
                    payload = await response.json(content_type=None)
                    status = response.status
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                log.warning("nsqlookupd %s: %s", url, exc)
                continue
            found = found or set()
            if status != 200 or not isinstance(payload, dict):  # no such topic yet
                continue
            data = payload.get("data", payload)  # before nsq 1.0 the answer was wrapped
            try:
                for producer in data.get("producers") or []:
                    host = producer["broadcast_address"]
                    host = f"[{host}]" if ":" in host else host
                    found.add(f"{host}:{int(producer['tcp_port'])}")
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
                    # Connections that keep closing at once (nsqd shutting down) back off
                    # like refused ones; one that lived a while starts the policy afresh.
                    if asyncio.get_running_loop().time() - connected_at > STABLE_CONNECTION:
                        retry.reset()
                    await asyncio.sleep(retry.next_delay() or self.backoff_cap)
        finally:
            self._producers.pop(address, None)

    async def _connect(self, address: str) -> _Connection:
        host, port = address.rsplit(":", 1)
        loop = asyncio.get_running_loop()
        _, connection = await asyncio.wait_for(
            loop.create_connection(lambda: _Connection(self, address), host.strip("[]"), int(port)),
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
        ready = [c for c in self._connections if c.ready]
        if not ready:
            return
        stopped = self.closing or self.max_in_flight == 0
        share = 0 if stopped else max(1, self.max_in_flight // len(ready))
        for connection in ready:
            connection.send_rdy(share)
