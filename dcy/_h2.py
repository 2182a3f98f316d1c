"""HTTP/2 to an HTTPS agent: every request of a process as a stream over a few connections.

Over HTTP/1.1 a blocking query holds a TCP connection for its whole wait, so a process
watching a thousand queries needs a thousand connections, five times what an agent admits
from one address by default (``http_max_conns_per_client = 200``). Consul's HTTPS listener
also speaks HTTP/2 (ALPN ``h2``, 250 concurrent streams per connection): there a blocking
query is a stream, and a thousand of them fit in four connections, each answered the moment
its own data changes while the others keep waiting.

The protocol state machine is the ``h2`` library's; this module drives it with asyncio: one
:class:`_Link` (an ``asyncio.Protocol``) per connection, whose reads dispatch every event to
the stream it belongs to, so no stream waits on another's turn to read (the defect measured
in httpx 0.29 with ``http2=True``, where a change reached only the stream holding the
connection's read lock). :class:`H2Pool` places each request on a connection with a free
stream, opens another one up to its limit, and otherwise queues the request until a stream
ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from dcy._errors import H2Unavailable, TlsHandshakeFailed

# What we let the agent send before it must wait for our acknowledgement: large enough that a
# wide answer (megabytes at a thousand services) never stalls on a window update.
_STREAM_WINDOW = 2**24
_CONNECTION_WINDOW = 2**30
# Streams per connection when the agent names no limit (Go's server says 250).
_DEFAULT_STREAMS = 100
_MAX_STREAMS = 250
# A request given up on (a timeout) sends a PING; a connection that does not answer it in
# this long is dropped. Otherwise a half-open connection (a hung agent, a lost peer) would
# take every later request too, where HTTP/1.1 would have dialled a new one.
PING_TIMEOUT = 3.0


@dataclass(frozen=True, slots=True)
class H2Response:
    status: int
    headers: dict[str, str]  # names lower-cased, as HTTP/2 sends them
    body: bytes


@dataclass(slots=True)
class _Stream:
    answer: asyncio.Future[H2Response]
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)


class _Link(asyncio.Protocol):
    """One HTTP/2 connection and its streams."""

    def __init__(self, pool: H2Pool) -> None:
        self.pool = pool
        self.conn = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        # Set once the agent's SETTINGS arrived (its stream limit is known) or it failed.
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closing = False  # no new streams: GOAWAY received, or the connection is gone
        self._window_open = asyncio.Event()
        self._ping_timer: asyncio.TimerHandle | None = None

    # -- what the pool reads -------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        limit = self.conn.remote_settings.max_concurrent_streams
        return min(limit, _MAX_STREAMS) if limit < 2**31 else _DEFAULT_STREAMS

    @property
    def room(self) -> int:
        if self.closing or not self.ready.done() or self.ready.exception() is not None:
            return 0
        return self.capacity - len(self.streams)

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        tls = transport.get_extra_info("ssl_object")
        chosen = tls.selected_alpn_protocol() if tls is not None else None
        if chosen != "h2":
            self.closing = True
            self.ready.set_exception(H2Unavailable(f"the agent chose {chosen or 'no protocol'}"))
            transport.close()
            return
        self.conn.initiate_connection()
        self.conn.update_settings(
            {
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
            }
        )
        self.conn.increment_flow_control_window(_CONNECTION_WINDOW - 65535)
        self._flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._fail(ConnectionError(f"HTTP/2 protocol error from the agent: {exc}"))
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            self._on_event(event)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        error = ConnectionError(f"connection to the agent lost: {exc or 'closed'}")
        if exc is not None:
            error.__cause__ = exc
        self._fail(error)
        self._window_open.set()
        if self._ping_timer is not None:
            self._ping_timer.cancel()
        self.pool._forget(self)

    # -- events ----------------------------------------------------------------------------------
    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                for name, value in event.headers or ():
                    key, text = _text(name), _text(value)
                    if key == ":status":
                        stream.status = int(text)
                    else:
                        stream.headers[key] = text
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None and event.data:
                stream.chunks.append(event.data)
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self.conn.acknowledge_received_data(
                    event.flow_controlled_length or 0, event.stream_id or 0
                )
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None and not stream.answer.done():
                stream.answer.set_result(
                    H2Response(stream.status, stream.headers, b"".join(stream.chunks))
                )
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None and not stream.answer.done():
                stream.answer.set_exception(
                    ConnectionError(f"the agent reset the stream ({event.error_code!r})")
                )
        elif isinstance(event, h2.events.ConnectionTerminated):
            # GOAWAY: streams the agent never saw may be retried elsewhere; the others
            # still get their answers before it closes.
            self.closing = True
            last = event.last_stream_id or 0
            for stream_id, stream in list(self.streams.items()):
                if stream_id > last and not stream.answer.done():
                    stream.answer.set_exception(ConnectionError("the agent is going away"))
            if not self.streams and self.transport is not None:
                self.transport.close()
            self.pool._wake()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            if not self.ready.done():
                self.ready.set_result(None)
            self.pool._wake()
        elif isinstance(event, h2.events.WindowUpdated):
            self._window_open.set()
        elif isinstance(event, h2.events.PingAckReceived) and self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None

    def _fail(self, error: Exception) -> None:
        if not self.ready.done():
            self.ready.set_exception(error)
        for stream in self.streams.values():
            if not stream.answer.done():
                stream.answer.set_exception(error)

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # -- one request -----------------------------------------------------------------------------
    async def exchange(
        self, headers: Sequence[tuple[bytes, bytes]], body: bytes | None
    ) -> H2Response:
        stream_id = self.conn.get_next_available_stream_id()
        stream = _Stream(asyncio.get_running_loop().create_future())
        self.streams[stream_id] = stream
        try:
            try:
                self.conn.send_headers(stream_id, headers, end_stream=not body)
            except h2.exceptions.ProtocolError as exc:
                # The connection closed under us (between the pool's choice and now).
                self.closing = True
                raise ConnectionError(f"HTTP/2 connection to the agent closed: {exc}") from exc
            self._flush()
            if body:
                await self._send_body(stream_id, body)
            return await stream.answer
        finally:
            del self.streams[stream_id]
            if not stream.answer.done() or stream.answer.cancelled():
                # Given up on (a timeout, a cancelled watch): tell the agent to stop, and
                # make sure the connection itself still answers.
                stream.answer.cancel()
                with contextlib.suppress(h2.exceptions.H2Error):
                    self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                    self._flush()
                self._probe()
            if self.closing and not self.streams and self.transport is not None:
                self.transport.close()
            self.pool._wake()

    def _probe(self) -> None:
        if self._ping_timer is not None or self.closing or self.transport is None:
            return
        with contextlib.suppress(h2.exceptions.H2Error):
            self.conn.ping(b"dcy-ping")
            self._flush()
        self._ping_timer = asyncio.get_running_loop().call_later(PING_TIMEOUT, self._silent)

    def _silent(self) -> None:
        """No answer to our PING: the connection is dead, whatever TCP believes."""
        self._ping_timer = None
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    async def _send_body(self, stream_id: int, body: bytes) -> None:
        """Send ``body`` as the agent's flow-control windows allow."""
        view = memoryview(body)
        while view:
            if self.closing:
                raise ConnectionError("connection to the agent lost while sending")
            size = min(
                self.conn.local_flow_control_window(stream_id),
                self.conn.max_outbound_frame_size,
                len(view),
            )
            if size <= 0:
                self._window_open.clear()
                await self._window_open.wait()
                continue
            chunk, view = view[:size], view[size:]
            self.conn.send_data(stream_id, bytes(chunk), end_stream=not view)
            self._flush()


