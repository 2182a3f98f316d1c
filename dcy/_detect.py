"""Change detectors: how an engine watching more queries than its connection budget allows
still sees every change, with a few blocking queries in all.

Over HTTP/1.1 each blocking query holds a connection for its whole wait, and an agent admits
200 connections per client address by default (``http_max_conns_per_client``), refusing
everybody on that address past it. Past the budget (``WatchOptions.max_connections``), the
queries a detector covers stop blocking: a few wide blocking queries per datacenter say *what*
changed, and only the queries their diff points at are re-fetched, without blocking, each
answer compared with the last one (an unchanged answer wakes nobody). Measured against Consul
v1.14.11 (see NOTES-issue16.md):

* ``/v1/health/state/any`` moves on every check added, changed or removed. Its entries carry
  ``ModifyIndex``, ``ServiceName`` and, for node checks, an empty ``ServiceID``: a diff per
  (Node, CheckID) names the services whose health changed; a node check names every
  watched service with an instance on that node. A deregistration moves its index even for
  an instance without checks, but wakes no blocking query on it (no check changed).
* Its answer is read undecoded and compared with the last one byte for byte: only the
  entries around the bytes that differ are decoded (dcy._array_delta), so a wake-up costs
  what changed, not the datacenter's size (2.3 MB at 1,000 services × 5 instances).
  Anything unexpected (no entry marker, an entry that does not decode, the first key of
  the entries changed) reads the whole answer instead.
* ``/v1/catalog/services`` moves on every registration, re-registration that changes
  anything (port, meta, tags) and deregistration; its diff (names, tags) names a few. A
  move whose index (the newest catalog write's) no diff accounts for is explained, in
  this order, by: the health loop's answer for that write (waited for about its usual
  lag, not longer, and not at all when the checks table's own index, asked with a
  ``filter`` no check matches, is below the catalog's: a check-less registration);
  the own index of the services the catalog's diff names; the own index of the services
  whose instance count, nodes or tags ``/v1/internal/ui/services`` shows changed since
  its last answer (a check-less instance added or removed; 565 kB and ~25 ms of the
  agent at 1,000 services × 5 instances, against ~1,000 requests for a sweep); every
  check read now. What none of these explain (an instance whose port or meta changed
  and nothing else, or an agent without ``/v1/internal/ui/services``: 404, or 403 for a
  token without read on it) is found by a sweep: every watched service query of that
  datacenter is re-fetched, half the blocking connections at a time (see
  :class:`HealthDetector` for the one case left to the per-``wait`` re-fetch). Consul's
  ``filter`` cannot narrow these answers by index (``ModifyIndex`` is no valid selector
  there) nor is there a per-service index in a wide answer.
* ``/v1/kv/<root>?recurse`` on the common root of the watched keys moves on any write or
  delete under it; a diff of the keys' entries names the keys, decoded around the bytes
  that differ as for the checks.
* ``/v1/catalog/nodes`` moves on every registration and deregistration of the catalog (not
  on check changes): watched nodes' queries (``catalog/node/<name>``) are re-fetched then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import orjson

from dcy._array_delta import changed_entries
from dcy._consul import Index, QueryResult
from dcy._errors import DcyError
from dcy._kv_specs import KeyPrefixSpec, KeySpec
from dcy._node_specs import CatalogNodeSpec
from dcy._specs import CatalogServicesSpec, HealthServiceSpec

if TYPE_CHECKING:
    from dcy._watch import Watch, WatchEngine

log = logging.getLogger("dcy.watch")

Group = tuple[str, str | None]  # (kind, datacenter)
# Raft indexes of recent check writes, to explain a catalog change made in the same write.
_REMEMBERED = 4096


def group_of(spec: object) -> Group | None:
    """Which detector covers a query, or None for a query that always blocks itself."""
    if isinstance(spec, HealthServiceSpec):
        return ("health", spec.datacenter)
    if isinstance(spec, KeySpec | KeyPrefixSpec):
        return ("kv", spec.datacenter)
    if isinstance(spec, CatalogNodeSpec):
        return ("nodes", spec.datacenter)
    return None


class Detector:
    """The blocking loops of one group, and the watches they trigger."""

    def __init__(self, engine: WatchEngine, group: Group) -> None:
        self.engine = engine
        self.group = group
        self.datacenter = group[1]
        self.watches: set[Watch[Any]] = set()
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._baselines = 0
        self._loop_count = 0
        self._triggered = 0  # watches triggered so far: an answer that raised it had news

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._follow(name, fetch, on_answer), name=f"dcy-detect:{name}")
            for name, fetch, on_answer in self.loops()
        ]
        self._loop_count = len(self._tasks)  # each gives one baseline before `ready`

    def loops(
        self,
    ) -> list[tuple[str, Callable[[Index], Awaitable[QueryResult]], Callable[[QueryResult], None]]]:
        raise NotImplementedError

    async def ready(self) -> None:
        """Returns once every loop has its first answer: a query fetched after this cannot
        miss a change (the detector's diff starts from there)."""
        await self._ready.wait()

    async def _follow(
        self,
        name: str,
        fetch: Callable[[Index], Awaitable[QueryResult]],
        on_answer: Callable[[QueryResult], None],
    ) -> None:
        options = self.engine.options
        retry = replace(options.backoff, deadline=None).start()
        # Paced as a watch loop is (dcy/_pacing.py): after an answer that triggered a query
        # the next wide query goes out at once, so a change made right after another is seen
        # as fast; a move that concerned no watched query (another service, a key elsewhere)
        # waits out `quiet_interval`, so a busy table is not read in a hot loop.
        pacer = options.pacer()
        index: Index = 0
        first = True
        failed = False
        while True:
            sent = time.monotonic()
            pacer.spend(sent)
            try:
                result = await fetch(index)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = exc if isinstance(exc, DcyError) else DcyError(f"{name}: {exc!r}")
                log.debug("change detector %s failed: %s", name, exc)
                if not error.transient:
                    # Refused for good (an ACL without node:read, or without list on the KV
                    # folder): nothing would say when the queries it covers change, so they
                    # end with that refusal, as a query refused itself does.
                    log.warning("change detector %s refused: %s", name, exc)
                    self._ready.set()
                    for watch in tuple(self.watches):
                        watch.end(error)
                    return
                if not failed:
                    failed = True
                    # Nobody re-fetches meanwhile: every query of the group is stale now.
                    for watch in tuple(self.watches):
                        watch.mark_stale(error)
                index = 0
                await asyncio.sleep(retry.next_delay() or 0.0)
                continue
            retry.reset()
            new_index = result.index
            moved = new_index != index
            triggered = self._triggered
            if first or failed:
                # A new baseline; after an outage, what changed meanwhile is unknown.
                if failed:
                    self.rebase()
                on_answer(result)
                if failed:
                    self.sweep()
                if first:
                    first = False
                    self._baselines += 1
                    if self._baselines == self._loop_count:
                        self._ready.set()
            elif moved:
                self.engine.detectors.wakeups += 1
                on_answer(result)
            failed = False
            if isinstance(new_index, int) and isinstance(index, int) and 0 < new_index < index:
                index = 0  # backwards: a new agent; ask without blocking
                continue
            index = new_index if (not isinstance(new_index, int) or new_index > 0) else 1
            news = self._triggered != triggered
            pause = pacer.delay(time.monotonic(), sent_at=sent, news=news)
            if pause > 0:
                await asyncio.sleep(pause)

    def rebase(self) -> None:
        """Forget what the diffs compare with: the next answers are a new baseline."""

    def trigger(self, watches: Iterable[Watch[Any]]) -> dict[Watch[Any], int]:
        """Re-fetch ``watches``; the ticket of each re-fetch (:meth:`Watch.refetched`)."""
        tickets = {}
        for watch in watches:
            self._triggered += 1
            tickets[watch] = watch.trigger()
        return tickets

    def sweep(self) -> None:
        """A change nobody can attribute: re-fetch every query of the group."""
        self.engine.detectors.sweeps += 1
        self.trigger(tuple(self.watches))

    def add(self, watch: Watch[Any]) -> None:
        self.watches.add(watch)

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class HealthDetector(Detector):
    """``/v1/health/state/any`` and ``/v1/catalog/services`` for the service queries.

    Which catalog moves need no sweep rests on what Consul guarantees about indexes: every
    write is one Raft log entry whose index is global, and stamps what it touches (a check's
    ``ModifyIndex``, the services table's index, the ``service.<name>`` index a health query
    answers with); a table's index is that of its newest write. A catalog answer's index I1
    is thus the newest catalog write. It is accounted for, and needs no sweep, when it is

    * the ``ModifyIndex`` of a check the health diff saw (a registration carries its checks:
      the agent's sync, ``/v1/catalog/register``), whose service or node was re-fetched;
    * the index of a health answer that showed a removal (a deregistration moves both);
    * the own index of a service the catalog's diff names, or of one whose instances
      ``/v1/internal/ui/services`` shows added or removed (a check-less instance: the
      checks table never moves for its registration). A watched service's re-fetch, which
      the change needs anyway, answers with it; a service nobody watches is asked once.

    Otherwise the newest write is a catalog change no diff shows: sweep. What this does not
    prove is that I1 was the only catalog write since the last answer: a check-less change
    followed, within one turnaround of the detector, by an explained write is left to the
    per-``wait`` re-fetch of every query (at most ``wait`` late). Asking for every index in
    between to be explained instead was measured to sweep on nearly every change of a busy
    cluster (any KV write, session renewal or coordinate update falls in between): 124
    requests per change at 200 services in ``bench/scale.py``, whose probe writes a key every
    100 ms."""

    # A catalog diff naming more services than this is not checked name by name: sweep.
    MAX_NAMED = 8

    def __init__(self, engine: WatchEngine, group: Group) -> None:
        super().__init__(engine, group)
        # (Node, CheckID) → the service a check belongs to ("" for a node check)
        self._owners: dict[tuple[str, str], str] = {}
        self._checks_index: Index = 0
        self._checks_raw: bytes | None = None  # the last health answer, as Consul sent it
        self._catalog: dict[str, tuple[str, ...]] = {}
        self._catalog_index: Index = 0
        self._catalog_seen = False
        self._written: deque[int] = deque(maxlen=_REMEMBERED)  # Raft indexes explained
        self._written_set: set[int] = set()
        # The newest index of a baseline answer: every write up to it happened before the
        # queries' own fetches that follow the baselines, so they show it.
        self._floor = 0
        self._checks_answered = asyncio.Event()  # set at each answer of the health loop
        self._catalog_ready = asyncio.Event()  # the catalog's baseline is in
        # How late the health loop's answer came after a catalog answer of the same write,
        # and the catalog moves still waiting for it: (index, since when).
        self._lags: deque[float] = deque(maxlen=16)
        self._health_came = True  # for the last catalog move waited for (_await_checks)
        self._awaited: deque[tuple[int, float]] = deque(maxlen=16)
        # The last /v1/internal/ui/services: name → (instances, nodes, tags); None before
        # the first, or when the agent has no such endpoint (then: `_ui_missing`).
        self._ui: dict[str, tuple[object, ...]] | None = None
        self._ui_missing = False
        self._health_named: set[str] = set()  # named by the health diff since that answer

    def _baseline(self, index: Index) -> None:
        if isinstance(index, int):
            self._floor = max(self._floor, index)

    def rebase(self) -> None:
        self._owners = {}
        self._checks_index = 0
        self._checks_raw = None
        self._catalog_seen = False
        self._ui = None

    def loops(
        self,
    ) -> list[tuple[str, Callable[[Index], Awaitable[QueryResult]], Callable[[QueryResult], None]]]:
        api, wait, dc = self.engine.api, self.engine.options.wait, self.datacenter
        return [
            (
                "health state",
                lambda index: api.health_state_bytes(datacenter=dc, index=index, wait=wait),
                self._on_checks,
            ),
        ]

    def start(self) -> None:
        super().start()
        loop = asyncio.get_running_loop()
        self._tasks.append(
            loop.create_task(self._share_catalog(), name="dcy-detect:catalog services")
        )
        self._tasks.append(loop.create_task(self._ui_baseline(), name="dcy-detect:ui services"))

    async def ready(self) -> None:
        await super().ready()
        await self._catalog_ready.wait()

    async def _share_catalog(self) -> None:
        """Follow ``/v1/catalog/services`` through the engine's own watch of it: a template
        ranging over ``services()`` asks it already, and one query answers both (one request
        per change less). Acquired here, in a task, not while the engine attaches watches."""
        try:
            watch = self.engine.acquire(CatalogServicesSpec(self.datacenter))
        except RuntimeError:
            return  # the engine closed meanwhile
        watch.answer_observers.append(self._on_catalog_answer)
        watch.detector_users += 1
        try:
            snapshot = watch.snapshot
            if snapshot is not None and not snapshot.stale:
                self._on_catalog_answer(QueryResult(snapshot.index, dict(snapshot.value)))
            await asyncio.Event().wait()  # until the detector stops
        finally:
            watch.answer_observers.remove(self._on_catalog_answer)
            watch.detector_users -= 1
            self.engine.release(watch)

    def _on_catalog_answer(self, result: QueryResult) -> bool:
        """Whether the answer made the detector act (re-fetch, or explain a move)."""
        if self._catalog_seen:
            self.engine.detectors.wakeups += 1
        acted = self._on_catalog(result)
        self._catalog_ready.set()
        return acted

    def _remember(self, index: int) -> None:
        if index in self._written_set:
            return
        if len(self._written) == self._written.maxlen:
            self._written_set.discard(self._written[0])
        self._written.append(index)
        self._written_set.add(index)

    def _explained(self, index: Index) -> bool:
        """Whether a diff accounts for the write at ``index`` (see the class's docstring);
        an index that is not a number proves nothing."""
        if not isinstance(index, int):
            return False
        return index <= self._floor or index in self._written_set

    def _on_checks(self, result: QueryResult) -> None:
        """An answer of ``/v1/health/state/any``, undecoded: only the entries around the
        bytes that differ from the last answer are decoded (dcy._array_delta), so a wake-up
        costs what changed, not what the datacenter holds."""
        previous = self._checks_index
        if (
            isinstance(result.index, int)
            and isinstance(previous, int)
            and 0 < result.index <= previous
        ):
            return  # seen already (a catalog change asked for it first)
        first = not (isinstance(previous, int) and previous > 0)
        raw = result.body if isinstance(result.body, bytes) else b""
        delta = None
        if not first and self._checks_raw is not None:
            delta = changed_entries(self._checks_raw, raw)
        names: set[str] = set()
        nodes: set[str] = set()
        removed = False
        if delta is not None and _all_checks(delta[0]) and _all_checks(delta[1]):
            removed = self._apply_checks(delta[0], delta[1], names, nodes)
        else:
            body = orjson.loads(raw) if raw.strip() else []
            if not _all_checks(body):
                raise DcyError(f"unexpected answer of /v1/health/state/any: {raw[:200]!r}")
            removed = self._replace_checks(body, first, names, nodes)
        if removed and isinstance(result.index, int):
            # The answer's index is the checks table's newest write: a deregistration moves
            # the catalog at the same index.
            self._remember(result.index)
        self._checks_raw = raw
        self._checks_index = result.index
        if isinstance(result.index, int) and self._awaited:
            self._record_lags(result.index)
        self._checks_answered.set()
        if first:
            self._baseline(result.index)
        else:
            self._trigger_changed(names, nodes)

    def _name(self, entry: dict[str, Any], names: set[str], nodes: set[str]) -> str:
        """The service a check belongs to ("" for a node check), named in ``names`` (or its
        node in ``nodes``)."""
        owner = str(entry.get("ServiceName") or "") if entry.get("ServiceID") else ""
        (names.add(owner) if owner else nodes.add(str(entry["Node"])))
        return owner

    def _apply_checks(
        self,
        before: list[dict[str, Any]],
        after: list[dict[str, Any]],
        names: set[str],
        nodes: set[str],
    ) -> bool:
        """The checks around the bytes that changed: the old ones that are gone, the new or
        changed ones. Whether a check was removed."""
        old = {(e["Node"], e["CheckID"]): e for e in before}
        new = {(e["Node"], e["CheckID"]): e for e in after}
        owners = self._owners
        for key, entry in new.items():
            if old.get(key) == entry:
                continue
            previous_owner = owners.get(key)
            owner = self._name(entry, names, nodes)
            if previous_owner and previous_owner != owner:
                names.add(previous_owner)  # the check ID now belongs to another service
            owners[key] = owner
            self._remember(int(entry.get("ModifyIndex") or 0))
        gone = old.keys() - new.keys()
        for key in gone:
            owner = owners.pop(key, "")
            (names.add(owner) if owner else nodes.add(key[0]))
        return bool(gone)

    def _replace_checks(
        self, body: list[dict[str, Any]], first: bool, names: set[str], nodes: set[str]
    ) -> bool:
        """Every check, decoded (a first answer, or one the delta could not read)."""
        since = self._checks_index if isinstance(self._checks_index, int) else 0
        keys = {(e["Node"], e["CheckID"]) for e in body}
        # Only checks written since the last answer need a look: their ModifyIndex is above
        # that answer's index (the checks table's newest write then).
        fresh = body if first else [e for e in body if int(e.get("ModifyIndex") or 0) > since]
        owners = {} if first else self._owners
        for entry in fresh:
            key = (entry["Node"], entry["CheckID"])
            before = owners.get(key)
            owner = self._name(entry, set() if first else names, set() if first else nodes)
            if before and before != owner:
                names.add(before)
            owners[key] = owner
            if not first:
                self._remember(int(entry.get("ModifyIndex") or 0))
        removed = False
        for key in owners.keys() - keys:
            removed = True
            owner = owners.pop(key)
            (names.add(owner) if owner else nodes.add(key[0]))
        self._owners = owners
        return removed

    def _trigger_changed(self, names: set[str], nodes: set[str]) -> dict[Watch[Any], int]:
        if not names and not nodes:
            return {}
        self._health_named |= names
        return self.trigger(
            w
            for w in tuple(self.watches)
            if (isinstance(w.spec, HealthServiceSpec) and w.spec.name in names)
            or (nodes and w.snapshot is not None and any(i.node in nodes for i in w.snapshot.value))
        )

    def _on_catalog(self, result: QueryResult) -> bool:
        catalog = {name: tuple(tags or ()) for name, tags in (result.body or {}).items()}
        old, self._catalog = self._catalog, catalog
        previous, self._catalog_index = self._catalog_index, result.index
        if not self._catalog_seen:
            self._catalog_seen = True
            self._baseline(result.index)
            return False
        names = {n for n in catalog.keys() | old.keys() if catalog.get(n) != old.get(n)}
        tickets = self._trigger_changed(names, set())
        if previous == result.index or self._explained(result.index):
            return bool(names)
        task = asyncio.get_running_loop().create_task(self._explain(result.index, names, tickets))
        self._tasks.append(task)
        task.add_done_callback(self._done)
        return True

    def _done(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)

    # How long a catalog move waits for the health loop's own answer (it wakes on the same
    # write, a little later: its answer is the bigger one, ~35 ms at 1,000 services × 5,
    # and costs no request of its own) before it asks, then again once the checks table's
    # index says a check may have been written: twice the longest lag of that answer seen
    # lately (late ones included), within these bounds (the lower one as the first guess).
    LAG_BOUNDS = (0.002, 0.1)

    def _checks_at_least(self, index: Index) -> bool:
        seen = self._checks_index
        return isinstance(seen, int) and isinstance(index, int) and seen >= index

    async def _checks_reach(self, index: Index, timeout: float) -> bool:
        """Wait (at most ``timeout``) until the health loop answered at ``index`` or
        later."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(timeout, 0.0)):
                while not self._checks_at_least(index):
                    self._checks_answered.clear()
                    await self._checks_answered.wait()
        return self._checks_at_least(index)

    def _expected_lag(self) -> float:
        low, high = self.LAG_BOUNDS
        return min(high, max(low, 2 * max(self._lags, default=0.0)))

    async def _await_checks(self, index: Index) -> bool | None:
        """Whether the health loop's answer for a catalog move to ``index`` came (its diff
        is in: True), cannot come (False) or may still come (None). It is waited for only
        while it may come: first the health loop's usual lag; then, if the checks table's
        own index is below ``index``, nothing was written to it then (a check-less
        registration) and nothing will come; else once more that lag. A deregistration
        moves the checks table's index without waking the health loop (no check changed):
        it is not waited for longer than that.

        After a move the health loop did not answer for (check-less services changing),
        the checks table is asked at once, without the first wait: the next move is most
        likely of the same kind. One that the health loop answers puts the wait back."""
        came = await self._checks_came(index)
        self._health_came = came is True
        return came

    async def _checks_came(self, index: Index) -> bool | None:
        if isinstance(index, int):
            self._awaited.append((index, time.monotonic()))
        if self._health_came and await self._checks_reach(index, self._expected_lag()):
            return True
        async with self.engine.refetch_slots:
            written = await self.engine.api.health_state_index(datacenter=self.datacenter)
        if isinstance(written, int) and isinstance(index, int) and written < index:
            self._awaited = deque(((i, t) for i, t in self._awaited if i != index), maxlen=16)
            return False
        if await self._checks_reach(index, self._expected_lag()):
            return True
        return None

    def _record_lags(self, index: int) -> None:
        """The health loop answered at ``index``: how long after the catalog moves it
        covers (waited for or not, so that a late answer raises the next wait)."""
        now, left = time.monotonic(), []
        high = self.LAG_BOUNDS[1]
        for awaited, started in self._awaited:
            if awaited > index:
                left.append((awaited, started))
            elif now - started <= 2 * high:
                # Longer: no answer came for that move (a deregistration without checks
                # wakes nobody), this one is for a later write.
                self._lags.append(min(now - started, high))
        self._awaited = deque(left, maxlen=16)

    async def _read_checks(self) -> None:
        async with self.engine.refetch_slots:
            result = await self.engine.api.health_state_bytes(datacenter=self.datacenter)
        self._on_checks(result)

    async def _explain(self, index: Index, names: set[str], tickets: dict[Watch[Any], int]) -> None:
        """A catalog move to ``index`` that the checks seen so far do not account for: the
        checks written with it (the health loop's answer), then the indexes of the services
        the catalog's diff names, then of those whose instances changed
        (``/v1/internal/ui/services``), then every check read now (a health loop slower
        than usual); sweep if it is still not accounted for."""
        try:
            came = True if self._explained(index) else await self._await_checks(index)
            if not self._explained(index) and names and len(names) <= self.MAX_NAMED:
                await self._prove(index, sorted(names), tickets)
            if not self._explained(index):
                await self._prove(index, await self._ui_named(), {})
            if not self._explained(index) and came is None and not self._checks_at_least(index):
                await self._read_checks()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("explaining catalog index %s failed: %s", index, exc)
            self.sweep()
            return
        if not self._explained(index):
            self.sweep()

    async def _prove(self, index: Index, names: list[str], tickets: dict[Watch[Any], int]) -> None:
        """Learn the own index of each of ``names`` (at most ``MAX_NAMED``) until one is
        ``index``. A watched service's re-fetch answers it (the one ``tickets`` holds, or
        one triggered here), which also brings its watches the change; a service nobody
        watches is asked once."""
        for name in names[: self.MAX_NAMED]:
            watches = [
                w
                for w in tuple(self.watches)
                if isinstance(w.spec, HealthServiceSpec) and w.spec.name == name
            ]
            if watches:
                pending = {w: tickets.get(w) for w in watches}
                pending |= self.trigger(w for w, ticket in pending.items() if ticket is None)
                # Bounded: a watch stopped meanwhile never answers (then: a sweep).
                async with asyncio.timeout(self.engine.options.wait):
                    answers = await asyncio.gather(
                        *(w.refetched(ticket) for w, ticket in pending.items() if ticket)
                    )
            else:
                async with self.engine.refetch_slots:
                    answer = await self.engine.api.health_service(name, datacenter=self.datacenter)
                answers = [answer.index]
            for own in answers:
                if isinstance(own, int):
                    self._remember(own)
            if self._explained(index):
                return

    async def _ui_baseline(self) -> None:
        with contextlib.suppress(Exception):
            await self._ui_named()

    async def _ui_named(self) -> list[str]:
        """The services whose instances (count, nodes) or tags changed since the last look
        at ``/v1/internal/ui/services``: those the health diff did not name meanwhile first.
        Nothing when the agent has no such endpoint or refuses it (an ACL): then a check-less
        change is swept, as before."""
        if self._ui_missing:
            return []
        try:
            async with self.engine.refetch_slots:
                result = await self.engine.api.ui_services(datacenter=self.datacenter)
        except DcyError as exc:
            if exc.transient:
                raise
            result = QueryResult(0, None)
        if not isinstance(result.body, list):
            log.info("no /v1/internal/ui/services: check-less changes are found by sweeps")
            self._ui_missing = True
            return []
        summary: dict[str, tuple[object, ...]] = {
            str(e.get("Name")): (
                e.get("InstanceCount"),
                tuple(e.get("Nodes") or ()),
                tuple(e.get("Tags") or ()),
            )
            for e in result.body
            if isinstance(e, dict) and not e.get("PeerName")
        }
        old, self._ui = self._ui, summary
        named, self._health_named = self._health_named, set()
        if old is None:
            return []
        changed = {n for n in summary.keys() | old.keys() if summary.get(n) != old.get(n)}
        return sorted(changed, key=lambda n: (n in named, n))


def _all_checks(entries: object) -> bool:
    """Whether a decoded answer is what ``/v1/health/state/any`` answers: checks, each with
    its node and ID."""
    return isinstance(entries, list) and all(
        isinstance(e, dict) and isinstance(e.get("Node"), str) and isinstance(e.get("CheckID"), str)
        for e in entries
    )


class KeyDetector(Detector):
    """``/v1/kv/<root>?recurse`` over the common root of the watched keys."""

    def __init__(self, engine: WatchEngine, group: Group, root: str) -> None:
        super().__init__(engine, group)
        self.root = root
        self._keys: dict[str, int] | None = None  # key → ModifyIndex
        self._raw: bytes | None = None  # the last answer, as Consul sent it

    def rebase(self) -> None:
        self._keys = None
        self._raw = None

    def loops(
        self,
    ) -> list[tuple[str, Callable[[Index], Awaitable[QueryResult]], Callable[[QueryResult], None]]]:
        api, wait, dc, root = self.engine.api, self.engine.options.wait, self.datacenter, self.root
        return [
            (
                f"keys {root}*",
                lambda index: api.kv_bytes(root, index=index, wait=wait, datacenter=dc),
                self._on_keys,
            )
        ]

    def _on_keys(self, result: QueryResult) -> None:
        """An answer of ``/v1/kv/<root>?recurse``, undecoded: as for the checks, only the
        entries around the bytes that differ from the last answer are decoded."""
        raw = result.body if isinstance(result.body, bytes) else b"[]"
        old, previous_raw = self._keys, self._raw
        self._raw = raw
        delta = None
        if old is not None and previous_raw is not None:
            delta = changed_entries(previous_raw, raw)
        if delta is not None and _all_keys(delta[0]) and _all_keys(delta[1]):
            before = {e["Key"]: e for e in delta[0]}
            after = {e["Key"]: e for e in delta[1]}
            changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
            assert old is not None
            for key in before.keys() - after.keys():
                old.pop(key, None)
            for key, entry in after.items():
                old[key] = int(entry.get("ModifyIndex") or 0)
        else:
            body = orjson.loads(raw) if raw.strip() else []
            if not _all_keys(body):
                raise DcyError(f"unexpected answer of /v1/kv/{self.root}: {raw[:200]!r}")
            keys = {e["Key"]: int(e.get("ModifyIndex") or 0) for e in body}
            self._keys = keys
            if old is None:
                return
            changed = {k for k in keys.keys() | old.keys() if keys.get(k) != old.get(k)}
        if not changed:
            return
        self.trigger(w for w in tuple(self.watches) if _covers(w.spec, changed))


def _all_keys(entries: object) -> bool:
    """Whether a decoded answer is what ``/v1/kv/<root>?recurse`` answers: entries with a
    ``Key``."""
    return isinstance(entries, list) and all(
        isinstance(e, dict) and isinstance(e.get("Key"), str) for e in entries
    )


def _covers(spec: object, keys: set[str]) -> bool:
    if isinstance(spec, KeySpec):
        return spec.key in keys
    if isinstance(spec, KeyPrefixSpec):
        return any(k.startswith(spec.prefix) for k in keys)
    return False


def common_root(paths: Iterable[str]) -> str:
    """The longest common prefix of ``paths``, cut after its last "/" (a folder)."""
    items = list(paths)
    if not items:
        return ""
    first, last = min(items), max(items)
    size = 0
    while size < min(len(first), len(last)) and first[size] == last[size]:
        size += 1
    prefix = first[:size]
    if len(items) == 1 and items[0] == prefix and not prefix.endswith("/"):
        return prefix  # one key or prefix: exactly it
    return prefix[: prefix.rfind("/") + 1]


class NodeDetector(Detector):
    """``/v1/catalog/nodes``: it moves whenever a node or a registration changes."""

    def loops(
        self,
    ) -> list[tuple[str, Callable[[Index], Awaitable[QueryResult]], Callable[[QueryResult], None]]]:
        api, wait, dc = self.engine.api, self.engine.options.wait, self.datacenter
        return [
            (
                "catalog nodes",
                lambda index: api.catalog_nodes(datacenter=dc, index=index, wait=wait),
                self._on_nodes,
            )
        ]

    def _on_nodes(self, result: QueryResult) -> None:
        if self._ready.is_set():
            self.trigger(tuple(self.watches))


class Detectors:
    """Every detector of an engine, started with its first watch, stopped with its last."""

    # The most blocking queries the detectors of one datacenter hold.
    MAX_DETECTORS = 4

    def __init__(self, engine: WatchEngine) -> None:
        self.engine = engine
        self._detectors: dict[Group, Detector] = {}
        self.wakeups = 0  # detector answers that moved their index
        self.sweeps = 0  # changes no diff could attribute

    def detectable(self, spec: object) -> bool:
        return group_of(spec) is not None

    @property
    def count(self) -> int:
        return len(self._detectors)

    def attach(self, watch: Watch[Any]) -> Detector | None:
        group = group_of(watch.spec)
        if group is None:
            return None
        detector = self._detectors.get(group)
        if group[0] == "kv":
            detector = self._kv_detector(group, detector, watch)
        elif detector is None:
            kind = HealthDetector if group[0] == "health" else NodeDetector
            detector = self._detectors[group] = kind(self.engine, group)
            detector.start()
        detector.add(watch)
        return detector

    def _kv_detector(self, group: Group, detector: Detector | None, watch: Watch[Any]) -> Detector:
        paths = [_path(w.spec) for w in (detector.watches if detector else ())]
        root = common_root([*paths, _path(watch.spec)])
        if isinstance(detector, KeyDetector) and detector.root == root:
            return detector
        # A wider root: a new detector, whose first answer is its baseline; its queries
        # re-fetch once after it, so that nothing written in between is lost.
        replacement = KeyDetector(self.engine, group, root)
        self._detectors[group] = replacement
        replacement.start()
        if detector is not None:
            for old in tuple(detector.watches):
                old.detector = replacement
                replacement.add(old)
            asyncio.get_running_loop().create_task(self._hand_over(detector, replacement))
        return replacement

    @staticmethod
    async def _hand_over(old: Detector, new: Detector) -> None:
        await old.aclose()
        await new.ready()
        new.sweep()

    def detach(self, watch: Watch[Any]) -> None:
        detector = watch.detector
        if detector is None:
            return
        watch.detector = None
        detector.watches.discard(watch)
        if not detector.watches and self._detectors.get(detector.group) is detector:
            del self._detectors[detector.group]
            task = asyncio.get_running_loop().create_task(detector.aclose())
            self.engine._stopping.add(task)
            task.add_done_callback(self.engine._stopping.discard)

    async def aclose(self) -> None:
        detectors = list(self._detectors.values())
        self._detectors.clear()
        await asyncio.gather(*(d.aclose() for d in detectors), return_exceptions=True)


def _path(spec: object) -> str:
    if isinstance(spec, KeySpec):
        return spec.key
    if isinstance(spec, KeyPrefixSpec):
        return spec.prefix
    return ""
