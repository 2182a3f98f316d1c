"""What every client by service name decides, whatever HTTP library sends the bytes.

One :class:`CallPolicy` per client (aiohttp's ``HttpClient``, the requests adapter, the httpx
transports): it recognises service names in URLs (``dcy._http_routing``), keeps each
service's instances in step with the resolver's cache, chooses an instance per attempt
(``dcy._http_balancing``), takes failing ones out for a while, and decides whether a failed
attempt is made again (``dcy._http_retry``). A request by name is one :class:`Exchange`: the
transport asks it for an instance, sends, and reports what happened; the exchange says
whether to return the answer, try another instance, or give up with AllInstancesFailed.

The state is shared by the threads of a synchronous client: a lock guards every change to
pools and endpoints. It is never held across I/O, and asyncio clients take it uncontended.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypedDict, cast

from dcy._errors import AllInstancesFailed
from dcy._http_balancing import STRATEGIES, Endpoint, Outliers, Pool, Strategy
from dcy._http_retry import RETRY_STATUSES, all_failed, retry_allowed
from dcy._http_routing import Route, Router
from dcy._query import Instance, ServiceQuery
from dcy._resolve import Datacenters, Resolver

# How long a pool serves requests before asking the resolver's cache again (with datacenter
# failover; otherwise the cache's snapshot identity says when). The cache follows Consul
# through a blocking query; asking it per request cost as much as the rest of the by-name
# work together, and a tenth of a second is far below Consul's own check intervals.
REFRESH_EVERY = 0.1
# Past this many endpoints, those no pool refers to any more are forgotten.
_MAX_ENDPOINTS = 1024


class PolicyOptions(TypedDict, total=False):
    """The options of a client by name, whatever its HTTP library (see CallPolicy)."""

    strategy: Strategy
    attempts: int
    budget: float
    eject_after: int
    eject_for: float
    retry_statuses: Iterable[int]
    external_hosts: Iterable[str]
    datacenters: Datacenters | None


def split_policy_options(options: Mapping[str, Any]) -> tuple[PolicyOptions, dict[str, Any]]:
    """``options`` as the policy's (:class:`PolicyOptions`) and the rest (an HTTP library's
    own, such as ``aiohttp.ClientSession``'s)."""
    names = PolicyOptions.__optional_keys__
    policy = cast(PolicyOptions, {k: v for k, v in options.items() if k in names})
    return policy, {k: v for k, v in options.items() if k not in names}


class CallPolicy:
    """Balancing, retries and ejection for one client. See the module docstring."""

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
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(
                f"unknown pick strategy {strategy!r}: use one of {', '.join(STRATEGIES)}"
            )
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ValueError(f"attempts must be an int >= 1, got {attempts!r}")
        if not (isinstance(budget, int | float) and math.isfinite(budget) and budget > 0):
            raise ValueError(f"budget must be a positive number of seconds, got {budget!r}")
        self.resolver = resolver
        self.router = Router(domain=resolver.domain, external_hosts=external_hosts)
        self.strategy = strategy
        self.attempts = attempts
        self.budget = float(budget)
        self.outliers = Outliers(eject_after=eject_after, eject_for=eject_for)
        self.retry_statuses = frozenset(retry_statuses)
        self.datacenters = datacenters
        self.lock = threading.Lock()
        self._pools: dict[ServiceQuery, Pool] = {}
        self._endpoints: dict[str, Endpoint] = {}

    def route(self, url: str) -> tuple[Route, str] | None:
        """The route of ``url`` and the rest of it after the origin; None for a real host."""
        return self.router.route(url)

    # -- pools -------------------------------------------------------------------------------
    def current_pool(self, service: ServiceQuery, now: float) -> Pool | None:
        """The service's pool when it is up to date, without waiting; else None."""
        pool = self._pools.get(service)
        if pool is None:
            return None
        if self.datacenters is None:
            # Same snapshot object, same instances: a dict lookup and an identity check.
            if pool.snapshot is not None and (
                self.resolver.cached_snapshot(service) is pool.snapshot
            ):
                return pool
            return None
        return pool if now < pool.fresh_until else None

    async def pool(self, service: ServiceQuery, now: float) -> Pool:
        """The service's pool, brought up to date with the resolver's cache when needed.
        Runs on the resolver's event loop."""
        return self.current_pool(service, now) or await self.refresh(service, now)

    async def refresh(self, service: ServiceQuery, now: float) -> Pool:
        """Rebuild the service's pool from the resolver's cached answer."""
        resolver, datacenters = self.resolver, self.datacenters
        instances = (await resolver.lookup(service, datacenters=datacenters)).instances
        if not instances:
            # Raises ServiceNotFound or NoHealthyInstances, worded by the resolver.
            await resolver.pick(service, datacenters=datacenters)
            instances = (await resolver.lookup(service, datacenters=datacenters)).instances
        with self.lock:
            pool = self._pools.get(service)
            if pool is None:
                pool = self._pools[service] = Pool()
            pool.update(instances, self._endpoint)
            pool.fresh_until = now + REFRESH_EVERY
            pool.snapshot = resolver.cached_snapshot(service)
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

    # -- requests ----------------------------------------------------------------------------
    def exchange(
        self, pool: Pool, route: Route, method: str, *, replayable: bool, now: float
    ) -> Exchange:
        """A request by name about to be sent: ask it for instances until it is over."""
        return Exchange(self, pool, route, method.upper(), replayable, now)


