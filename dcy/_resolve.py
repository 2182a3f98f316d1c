"""Resolution by name from the watch cache: instances(), lookup() and pick().

Each distinct query text gets an entry holding its parsed query and a reference to the shared
watch. ``pick`` is synchronous over the cached snapshot once the first answer is in: a dict
lookup, an identity check and an index, so it costs well under two microseconds. Entries not
used for ``idle_timeout`` seconds let go of their watch, which stops the loop when nobody
else uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass
from typing import Literal

from dcy._errors import LookupFailed, NoHealthyInstances, ServiceNotFound
from dcy._query import Instance, ServiceQuery
from dcy._specs import HealthServiceSpec
from dcy._watch import Snapshot, Watch, WatchEngine

Strategy = Literal["round_robin", "random"]
STRATEGIES: tuple[str, ...] = ("round_robin", "random")


@dataclass(frozen=True, slots=True)
class Lookup:
    """The answer to a query: matching instances, and how fresh the answer is."""

    query: ServiceQuery
    instances: tuple[Instance, ...]
    known: int  # instances in any state, before the health filter
    stale: bool
    age: float
    index: int | str


class _Entry:
    __slots__ = ("candidates", "counter", "known", "last_used", "query", "seen", "text", "watch")

    def __init__(self, text: str, query: ServiceQuery, watch: Watch[tuple[Instance, ...]]) -> None:
        self.text = text
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
            states = self.query.states
            self.candidates = tuple(i for i in snapshot.value if i.status in states)
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

    def __init__(self, engine: WatchEngine, *, domain: str, idle_timeout: float = 600.0) -> None:
        self._engine = engine
        self._domain = domain
        self._idle_timeout = idle_timeout
        self._entries: dict[str, _Entry] = {}
        self._janitor: asyncio.Task[None] | None = None

    def parse(self, name: str) -> ServiceQuery:
        return ServiceQuery.parse(name, domain=self._domain)

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            query = self.parse(name)
            spec = HealthServiceSpec(query.name, query.tag, query.datacenter)
            entry = _Entry(name, query, self._engine.acquire(spec))
            self._entries[name] = entry
            if self._janitor is None:
                self._janitor = asyncio.get_running_loop().create_task(
                    self._evict_idle(), name="dcy-resolver-janitor"
                )
        return entry

    async def _ready(self, name: str, timeout: float | None) -> _Entry:
        entry = self._entry(name)
        await entry.watch.first(timeout)
        return entry

    async def lookup(self, name: str, *, timeout: float | None = None) -> Lookup:
        """Matching instances with freshness. Raises ConsulUnavailable only when Consul has
        never answered for this query; afterwards a stale answer is returned, marked."""
        entry = await self._ready(name, timeout)
        entry.last_used = time.monotonic()
        snapshot = entry.refresh()
        return Lookup(
            entry.query, entry.candidates, entry.known, snapshot.stale, snapshot.age, snapshot.index
        )

    async def instances(self, name: str, *, timeout: float | None = None) -> tuple[Instance, ...]:
        return (await self.lookup(name, timeout=timeout)).instances

    async def pick(self, name: str, strategy: Strategy = "round_robin") -> Instance:
        entry = self._entries.get(name)
        if entry is None or entry.watch.snapshot is None:
            entry = await self._ready(name, None)
        return entry.choose(strategy)

    def pick_nowait(self, name: str, strategy: Strategy = "round_robin") -> Instance:
        """``pick`` without awaiting: raises LookupFailed when the name has no answer yet
        (then the first lookup has started in the background)."""
        entry = self._entries.get(name) or self._entry(name)
        if entry.watch.snapshot is None:
            raise LookupFailed(f"{name!r} is not resolved yet", query=name)
        return entry.choose(strategy)

    async def _evict_idle(self) -> None:
        period = max(self._idle_timeout / 4, 0.05)
        while True:
            await asyncio.sleep(period)
            cutoff = time.monotonic() - self._idle_timeout
            for text, entry in list(self._entries.items()):
                if entry.last_used < cutoff:
                    del self._entries[text]
                    self._engine.release(entry.watch)

    async def aclose(self) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._janitor
        for entry in self._entries.values():
            self._engine.release(entry.watch)
        self._entries.clear()
