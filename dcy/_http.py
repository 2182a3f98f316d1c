"""An aiohttp client that calls services by name: ``http://worker/square``.

    async with dcy.http_client() as client:
        async with client.get("http://worker/square", params={"x": "3"}) as response:
            print(await response.json())

The host is resolved through dcy's resolver (the shared watch cache, no extra Consul query)
and replaced by one instance's ``address:port``; which hosts count as service names is
described in ``dcy._http_routing``. Everything else passes through to aiohttp untouched. One
aiohttp session serves every instance, so connections stay alive per instance. The request
goes to the instance as if called directly: its ``Host`` header is the instance's address,
and for ``https`` the certificate is checked against that address (pass aiohttp's
``server_hostname=`` or ``ssl=`` to choose otherwise).

A request by name is a sequence of attempts, each on an instance not tried before:

* a connection that could not be made (refused, unreachable, connect timeout) is tried on
  another instance, whatever the method: nothing was sent;
* a broken exchange after sending (reset, disconnect, read timeout), or a 502/503/504
  answer, is tried again only for idempotent methods (GET, HEAD, OPTIONS, TRACE, PUT,
  DELETE) with a body that can be sent twice; POST and PATCH are never replayed once sent;
* at most ``attempts`` tries (default 3) within ``budget`` seconds (default 10) for the
  whole exchange, across all tries: each try gets what is left as its aiohttp ``total``
  timeout, which (as in aiohttp) also covers reading the body. A ``timeout=`` passed to a
  call replaces that for each try; the budget then only decides whether another try starts.

When no try gives an answer, AllInstancesFailed lists the instances tried and their errors.
When the last try is a 502/503/504, that response is returned: it is an answer. Failing
instances are ejected for a while (see ``dcy._http_balancing``).

Instance choice per client: ``round_robin`` (default), ``random``, or ``least_outstanding``:
the instance with the fewest requests of this client waiting for response headers.
"""

from __future__ import annotations

import time
from collections.abc import Coroutine, Generator
from functools import partial
from types import TracebackType
from typing import Any

import aiohttp
from aiohttp import ClientResponse
from yarl import URL

from dcy._http_policy import CallPolicy, split_policy_options
from dcy._http_retry import replayable
from dcy._http_routing import Route
from dcy._resolve import Resolver

# Raised before a single byte of the request left: safe to send anywhere else.
NOT_CONNECTED = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


def within(timeout: aiohttp.ClientTimeout, seconds: float) -> aiohttp.ClientTimeout:
    """The session's timeouts, with the whole exchange cut to ``seconds`` at most."""
    total = seconds if timeout.total is None else min(timeout.total, seconds)
    return aiohttp.ClientTimeout(
        total=total,
        connect=timeout.connect,
        sock_read=timeout.sock_read,
        sock_connect=timeout.sock_connect,
        ceil_threshold=timeout.ceil_threshold,
    )


def status_error(response: aiohttp.ClientResponse) -> aiohttp.ClientResponseError:
    """A retried 502/503/504, as the error recorded for that attempt."""
    return aiohttp.ClientResponseError(
        response.request_info,
        response.history,
        status=response.status,
        message=response.reason or "",
    )


class RequestContext:
    """What the request methods return: await it for the response, or use ``async with``
    to release the response (and its connection, back to the pool) on exit."""

    __slots__ = ("_coro", "_response")

    def __init__(self, coro: Coroutine[Any, Any, ClientResponse]) -> None:
        self._coro = coro
        self._response: ClientResponse | None = None

    def __await__(self) -> Generator[Any, None, ClientResponse]:
        return self._coro.__await__()

    async def __aenter__(self) -> ClientResponse:
        self._response = await self._coro
        return self._response

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._response is not None
        await self._response.__aexit__(exc_type, exc, traceback)


