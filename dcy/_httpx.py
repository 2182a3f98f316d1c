"""httpx transports that call services by name: ``http://worker/square``.

    http = httpx.Client(transport=dcy.HttpxTransport(client))          # client: a SyncDcy
    http.get("http://worker/square", params={"x": 3}).json()

    http = httpx.AsyncClient(transport=dcy.AsyncHttpxTransport(dcy))   # dcy: an open Dcy
    (await http.get("http://worker/square", params={"x": 3})).json()

Names are recognised, resolved, balanced and retried exactly as by the requests adapter and
the aiohttp client (``dcy._http_policy``); every other URL goes to the wrapped transport
(``httpx.HTTPTransport`` / ``httpx.AsyncHTTPTransport`` built from ``transport_options``)
untouched. Each try goes to one instance's ``address:port`` with the ``Host`` header of that
address. A refused connection is tried elsewhere for any method; a broken exchange after
sending, a read timeout, or a 502/503/504, only for idempotent methods whose body httpx holds
in memory. Each try's timeouts are cut to what is left of ``budget``. No answer at all raises
AllInstancesFailed. The async transport runs on the caller's event loop, which must be the
one the async ``Dcy`` client runs on.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Unpack

try:
    import httpx
except ImportError as exc:  # pragma: no cover - the extra is installed for the tests
    raise ImportError(
        "dcy's httpx transports need httpx: install it with pip install 'dcy[httpx]'",
        name=exc.name,
    ) from exc

from dcy._dcy import Dcy
from dcy._http_policy import CallPolicy, Exchange, PolicyOptions
from dcy._http_retry import RetriedStatus
from dcy._http_sync import SyncCalls
from dcy._sync import SyncDcy

# Raised before the request left: safe to send anywhere else.
_NOT_CONNECTED = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# No answer from the instance (httpx.TransportError minus the caller's own mistakes).
_NO_ANSWER = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


class HttpxTransport(httpx.BaseTransport):
    """An ``httpx.Client`` transport that resolves service names through a ``SyncDcy``."""

    def __init__(
        self,
        client: SyncDcy,
        *,
        transport_options: dict[str, Any] | None = None,
        **options: Unpack[PolicyOptions],
    ) -> None:
        self._transport = httpx.HTTPTransport(**(transport_options or {}))
        self._calls = SyncCalls(client, options)
        self._urls = _Urls()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        started = self._calls.start(
            str(request.url), request.method, replayable=_replayable(request)
        )
        if started is None:
            return self._transport.handle_request(request)
        exchange, rest = started
        aim = _Aim(request, self._urls)
        while (chosen := exchange.next()) is not None:
            instance, endpoint = chosen
            attempt = aim.at(exchange, endpoint.hostport, rest)
            try:
                response = self._transport.handle_request(attempt)
            except _NO_ANSWER as error:
                exchange.failed(
                    instance, endpoint, error, sent=not isinstance(error, _NOT_CONNECTED)
                )
                continue
            except BaseException:
                exchange.released(endpoint)
                raise
            if exchange.answered(
                instance, endpoint, response.status_code, _retried(response, attempt)
            ):
                return response
            response.close()
        raise exchange.failure()

    def close(self) -> None:
        self._transport.close()


class AsyncHttpxTransport(httpx.AsyncBaseTransport):
    """An ``httpx.AsyncClient`` transport that resolves service names through an open async
    ``Dcy``, on its event loop."""

    def __init__(
        self,
        dcy: Dcy,
        *,
        transport_options: dict[str, Any] | None = None,
        **options: Unpack[PolicyOptions],
    ) -> None:
        self._transport = httpx.AsyncHTTPTransport(**(transport_options or {}))
        self._policy = CallPolicy(dcy.resolver, **options)
        self._urls = _Urls()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        policy = self._policy
        routed = policy.route(str(request.url))
        if routed is None:
            return await self._transport.handle_async_request(request)
        route, rest = routed
        now = time.monotonic()
        pool = await policy.pool(route.query, now)
        exchange = policy.exchange(
            pool, route, request.method, replayable=_replayable(request), now=now
        )
        aim = _Aim(request, self._urls)
        while (chosen := exchange.next()) is not None:
            instance, endpoint = chosen
            attempt = aim.at(exchange, endpoint.hostport, rest)
            try:
                response = await self._transport.handle_async_request(attempt)
            except _NO_ANSWER as error:
                exchange.failed(
                    instance, endpoint, error, sent=not isinstance(error, _NOT_CONNECTED)
                )
                continue
            except BaseException:
                exchange.released(endpoint)
                raise
            if exchange.answered(
                instance, endpoint, response.status_code, _retried(response, attempt)
            ):
                return response
            await response.aclose()
        raise exchange.failure()

    async def aclose(self) -> None:
        await self._transport.aclose()


def _replayable(request: httpx.Request) -> bool:
    # Bytes, text, forms and json are held in memory as a ByteStream; a generator is not.
    return isinstance(request.stream, httpx.ByteStream)


class _Urls:
    """Parsed instance URLs by text: parsing one costs as much as the rest of the by-name
    work, and a service's few instances are asked for the same few paths over and over."""

    __slots__ = ("_parsed",)

    def __init__(self) -> None:
        self._parsed: dict[str, httpx.URL] = {}

    def __call__(self, text: str) -> httpx.URL:
        url = self._parsed.get(text)
        if url is None:
            if len(self._parsed) >= _MAX_URLS:
                self._parsed.clear()  # URLs built from data: start over rather than grow
            url = self._parsed[text] = httpx.URL(text)
        return url


_MAX_URLS = 4096


class _Aim:
    """Points the caller's request at one instance per attempt, in place (as aiohttp's
    client does, the response's request shows the instance's URL): its URL, its ``Host``
    (unless the caller set one of its own) and timeouts cut to what is left of the budget."""

    __slots__ = ("_own_host", "_request", "_timeouts", "_urls")

    def __init__(self, request: httpx.Request, urls: _Urls) -> None:
        self._request = request
        self._urls = urls
        self._own_host = request.headers.get("host") == request.url.netloc.decode("ascii")
        timeouts = request.extensions.get("timeout")
        self._timeouts: dict[str, float | None] = (
            dict(timeouts)
            if isinstance(timeouts, dict)
            else dict.fromkeys(("connect", "read", "write", "pool"))
        )

    def at(self, exchange: Exchange, hostport: str, rest: str) -> httpx.Request:
        request = self._request
        request.url = self._urls(exchange.route.prefix + hostport + rest)
        if self._own_host:
            request.headers["Host"] = hostport
        left = max(exchange.left(), 0.001)
        cut = {k: left if v is None else min(v, left) for k, v in self._timeouts.items()}
        request.extensions = {**request.extensions, "timeout": cut}
        return request


def _retried(response: httpx.Response, attempt: httpx.Request) -> partial[RetriedStatus]:
    return partial(RetriedStatus, response.status_code, response.reason_phrase, str(attempt.url))
