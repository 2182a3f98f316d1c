"""Resolution by name from the watch cache: instances(), lookup() and pick().

Each distinct query gets an entry holding the parsed query and a reference to the shared
watch; callers name it by text (parsed once, then found by that text) or pass the
:class:`ServiceQuery` they already have (the HTTP client's routes, failover to another
datacenter), never a text rebuilt from a query. ``pick`` is synchronous over the cached
snapshot once the first answer is in: a dict lookup, an identity check and an index, so it
costs well under two microseconds. Entries not used for ``idle_timeout`` seconds let go of
their watch, which stops the loop when nobody else uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from dcy._errors import ConsulUnavailable, LookupFailed, NoHealthyInstances, ServiceNotFound
from dcy._query import Instance, ServiceQuery
from dcy._specs import DatacentersByDistanceSpec, HealthServiceSpec
from dcy._watch import Snapshot, Watch, WatchEngine

Strategy = Literal["round_robin", "random"]
STRATEGIES: tuple[str, ...] = ("round_robin", "random")
# Failover order after the query's own datacenter: these, or "all" known ones nearest first.
Datacenters = Sequence[str] | Literal["all"]


@dataclass(frozen=True, slots=True)
class Lookup:
    """The answer to a query: matching instances, and how fresh the answer is."""

    query: ServiceQuery
    instances: tuple[Instance, ...]
    known: int  # instances in any state, before the health filter
    stale: bool
    age: float
    index: int | str


Name = str | ServiceQuery


class _Entry:
    __slots__ = ("candidates", "counter", "known", "last_used", "query", "seen", "texts", "watch")

    def __init__(self, query: ServiceQuery, watch: Watch[tuple[Instance, ...]]) -> None:
        self.texts: list[str] = []  # the texts it was asked by, forgotten with it
        self.query = query
        self.watch = watch
        self.seen: Snapshot[tuple[Instance, ...]] | None = None
        self.candidates: tuple[Instance, ...] = ()
        self.known = 0
        self.counter = -1
        self.last_used = time.monotonic()

    def refresh(self) -> Snapshot[tuple[Instance, ...]]:
        snapshot = self.watch.snapshot
        assert snapshot is not None
        if snapshot is not self.seen:
            admits = self.query.admits
            self.candidates = tuple(i for i in snapshot.value if admits(i.status))
            self.known = len(snapshot.value)
            self.seen = snapshot
        return snapshot

    def choose(self, strategy: str) -> Instance:
        if self.watch.snapshot is not self.seen:
            self.refresh()
        self.last_used = time.monotonic()
        candidates = self.candidates
        if not candidates:
            raise self.empty_error()
        if strategy == "round_robin":
            self.counter += 1
            return candidates[self.counter % len(candidates)]
        if strategy == "random":
            return random.choice(candidates)
        raise ValueError(f"unknown pick strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")

    def empty_error(self) -> LookupFailed:
        query = str(self.query)
        if not self.known:
            return ServiceNotFound(f"no instance of {query!r} is registered in Consul", query=query)
        states = ",".join(sorted(self.query.states))
        return NoHealthyInstances(
            f"none of the {self.known} instance(s) of {query!r} is {states}", query=query
        )


class Resolver:
    """Answers lookups by name from shared watches."""

    def __init__(
        self,
        engine: WatchEngine,
        *,
        domain: str,
        idle_timeout: float = 600.0,
        datacenter: str = "",
    ) -> None:
        self._engine = engine
        self._domain = domain
        self._datacenter = datacenter  # the agent's own, where unqualified names resolve
        self._distances: Watch[tuple[str, ...]] | None = None
        self._idle_timeout = idle_timeout
        self._entries: dict[Name, _Entry] = {}  # by text and by query: one entry per query
        self._janitor: asyncio.Task[None] | None = None

    @property
    def domain(self) -> str:
        """The agent's DNS domain, by which names like ``worker.service.sd`` are told."""
        return self._domain

    def parse(self, name: Name) -> ServiceQuery:
        if isinstance(name, ServiceQuery):
            return name
        return ServiceQuery.parse(name, domain=self._domain)

    def _entry(self, name: Name) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            query = self.parse(name)
            entry = self._entries.get(query)
            if entry is None:
                entry = _Entry(query, self._engine.acquire(HealthServiceSpec.of(query)))
                self._entries[query] = entry
            if isinstance(name, str):
                entry.texts.append(name)
                self._entries[name] = entry
            if self._janitor is None:
                self._janitor = asyncio.get_running_loop().create_task(
                    self._evict_idle(), name="dcy-resolver-janitor"
                )
        return entry

    async def _ready(self, name: Name, timeout: float | None) -> _Entry:
        entry = self._entry(name)
        await entry.watch.first(timeout)
        return entry

    def cached_snapshot(self, name: Name) -> Snapshot[tuple[Instance, ...]] | None:
        """The watch snapshot behind ``name`` if it has been resolved, without awaiting:
        callers keep derived state (an HTTP pool) and rebuild it only when this object
        changes identity."""
        entry = self._entries.get(name)
        if entry is None:
            return None
        entry.last_used = time.monotonic()
        return entry.watch.snapshot

    async def lookup(
        self, name: Name, *, timeout: float | None = None, datacenters: Datacenters | None = None
    ) -> Lookup:
        """Matching instances with freshness. Raises ConsulUnavailable only when Consul has
        never answered for this query; afterwards a stale answer is returned, marked.

        With ``datacenters``, the answer comes from the first datacenter with a match: the
        query's own, then the failover ones (``lookup.query.datacenter`` says which)."""
        if datacenters is None:
            entry = await self._ready(name, timeout)
        else:
            entry = (await self._failover(name, datacenters, timeout))[0]
        entry.last_used = time.monotonic()
        snapshot = entry.refresh()
        return Lookup(
            entry.query, entry.candidates, entry.known, snapshot.stale, snapshot.age, snapshot.index
        )

    async def instances(
        self, name: Name, *, timeout: float | None = None, datacenters: Datacenters | None = None
    ) -> tuple[Instance, ...]:
        return (await self.lookup(name, timeout=timeout, datacenters=datacenters)).instances

    async def pick(
        self,
        name: Name,
        strategy: Strategy = "round_robin",
        *,
        datacenters: Datacenters | None = None,
    ) -> Instance:
        if datacenters is not None:
            return await self._pick_with_failover(name, strategy, datacenters)
        entry = self._entries.get(name)
        if entry is None or entry.watch.snapshot is None:
            entry = await self._ready(name, None)
        return entry.choose(strategy)

    def pick_nowait(self, name: Name, strategy: Strategy = "round_robin") -> Instance:
        """``pick`` without awaiting: raises LookupFailed when the name has no answer yet
        (then the first lookup has started in the background)."""
        entry = self._entries.get(name) or self._entry(name)
        if entry.watch.snapshot is None:
            raise LookupFailed(f"{str(name)!r} is not resolved yet", query=str(name))
        return entry.choose(strategy)

    # -- failover to other datacenters --------------------------------------------------------
    async def _pick_with_failover(
        self, name: Name, strategy: Strategy, datacenters: Datacenters
    ) -> Instance:
        entry, tried = await self._failover(name, datacenters, None)
        if entry.candidates or len(tried) == 1:
            return entry.choose(strategy)
        query = str(entry.query)
        where = ", ".join(e.query.datacenter or self._datacenter or "local" for e in tried)
        known = sum(e.known for e in tried)
        if not known:
            raise ServiceNotFound(f"no instance of {query!r} is registered in {where}", query=query)
        states = ",".join(sorted(entry.query.states))
        raise NoHealthyInstances(
            f"none of the {known} instance(s) of {query!r} in {where} is {states}", query=query
        )

    async def _failover(
        self, name: Name, datacenters: Datacenters, timeout: float | None
    ) -> tuple[_Entry, list[_Entry]]:
        """The entry of the first datacenter with a matching instance, else the query's own;
        and every entry that answered. Other datacenters are asked only when the query's own
        has no match or its answer is stale, through the same engine (a HealthServiceSpec with
        their name)."""
        if isinstance(datacenters, str) and datacenters != "all":
            # A string is a sequence too: "dc2" would otherwise mean "d", "c", "2".
            raise ValueError(
                f"datacenters must be a list of datacenter names or 'all', got {datacenters!r}"
            )
        home = await self._ready(name, timeout)
        home_stale = home.refresh().stale
        home.last_used = time.monotonic()
        tried = [home]
        if home.candidates and not home_stale:
            return home, tried
        # A home answer kept while its datacenter cannot be reached is the fallback only: a
        # fresh match elsewhere is worth more than instances nobody can vouch for any more.
        own = home.query.datacenter or self._datacenter
        for dc in await self._failover_order(own, datacenters, timeout):
            entry = self._entry(replace(home.query, datacenter=dc))
            entry.last_used = time.monotonic()
            watch = entry.watch
            if watch.snapshot is None:
                if isinstance(watch.last_error, ConsulUnavailable):
                    continue  # known unreachable: do not wait for it on every call
                try:
                    await watch.first(timeout)
                except ConsulUnavailable:
                    continue
            stale = entry.refresh().stale
            tried.append(entry)
            if entry.candidates and not (stale and home.candidates):
                return entry, tried
        return home, tried

    async def _failover_order(
        self, own: str, datacenters: Datacenters, timeout: float | None
    ) -> tuple[str, ...]:
        if isinstance(datacenters, str):  # "all"
            if self._distances is None:
                self._distances = self._engine.acquire(DatacentersByDistanceSpec(self._datacenter))
            nearest = (await self._distances.first(timeout)).value
            order: tuple[str, ...] = (self._datacenter, *nearest)
        else:
            order = tuple(datacenters)
        return tuple(dict.fromkeys(dc for dc in order if dc and dc != own))

    async def _evict_idle(self) -> None:
        period = max(self._idle_timeout / 4, 0.05)
        while True:
            await asyncio.sleep(period)
            cutoff = time.monotonic() - self._idle_timeout
            for key, entry in list(self._entries.items()):
                if entry.last_used < cutoff and key is entry.query:
                    for text in entry.texts:
                        del self._entries[text]
                    del self._entries[key]
                    self._engine.release(entry.watch)

    async def aclose(self) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._janitor
        for key, entry in self._entries.items():
            if key is entry.query:
                self._engine.release(entry.watch)
        self._entries.clear()
        if self._distances is not None:
            self._engine.release(self._distances)
            self._distances = None