class H2Pool:
    """Up to ``max_connections`` HTTP/2 connections to one agent, shared by every request."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        context: ssl.SSLContext,
        server_hostname: str | None,
        max_connections: int,
        blocking_connections: int,
        headers: Sequence[tuple[str, str]],
        connect_timeout: float,
    ) -> None:
        """``blocking_connections`` (0: no limit): how many connections' worth of streams
        blocking queries may hold at once, so that a write always finds a stream."""
        # HTTP/1.1 offered too: a TLS server that knows only it may refuse a handshake that
        # offers nothing it speaks (Go's does) instead of picking no protocol.
        context.set_alpn_protocols(["h2", "http/1.1"])
        self._host, self._port = host, port
        self._context = context
        self._server_hostname = server_hostname
        self.max_connections = max(1, max_connections)
        self._connect_timeout = connect_timeout
        self._blocking_connections = blocking_connections
        self._blocking = 0  # blocking queries holding a stream
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._base = [
            (b":scheme", b"https"),
            (b":authority", authority.encode()),
            *((name.lower().encode(), value.encode()) for name, value in headers),
        ]
        self._links: list[_Link] = []
        self._opening: asyncio.Task[_Link] | None = None
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    @property
    def streams_per_connection(self) -> int:
        """Concurrent streams one connection carries, as the agent's settings say."""
        for link in self._links:
            if link.ready.done() and link.ready.exception() is None:
                return link.capacity
        return _DEFAULT_STREAMS

    async def request(
        self, method: str, target: str, body: bytes | None = None, *, blocking: bool = False
    ) -> H2Response:
        """One request; raises :class:`H2Unavailable` when the agent does not speak HTTP/2,
        :class:`TlsHandshakeFailed`, ``OSError`` or ``ConnectionError`` when the connection
        fails."""
        headers = [(b":method", method.encode()), (b":path", target.encode()), *self._base]
        if body:
            headers.append((b"content-length", str(len(body)).encode()))
        link = await self._link_with_room(blocking)
        if not blocking:
            return await link.exchange(headers, body)
        self._blocking += 1
        try:
            return await link.exchange(headers, body)
        finally:
            self._blocking -= 1

    def _blocking_full(self) -> bool:
        if self._blocking_connections <= 0:
            return False
        return self._blocking >= self._blocking_connections * self.streams_per_connection

    async def _link_with_room(self, blocking: bool) -> _Link:
        while True:
            if self._closed:
                raise ConnectionError("the Consul client is closed")
            best = max(self._links, key=lambda link: link.room, default=None)
            if blocking and self._blocking_full():
                best = None  # wait for a blocking query to end, whatever room there is
            elif best is not None and best.room > 0:
                return best
            if (
                self._opening is None
                and len(self._links) < self.max_connections
                and not (blocking and self._blocking_full())
            ):
                self._opening = asyncio.get_running_loop().create_task(self._open())
                self._opening.add_done_callback(self._opened)
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            opening = self._opening
            try:
                if opening is not None:
                    # A failed connection fails the requests that waited for it.
                    await asyncio.wait([waiter, opening], return_when=asyncio.FIRST_COMPLETED)
                    if opening.done() and not opening.cancelled():
                        opening.result()
                else:
                    await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    async def _open(self) -> _Link:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout):
            try:
                _, link = await loop.create_connection(
                    lambda: _Link(self),
                    self._host,
                    self._port,
                    ssl=self._context,
                    server_hostname=self._server_hostname or self._host,
                )
            except ssl.SSLError as exc:
                raise TlsHandshakeFailed(str(exc)) from exc
            try:
                await link.ready
            except BaseException:
                if link.transport is not None:
                    link.transport.close()
                raise
        self._links.append(link)
        return link

    def _opened(self, task: asyncio.Task[_Link]) -> None:
        self._opening = None
        if not task.cancelled():
            task.exception()  # retrieved: the waiters raise it themselves
        self._wake()

    def _forget(self, link: _Link) -> None:
        with contextlib.suppress(ValueError):
            self._links.remove(link)
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    async def aclose(self) -> None:
        self._closed = True
        if self._opening is not None:
            self._opening.cancel()
            with contextlib.suppress(BaseException):
                await self._opening
        for link in list(self._links):
            with contextlib.suppress(h2.exceptions.H2Error):
                link.conn.close_connection()
                link._flush()
            if link.transport is not None:
                link.transport.close()
        self._links.clear()
        self._wake()


def _text(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value
