"""``Dcy``: one connection to the local Consul agent and everything built on it.

    async with Dcy() as dcy:                      # CONSUL_HTTP_ADDR & co., or arguments
        await dcy.register("worker", 9002)        # stays registered until exit
        worker = await dcy.pick("worker")         # from a shared, long-lived watch
        async with dcy.subscribe("worker") as updates:
            async for snapshot in updates: ...

Nothing happens at import or construction; ``__aenter__`` asks the agent who it is (waiting
for it at most ``wait_for_agent`` seconds, then ConsulUnavailable) and starts the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Unpack

from dcy._backoff import Backoff, Retry, retrying
from dcy._config import ConsulConfig
from dcy._consul import AgentInfo, ConsulAPI, HttpConsul
from dcy._defaults import DEFAULT_LOCK_DELAY, DEFAULT_TTL
from dcy._errors import ConsulUnavailable, DcyError
from dcy._query import Instance
from dcy._reads import read_agent
from dcy._resolve import Datacenters, Lookup, Resolver, Strategy
from dcy._specs import CatalogServicesSpec, HealthServiceSpec
from dcy._watch import Callback, Subscription, WatchEngine, WatchOptions

# Loaded when first used, so that `import dcy` stays cheap (see dcy/__init__.py).
if TYPE_CHECKING:
    from dcy._dns import DnsResolver
    from dcy._health_events import HealthWatch, TransitionCallback
    from dcy._http import HttpClient
    from dcy._kv import KeyValueStore
    from dcy._leader import Leadership, OnLost
    from dcy._register import OnRegistrationLost, Registration, ServiceOptions

log = logging.getLogger("dcy")

# Waiting for an agent that is starting (or restarting): it usually answers within a second.
AGENT_BACKOFF = Backoff(base=0.1, cap=2.0)
# The goodbyes of aclose() (step down, deregister) share this many seconds: each request has
# its own timeout (10 s), and an agent that never answers must not hold a closing process for
# that long per goodbye. Whatever is left unsaid Consul cleans up itself: a session expires
# 2 x TTL after its last renewal, a service once its check has been critical for
# DeregisterCriticalServiceAfter.
CLOSE_BUDGET = 5.0


class Dcy:
    """A client of the local Consul agent. Use as ``async with Dcy(...) as dcy``."""

    def __init__(
        self,
        address: str | None = None,
        *,
        token: str | None = None,
        token_file: str | None = None,
        ca_file: str | None = None,
        ca_path: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        tls_server_name: str | None = None,
        verify: bool | None = None,
        wait_for_agent: float | None = 10.0,
        watch_options: WatchOptions | None = None,
        lookup_idle_timeout: float = 600.0,
        api: ConsulAPI | None = None,
    ) -> None:
        """Arguments win over the environment (see ``ConsulConfig.from_env``).
        ``wait_for_agent``: how long opening waits for an agent that does not answer yet
        (None: as long as it takes; an ACL or TLS refusal is raised at once). ``api``
        replaces the HTTP seam, e.g. with ``dcy.testing.FakeConsul``."""
        self.config = ConsulConfig.from_env(
            address,
            token=token,
            token_file=token_file,
            ca_file=ca_file,
            ca_path=ca_path,
            client_cert=client_cert,
            client_key=client_key,
            tls_server_name=tls_server_name,
            verify=verify,
        )
        if wait_for_agent is not None and not wait_for_agent > 0:
            raise ValueError(f"wait_for_agent must be positive or None, got {wait_for_agent!r}")
        self._wait_for_agent = wait_for_agent
        self._watch_options = watch_options or WatchOptions()
        self._lookup_idle_timeout = lookup_idle_timeout
        self._given_api = api
        self._api: ConsulAPI | None = None
        self._engine: WatchEngine | None = None
        self._resolver: Resolver | None = None
        self._dns: DnsResolver | None = None
        self._registrations: list[Registration] = []
        # Closed with the client; weak, so a watch its user closed is not kept.
        self._health_watches: weakref.WeakSet[HealthWatch] = weakref.WeakSet()
        self._leaderships: weakref.WeakSet[Leadership] = weakref.WeakSet()
        self.agent: AgentInfo | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def __aenter__(self) -> Dcy:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        api = self._given_api or HttpConsul(
            self.config,
            max_connections=self._watch_options.max_connections,
            blocking_connections=self._watch_options.blocking_connections,
        )
        try:
            self.agent = await self._ask_agent(api)
        except BaseException:
            if self._given_api is None:
                await api.aclose()
            raise
        self._api = api
        self._engine = WatchEngine(api, self._watch_options)
        self._resolver = Resolver(
            self._engine,
            domain=self.agent.domain,
            idle_timeout=self._lookup_idle_timeout,
            datacenter=self.agent.datacenter,
        )

    async def _ask_agent(self, api: ConsulAPI) -> AgentInfo:
        waited = self._wait_for_agent
        policy = replace(AGENT_BACKOFF, deadline=waited)
        reported = [0.0]

        def report(exc: BaseException, retry: Retry, delay: float) -> None:
            # Once at first, then every half minute: a long wait should be visible, not noisy.
            if retry.failures == 1 or retry.elapsed - reported[0] >= 30:
                reported[0] = retry.elapsed
                log.warning("waiting for Consul at %s: %s", self.config.address, exc)

        try:
            # The deadline bounds the whole wait, not only the retries after the first
            # failure: an agent that accepts connections and never answers would otherwise
            # hold each attempt for the request timeout, before and after the deadline.
            async with asyncio.timeout(waited):
                return await retrying(lambda: read_agent(api), policy, on_retry=report)
        except TimeoutError as exc:
            raise ConsulUnavailable(
                f"no Consul agent answered at {self.config.address} within {waited:g}s",
                address=self.config.address,
            ) from exc
        except ConsulUnavailable as exc:
            raise ConsulUnavailable(
                f"no Consul agent answered at {self.config.address} within {waited:g}s: {exc}",
                address=self.config.address,
                status=exc.status,
            ) from exc

    async def aclose(self) -> None:
        """Step down from leaderships, stop health watches, deregister what this client
        registered, stop every watch and close connections. Every step runs even when an
        earlier one fails with a DcyError (logged): an agent that is away must not leave
        sessions, tasks or sockets behind."""
        deadline = time.monotonic() + CLOSE_BUDGET
        try:
            for leadership in list(self._leaderships):
                # A leadership still held when its client closes steps down like a normal
                # exit, before its registration (and the check its session may be bound to)
                # goes away.
                await self._quietly(leadership.__aexit__(None, None, None), "step down", deadline)
            self._leaderships.clear()
            for watch in list(self._health_watches):
                await self._quietly(watch.aclose(), "stop a health watch")
            self._health_watches.clear()
            for registration in reversed(self._registrations):
                await self._quietly(
                    registration.deregister(), f"deregister {registration.service_id}", deadline
                )
            self._registrations.clear()
            if self._resolver is not None:
                await self._quietly(self._resolver.aclose(), "close the resolver")
            if self._engine is not None:
                await self._quietly(self._engine.aclose(), "stop the watches")
        finally:
            if self._api is not None and self._given_api is None:
                await self._api.aclose()
            self._api = self._engine = self._resolver = None

    @staticmethod
    async def _quietly(step: Awaitable[None], what: str, deadline: float | None = None) -> None:
        """Run a step of closing; with a ``deadline`` (monotonic), give it up then."""
        try:
            if deadline is None:
                await step
                return
            loop = asyncio.get_running_loop()
            async with asyncio.timeout_at(loop.time() + max(0.0, deadline - time.monotonic())):
                await step
        except TimeoutError:
            log.warning("could not %s while closing: Consul did not answer in time", what)
        except DcyError as exc:
            log.warning("could not %s while closing: %s", what, exc)

    # -- parts -------------------------------------------------------------------------------
    @property
    def api(self) -> ConsulAPI:
        if self._api is None:
            raise RuntimeError("Dcy is not open: use `async with Dcy() as dcy`")
        return self._api

    @property
    def watch_options(self) -> WatchOptions:
        """How this client watches (its connection budget among them)."""
        return self._watch_options

    @property
    def engine(self) -> WatchEngine:
        if self._engine is None:
            raise RuntimeError("Dcy is not open: use `async with Dcy() as dcy`")
        return self._engine

    @property
    def resolver(self) -> Resolver:
        if self._resolver is None:
            raise RuntimeError("Dcy is not open: use `async with Dcy() as dcy`")
        return self._resolver

    @property
    def dns(self) -> DnsResolver:
        """A DNS resolver pointed at this agent's DNS port and domain."""
        if self._dns is None:
            if self.agent is None:
                raise RuntimeError("Dcy is not open: use `async with Dcy() as dcy`")
            from dcy._dns import DnsResolver  # dnspython is loaded on first use

            self._dns = DnsResolver(
                self.agent.dns_address, self.agent.dns_port, domain=self.agent.domain
            )
        return self._dns

    # -- KV and leadership ------------------------------------------------------------------
    @property
    def kv(self) -> KeyValueStore:
        """Consul's key/value store: get/put/delete/list, check-and-set, and watches."""
        from dcy._kv import KeyValueStore

        return KeyValueStore(self.api, self.engine)

    def leadership(
        self,
        name: str,
        *,
        ttl: float = DEFAULT_TTL,
        lock_delay: float = DEFAULT_LOCK_DELAY,
        service_id: str | None = None,
        checks: Sequence[str] = (),
        on_lost: OnLost | None = None,
    ) -> Leadership:
        """A bid for the leadership ``name``: ``async with dcy.leadership("app") as leader``
        returns once this process leads; ``leader.lost`` tells when that ends. ``checks``
        (service check IDs, e.g. ``registration.liveness_check_ids``) end the session when
        one fails, so a killed holder is replaced after the check's interval + lock_delay,
        not 2 x ttl + lock_delay. See :class:`Leadership` for the session, lock key and
        timing."""
        if self.agent is None:
            raise RuntimeError("Dcy is not open: use `async with Dcy() as dcy`")
        from dcy._leader import Leadership

        leadership = Leadership(
            self.api,
            self.engine,
            self.agent,
            name,
            ttl=ttl,
            lock_delay=lock_delay,
            service_id=service_id,
            checks=checks,
            on_lost=on_lost,
        )
        self._leaderships.add(leadership)
        return leadership

    # -- resolution --------------------------------------------------------------------------
    async def lookup(
        self, name: str, *, timeout: float | None = None, datacenters: Datacenters | None = None
    ) -> Lookup:
        """Instances matching ``name`` plus freshness (``stale``, ``age``); ``datacenters``
        as for :meth:`pick`."""
        return await self.resolver.lookup(name, timeout=timeout, datacenters=datacenters)

    async def instances(
        self, name: str, *, timeout: float | None = None, datacenters: Datacenters | None = None
    ) -> tuple[Instance, ...]:
        """Instances matching ``name`` (default: passing). May be empty; never emptied
        because Consul is unreachable. ``datacenters`` as for :meth:`pick`."""
        return await self.resolver.instances(name, timeout=timeout, datacenters=datacenters)

    async def pick(
        self,
        name: str,
        strategy: Strategy = "round_robin",
        *,
        datacenters: Datacenters | None = None,
    ) -> Instance:
        """One instance of ``name``: round-robin (default) or random, from the cache.

        ``datacenters`` enables failover when the local datacenter (or the one the name
        gives) has no matching instance, or cannot be reached (its answer is stale): a list
        tried in order, or ``"all"``, every known datacenter nearest first by network
        coordinates. A stale home answer is still used when no other datacenter has a fresh
        match."""
        if datacenters is None:
            return await self.resolver.pick(name, strategy)
        return await self.resolver.pick(name, strategy, datacenters=datacenters)

    def pick_nowait(self, name: str, strategy: Strategy = "round_robin") -> Instance:
        """``pick`` for synchronous code, once ``name`` has been resolved."""
        return self.resolver.pick_nowait(name, strategy)

    def http_client(self, **options: Any) -> HttpClient:
        """An aiohttp client that resolves service names in URLs (``http://worker/x``)
        through this client's cache, with retries and outlier ejection. ``options`` are
        :class:`HttpClient`'s (strategy, attempts, budget, eject_after, eject_for,
        retry_statuses, external_hosts, datacenters) and ``aiohttp.ClientSession``'s. Use it
        as ``async with dcy.http_client() as client``."""
        if self.agent is None:
            raise RuntimeError("Dcy is not open: use `async with Dcy() as dcy`")
        from dcy._http import HttpClient

        return HttpClient(self.resolver, **options)

    def subscribe(self, name: str, callback: Callback | None = None) -> Subscription[Any]:
        """Snapshots of every instance of ``name`` (all states) as they change: pass a
        callback (sync or async), or iterate the subscription with ``async for``."""
        return self.engine.subscribe(HealthServiceSpec.of(self.resolver.parse(name)), callback)

    def watch_health(
        self,
        service: str | None = None,
        callback: TransitionCallback | None = None,
        *,
        debounce: float = 0.0,
        datacenter: str | None = None,
    ) -> HealthWatch:
        """Check-state transitions of one service (``"worker"``, ``"v2.worker@dc2"``) or of
        every check in the datacenter (``service`` None), reported once a state has held
        for ``debounce`` seconds. Pass a callback or iterate with ``async for``."""
        from dcy._health_events import health_watch

        query = self.resolver.parse(service) if service is not None else None
        watch = health_watch(
            self.engine, query, datacenter=datacenter, debounce=debounce, callback=callback
        )
        self._health_watches.add(watch)
        return watch

    def subscribe_services(
        self, callback: Callback | None = None, *, datacenter: str | None = None
    ) -> Subscription[Any]:
        """Snapshots of the catalog's service names (name → tags) as they change."""
        return self.engine.subscribe(CatalogServicesSpec(datacenter), callback)

    # -- registration ------------------------------------------------------------------------
    async def register(
        self,
        name: str,
        port: int,
        *,
        on_lost: OnRegistrationLost | None = None,
        **options: Unpack[ServiceOptions],
    ) -> Registration:
        """Register an instance and keep it registered; deregistered on ``aclose``.
        ``options``: ``address``, ``service_id``, ``tags``, ``meta``, ``check`` (``"http"``,
        ``"tcp"``, ``"ttl"``, a check object or None), ``liveness`` and ``deregister_after``
        (see ``define_service``). ``liveness`` adds a second check that fails only when the
        process is gone (a ``TcpCheck``), for a leadership to bind to; ``check`` says whether
        it is ready. ``on_lost`` is called (as ``registration.wait_lost()`` returns) once
        Consul refuses for good to keep it registered (a deleted token, say).

        Invalid arguments raise ValueError before anything reaches Consul."""
        if self.agent is None:
            raise RuntimeError("Dcy is not open: use `async with Dcy() as dcy`")
        from dcy._register import Registration, define_service

        definition = define_service(name, port, agent=self.agent, **options)
        registration = Registration(definition, self.api, self.engine, on_lost=on_lost)
        await registration.start()
        self._registrations.append(registration)
        return registration
