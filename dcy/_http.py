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

import asyncio
import math
from collections.abc import Coroutine, Generator, Iterable
from types import TracebackType
from typing import Any

import aiohttp
from aiohttp import ClientResponse
from yarl import URL

from dcy._http_balancing import STRATEGIES, Endpoint, Outliers, Pool, Strategy
from dcy._http_retry import (
    NOT_CONNECTED,
    RETRY_STATUSES,
    all_failed,
    may_retry,
    status_error,
    within,
)
from dcy._http_routing import Route, Router
from dcy._query import Instance, ServiceQuery
from dcy._resolve import Datacenters, Resolver

# How long a pool serves requests before asking the resolver's cache again. The cache follows
# Consul through a blocking query; asking it per request cost as much as the rest of the
# by-name work together, and a tenth of a second is far below Consul's own check intervals.
REFRESH_EVERY = 0.1
# Past this many endpoints, those no pool refers to any more are forgotten.
_MAX_ENDPOINTS = 1024


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

    ``session_options`` go to the ``aiohttp.ClientSession`` this client opens on first use
    (``headers``, ``timeout``, ``connector``, ``trace_configs``, ...). A session option
    ``raise_for_status`` makes error statuses raise at once, without retries.
    ``external_hosts`` are single-label hosts that are not services (``localhost`` never is);
    ``datacenters`` fails over to other datacenters as ``Dcy.lookup`` does. A service's
    instances are rebuilt whenever the resolver's snapshot changes (with datacenter
    failover, at most every ``REFRESH_EVERY`` seconds)."""

    def __init__(
        self,
        resolver: Resolver,
        *,
        strategy: Strategy = "round_robin",
        attempts: int = 3,
        budget: float = 10.0,
        eject_after: int = 3,
        eject_for: float = 10.0,
        retry_statuses: Iterable[int] = RETRY_STATUSES,
        external_hosts: Iterable[str] = (),
        datacenters: Datacenters | None = None,
        **session_options: Any,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(
                f"unknown pick strategy {strategy!r}: use one of {', '.join(STRATEGIES)}"
            )
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ValueError(f"attempts must be an int >= 1, got {attempts!r}")
        if not (isinstance(budget, int | float) and math.isfinite(budget) and budget > 0):
            raise ValueError(f"budget must be a positive number of seconds, got {budget!r}")
        self._resolver = resolver
        self._router = Router(domain=resolver.domain, external_hosts=external_hosts)
        self._strategy = strategy
        self._attempts = attempts
        self._budget = float(budget)
        self._outliers = Outliers(eject_after=eject_after, eject_for=eject_for)
        self._retry_statuses = frozenset(retry_statuses)
        self._datacenters = datacenters
        self._session_options = session_options
        self._session: aiohttp.ClientSession | None = None
        self._first_timeout = aiohttp.ClientTimeout(total=self._budget)
        self._pools: dict[ServiceQuery, Pool] = {}
        self._endpoints: dict[str, Endpoint] = {}

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
        routed = self._router.route(url if isinstance(url, str) else str(url))
        if routed is None:
            return await session.request(method, url, **options)
        return await self._send_by_name(session, method.upper(), *routed, options)

    async def _send_by_name(
        self,
        session: aiohttp.ClientSession,
        method: str,
        route: Route,
        rest: str,
        options: dict[str, Any],
    ) -> ClientResponse:
        loop = asyncio.get_running_loop()
        now = loop.time()
        pool = self._pools.get(route.query)
        if pool is None or not self._pool_current(pool, route.query, now):
            pool = await self._refresh(route.query, now)
        deadline = now + self._budget
        bounded = "timeout" not in options
        tried: list[tuple[Instance, BaseException]] = []
        excluded: list[Endpoint] = []
        for attempt in range(1, self._attempts + 1):
            if attempt > 1:
                now = loop.time()
                if now >= deadline:
                    break
                if bounded:
                    options["timeout"] = within(session.timeout, deadline - now)
            elif bounded:
                options["timeout"] = self._first_timeout
            index = pool.choose(self._strategy, excluded, now)
            if index < 0:
                break
            instance, endpoint = pool.instances[index], pool.endpoints[index]
            endpoint.in_flight += 1
            try:
                response = await session.request(
                    method, route.prefix + endpoint.hostport + rest, **options
                )
            except aiohttp.InvalidURL:
                raise  # the caller's mistake, not the instance's
            except aiohttp.ClientResponseError:
                Outliers.succeeded(endpoint)  # raise_for_status: the instance did answer
                raise
            except (aiohttp.ClientError, TimeoutError) as exc:
                sent = not isinstance(exc, NOT_CONNECTED)
                self._outliers.failed(endpoint, pool.endpoints, loop.time())
                tried.append((instance, exc))
                excluded.append(endpoint)
                if may_retry(method, options, sent=sent):
                    continue
                if sent:
                    raise all_failed(method, str(route.query), tried, sent=True) from exc
                break
            finally:
                endpoint.in_flight -= 1
            if response.status not in self._retry_statuses:
                if endpoint.failures:
                    Outliers.succeeded(endpoint)
                return response
            now = loop.time()
            self._outliers.failed(endpoint, pool.endpoints, now)
            excluded.append(endpoint)
            if (
                attempt == self._attempts
                or now >= deadline
                or not pool.has_other(excluded)
                or not may_retry(method, options, sent=True)
            ):
                return response  # a 502/503/504 is still an answer: the last one is returned
            tried.append((instance, status_error(response)))
            response.release()
        cause = tried[-1][1] if tried else None
        raise all_failed(method, str(route.query), tried, sent=False) from cause

    def _pool_current(self, pool: Pool, service: ServiceQuery, now: float) -> bool:
        if self._datacenters is None:
            # Same snapshot object, same instances: a dict lookup and an identity check.
            return pool.snapshot is not None and (
                self._resolver.cached_snapshot(service) is pool.snapshot
            )
        return now < pool.fresh_until

    async def _refresh(self, service: ServiceQuery, now: float) -> Pool:
        """The service's pool, brought up to date with the resolver's cached answer."""
        resolver, datacenters = self._resolver, self._datacenters
        instances = (await resolver.lookup(service, datacenters=datacenters)).instances
        if not instances:
            # Raises ServiceNotFound or NoHealthyInstances, worded by the resolver.
            await resolver.pick(service, datacenters=datacenters)
            instances = (await resolver.lookup(service, datacenters=datacenters)).instances
        pool = self._pools.get(service)
        if pool is None:
            pool = self._pools[service] = Pool()
        pool.update(instances, self._endpoint)
        pool.fresh_until = now + REFRESH_EVERY
        pool.snapshot = self._resolver.cached_snapshot(service)
        return pool

    def _endpoint(self, hostport: str) -> Endpoint:
        endpoint = self._endpoints.get(hostport)
        if endpoint is None:
            if len(self._endpoints) >= _MAX_ENDPOINTS:
                self._prune_endpoints()
            endpoint = self._endpoints[hostport] = Endpoint(hostport)
        return endpoint

    def _prune_endpoints(self) -> None:
        """Forget endpoints no pool uses, unless a request on them is still running."""
        used = {id(e) for pool in self._pools.values() for e in pool.endpoints}
        self._endpoints = {
            key: e for key, e in self._endpoints.items() if id(e) in used or e.in_flight
        }