class HttpClient:
    """An HTTP client that resolves service names; build it with ``Dcy.http_client()``.

    ``options`` are the call policy's (:class:`dcy._http_policy.PolicyOptions`: strategy,
    attempts, budget, eject_after, eject_for, retry_statuses, external_hosts, datacenters;
    defaults in ``CallPolicy``); the others go to the ``aiohttp.ClientSession`` this client
    opens on first use (``headers``, ``timeout``, ``connector``, ``trace_configs``, ...).
    A session option ``raise_for_status`` makes error statuses raise at once, without
    retries.
    ``external_hosts`` are single-label hosts that are not services (``localhost`` never is);
    ``datacenters`` fails over to other datacenters as ``Dcy.lookup`` does. A service's
    instances are rebuilt whenever the resolver's snapshot changes (with datacenter
    failover, at most every ``REFRESH_EVERY`` seconds). Balancing, retries and ejection are
    ``self.policy``'s, shared with the requests and httpx clients."""

    def __init__(self, resolver: Resolver, **options: Any) -> None:
        policy, self._session_options = split_policy_options(options)
        self.policy = CallPolicy(resolver, **policy)
        self._budget = self.policy.budget
        self._session: aiohttp.ClientSession | None = None
        self._first_timeout = aiohttp.ClientTimeout(total=self._budget)

    # -- lifecycle ---------------------------------------------------------------------------
    async def __aenter__(self) -> HttpClient:
        self._open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(**self._session_options)
            self._first_timeout = within(self._session.timeout, self._budget)
        return self._session

    @property
    def session(self) -> aiohttp.ClientSession:
        """The aiohttp session under this client (opened on first use)."""
        return self._open()

    async def aclose(self) -> None:
        """Close the session and every kept-alive connection."""
        if self._session is not None:
            await self._session.close()

    # -- the request methods, as aiohttp's ---------------------------------------------------
    def request(self, method: str, url: str | URL, **options: Any) -> RequestContext:
        return RequestContext(self._send(method, url, options))

    def get(self, url: str | URL, **options: Any) -> RequestContext:
        return RequestContext(self._send("GET", url, options))

    def head(self, url: str | URL, **options: Any) -> RequestContext:
        options.setdefault("allow_redirects", False)
        return RequestContext(self._send("HEAD", url, options))

    def options(self, url: str | URL, **options: Any) -> RequestContext:
        return RequestContext(self._send("OPTIONS", url, options))

    def post(self, url: str | URL, **options: Any) -> RequestContext:
        return RequestContext(self._send("POST", url, options))

    def put(self, url: str | URL, **options: Any) -> RequestContext:
        return RequestContext(self._send("PUT", url, options))

    def patch(self, url: str | URL, **options: Any) -> RequestContext:
        return RequestContext(self._send("PATCH", url, options))

    def delete(self, url: str | URL, **options: Any) -> RequestContext:
        return RequestContext(self._send("DELETE", url, options))

    # -- sending -----------------------------------------------------------------------------
    async def _send(self, method: str, url: str | URL, options: dict[str, Any]) -> ClientResponse:
        session = self._session
        if session is None or session.closed:
            session = self._open()
        routed = self.policy.route(url if isinstance(url, str) else str(url))
        if routed is None:
            return await session.request(method, url, **options)
        return await self._send_by_name(session, method, *routed, options)

    async def _send_by_name(
        self,
        session: aiohttp.ClientSession,
        method: str,
        route: Route,
        rest: str,
        options: dict[str, Any],
    ) -> ClientResponse:
        policy = self.policy
        now = time.monotonic()
        pool = await policy.pool(route.query, now)
        exchange = policy.exchange(pool, route, method, replayable=replayable(options), now=now)
        method = exchange.method
        bounded = "timeout" not in options
        while (chosen := exchange.next()) is not None:
            instance, endpoint = chosen
            if bounded:
                options["timeout"] = (
                    self._first_timeout
                    if exchange.attempt == 1
                    else within(session.timeout, exchange.left())
                )
            try:
                response = await session.request(
                    method, route.prefix + endpoint.hostport + rest, **options
                )
            except aiohttp.InvalidURL:
                exchange.released(endpoint)
                raise  # the caller's mistake, not the instance's
            except aiohttp.ClientResponseError:
                exchange.released(endpoint, answered=True)  # raise_for_status: it answered
                raise
            except (aiohttp.ClientError, TimeoutError) as exc:
                exchange.failed(instance, endpoint, exc, sent=not isinstance(exc, NOT_CONNECTED))
                continue
            except BaseException:
                exchange.released(endpoint)  # cancelled: no verdict on the instance
                raise
            if exchange.answered(
                instance, endpoint, response.status, partial(status_error, response)
            ):
                return response
            response.release()
        raise exchange.failure()
