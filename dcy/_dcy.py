"""``Dcy``: one connection to the local Consul agent and everything built on it.

    async with Dcy() as dcy:                      # CONSUL_HTTP_ADDR & co., or arguments
        await dcy.register("worker", 9002)        # stays registered until exit
        worker = await dcy.pick("worker")         # from a shared, long-lived watch
        async with dcy.subscribe("worker") as updates:
            async for snapshot in updates: ...

Nothing happens at import or construction; ``__aenter__`` asks the agent who it is (retrying
for at most ``connect_timeout`` seconds, then ConsulUnavailable) and starts the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dcy._config import ConsulConfig
from dcy._consul import AgentInfo, ConsulAPI, HttpConsul
from dcy._dns import DnsResolver
from dcy._errors import ConsulError, ConsulUnavailable
from dcy._health_events import HealthWatch, TransitionCallback, health_watch
from dcy._http import HttpClient
from dcy._kv import KeyValueStore
from dcy._leader import DEFAULT_LOCK_DELAY, DEFAULT_TTL, Leadership, OnLost
from dcy._query import Instance
from dcy._register import (
    MIN_DEREGISTER_AFTER,
    CheckKind,
    CheckSpec,
    HttpCheck,
    Registration,
    TcpCheck,
    define_service,
)
from dcy._resolve import Datacenters, Lookup, Resolver, Strategy
from dcy._specs import CatalogServicesSpec, HealthServiceSpec
from dcy._watch import Callback, Subscription, WatchEngine, WatchOptions

log = logging.getLogger("dcy")


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
        connect_timeout: float = 10.0,
        watch_options: WatchOptions | None = None,
        lookup_idle_timeout: float = 600.0,
        api: ConsulAPI | None = None,
    ) -> None:
        """Arguments win over the environment (see ``ConsulConfig.from_env``). ``api``
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
        if connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be positive, got {connect_timeout!r}")
        self._connect_timeout = connect_timeout
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
        api = self._given_api or HttpConsul(self.config)
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
        deadline = time.monotonic() + self._connect_timeout
        failures = 0
        while True:
            try:
                return await api.agent_info()
            except ConsulUnavailable as exc:
                failures += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ConsulUnavailable(
                        f"no Consul agent answered at {self.config.address} within "
                        f"{self._connect_timeout:g}s: {exc}",
                        address=self.config.address,
                    ) from exc
                await asyncio.sleep(min(self._watch_options.backoff(failures), remaining))

    async def aclose(self) -> None:
        """Deregister what this client registered, stop every watch, close connections."""
        for registration in reversed(self._registrations):
            try:
                await registration.deregister()
            except (ConsulError, ConsulUnavailable) as exc:
                log.warning("could not deregister %s: %s", registration.service_id, exc)
        self._registrations.clear()
        for watch in list(self._health_watches):
            await watch.aclose()
        self._health_watches.clear()
        for leadership in list(self._leaderships):
            # A leadership still held when its client closes steps down like a normal exit.
            await leadership.__aexit__(None, None, None)
        self._leaderships.clear()
        if self._resolver is not None:
            await self._resolver.aclose()
        if self._engine is not None:
            await self._engine.aclose()
        if self._api is not None and self._given_api is None:
            await self._api.aclose()
        self._api = self._engine = self._resolver = None

    # -- parts -------------------------------------------------------------------------------
    @property
    def api(self) -> ConsulAPI:
        if self._api is None:
            raise RuntimeError("Dcy is not open: use `async with Dcy() as dcy`")
        return self._api

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
            self._dns = DnsResolver(
                self.agent.dns_address, self.agent.dns_port, domain=self.agent.domain
            )
        return self._dns

    # -- KV and leadership ------------------------------------------------------------------
    @property
    def kv(self) -> KeyValueStore:
        """Consul's key/value store: get/put/delete/list, check-and-set, and watches."""
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
        gives) has no matching instance: a list tried in order, or ``"all"``, every known
        datacenter nearest first by network coordinates."""
        if datacenters is None:
            return await self.resolver.pick(name, strategy)
        return await self.resolver.pick(name, strategy, datacenters=datacenters)

    def pick_nowait(self, name: str, strategy: Strategy = "round_robin") -> Instance:
        """``pick`` for synchronous code, once ``name`` has been resolved."""
        return self.resolver.pick_nowait(name, strategy)

    def http_client(self, **options: Any) -> HttpClient:
        """An aiohttp client that resolves service names in URLs (``http://worker/x``)
        through this client's cache, with retries and outlier ejection. ``options``:
        strategy, attempts, budget, eject_after, eject_for, retry_statuses, external_hosts,
        and aiohttp.ClientSession arguments; see :class:`HttpClient`. Use it as
        ``async with dcy.http_client() as client``."""
        if self.agent is None:
            raise RuntimeError("Dcy is not open: use `async with Dcy() as dcy`")
        return HttpClient(self.resolver, domain=self.agent.domain, **options)

    def subscribe(self, name: str, callback: Callback | None = None) -> Subscription[Any]:
        """Snapshots of every instance of ``name`` (all states) as they change: pass a
        callback (sync or async), or iterate the subscription with ``async for``."""
        query = self.resolver.parse(name)
        spec = HealthServiceSpec(query.name, query.tag, query.datacenter)
        return self.engine.subscribe(spec, callback)

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
        address: str | None = None,
        service_id: str | None = None,
        tags: Iterable[str] = (),
        meta: Mapping[str, str] | None = None,
        check: CheckSpec | CheckKind | None = "http",
        liveness: HttpCheck | TcpCheck | None = None,
        deregister_after: float = MIN_DEREGISTER_AFTER,
    ) -> Registration:
        """Register an instance and keep it registered; deregistered on ``aclose``.
        ``liveness`` adds a second check that fails only when the process is gone (a
        ``TcpCheck``), for a leadership to bind to; ``check`` says whether it is ready.

        Invalid arguments raise ValueError before anything reaches Consul."""
        if self.agent is None:
            raise RuntimeError("Dcy is not open: use `async with Dcy() as dcy`")
        definition = define_service(
            name,
            port,
            agent=self.agent,
            address=address,
            service_id=service_id,
            tags=tags,
            meta=meta,
            check=check,
            liveness=liveness,
            deregister_after=deregister_after,
        )
        registration = Registration(definition, self.api, self.engine)
        await registration.start()
        self._registrations.append(registration)
        return registration