class Exchange:
    """One request by name, as a sequence of attempts on instances not tried before.

    The transport loops: ``next()`` gives the instance to try (None: give up, raise
    ``failure()``); then exactly one of ``answered`` (headers arrived), ``failed`` (no
    answer) or ``released`` (the attempt ended otherwise, e.g. the caller's own error)."""

    __slots__ = (
        "_excluded",
        "_over",
        "_policy",
        "_pool",
        "_replayable",
        "attempt",
        "deadline",
        "method",
        "route",
        "tried",
    )

    def __init__(
        self,
        policy: CallPolicy,
        pool: Pool,
        route: Route,
        method: str,
        replayable: bool,
        now: float,
    ) -> None:
        self._policy = policy
        self._pool = pool
        self.route = route
        self.method = method
        self._replayable = replayable
        self.deadline = now + policy.budget
        self.attempt = 0
        self.tried: list[tuple[Instance, BaseException]] = []
        self._excluded: list[Endpoint] = []
        self._over = False

    def next(self) -> tuple[Instance, Endpoint] | None:
        """The instance for the next attempt, counted in flight; None once none is due."""
        policy = self._policy
        if self._over or self.attempt >= policy.attempts:
            return None
        now = time.monotonic()
        if self.attempt and now >= self.deadline:
            return None
        pool = self._pool
        with policy.lock:
            index = pool.choose(policy.strategy, self._excluded, now)
            if index < 0:
                return None
            instance, endpoint = pool.instances[index], pool.endpoints[index]
            endpoint.in_flight += 1
        self.attempt += 1
        return instance, endpoint

    def left(self) -> float:
        """Seconds left of the budget."""
        return self.deadline - time.monotonic()

    def released(self, endpoint: Endpoint, *, answered: bool = False) -> None:
        """The attempt ended without a verdict on the instance (the caller's mistake), or,
        with ``answered``, with an answer the caller raises on (``raise_for_status``)."""
        with self._policy.lock:
            endpoint.in_flight -= 1
            if answered:
                Outliers.succeeded(endpoint)

    def failed(
        self, instance: Instance, endpoint: Endpoint, error: BaseException, *, sent: bool
    ) -> None:
        """The attempt got no answer. Returns when another attempt may follow; raises
        AllInstancesFailed (from ``error``) when the request may have reached the server
        and must not be sent again."""
        policy = self._policy
        with policy.lock:
            endpoint.in_flight -= 1
            policy.outliers.failed(endpoint, self._pool.endpoints, time.monotonic())
        self.tried.append((instance, error))
        self._excluded.append(endpoint)
        if retry_allowed(self.method, replayable=self._replayable, sent=sent):
            return
        if sent:
            raise all_failed(self.method, str(self.route.query), self.tried, sent=True) from error
        self._over = True

    def answered(
        self,
        instance: Instance,
        endpoint: Endpoint,
        status: int,
        error: Callable[[], BaseException],
    ) -> bool:
        """Response headers arrived. True: return this response. False: release it and
        try another instance (``error()`` is recorded as this attempt's failure)."""
        policy = self._policy
        with policy.lock:
            endpoint.in_flight -= 1
            if status not in policy.retry_statuses:
                if endpoint.failures:
                    Outliers.succeeded(endpoint)
                return True
            now = time.monotonic()
            policy.outliers.failed(endpoint, self._pool.endpoints, now)
        self._excluded.append(endpoint)
        if (
            self.attempt == policy.attempts
            or now >= self.deadline
            or not self._pool.has_other(self._excluded)
            or not retry_allowed(self.method, replayable=self._replayable, sent=True)
        ):
            return True  # a 502/503/504 is still an answer: the last one is returned
        self.tried.append((instance, error()))
        return False

    def failure(self) -> AllInstancesFailed:
        """The error once no attempt is left; its cause is the last attempt's error."""
        error = all_failed(self.method, str(self.route.query), self.tried, sent=False)
        if self.tried:
            error.__cause__ = self.tried[-1][1]
        return error
