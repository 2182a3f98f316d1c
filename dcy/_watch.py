"""The watch engine: the one place in dcy that reads from Consul.

One blocking-query loop per distinct query (a :class:`WatchSpec`), shared by every consumer in
the process, publishing immutable :class:`Snapshot` objects. Rules, after Consul's "blocking
queries" documentation (https://developer.hashicorp.com/consul/api-docs/features/blocking):

* an answer with the index we already had means nothing changed: nobody is woken;
* an index that went backwards resets the loop (next query non-blocking, index 0); an index of
  0 or less is treated as 1, so a buggy answer cannot turn the loop into a busy loop; the first
  query after an error does not block either, so a restarted agent is seen at once;
* ``wait`` stays well under the HTTP timeout (the seam adds wait/16 and a margin);
* pacing (``dcy._pacing``): the query after an answer with news goes out at once (but for a
  loop's first answer while others still wait for theirs: its index loses nothing); an answer
  without news that came back quickly waits ``quiet_interval`` (a hot loop), and a sustained
  stream of changes is held to one query per ``min_interval`` after a burst of ``burst``;
* on transient errors (``dcy.Backoff``'s rule: an unreachable agent, an election, 429/5xx):
  the shared retry policy, retrying forever. Consumers keep the last good snapshot, marked
  stale; nothing is ever replaced by an empty answer we did not get;
* while the agent gives no answer at all (refused, reset, timed out), one probe per engine
  (:class:`AgentProbe`) asks it every ``AGENT_PROBE.cap`` at most, and wakes every waiting
  loop the moment it answers again: the loops' own back-off may have grown to its cap (5 s
  here, a minute in dcy-template), but a returning agent is seen within the probe's cap.
  Only a probe that saw the agent away wakes anyone, so an agent that answers the probe
  but fails the queries cannot turn the loops into a hot loop;
* on errors that will not heal (ACL refused, TLS, a refused request) the loop ends at once:
  the error is kept (``Watch.first`` and iterating subscribers raise it, callbacks see the
  snapshot marked stale with it) and the engine forgets the watch, so that a later user starts
  a new one (after the token or the policy was fixed, say).

Consumers are woken through their own mailbox (latest snapshot wins) and their own task, so a
slow or failing subscriber never delays the loop or the others. There are no locks: the loop
is the only writer and runs on the event loop, like every reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from dcy._backoff import Backoff
from dcy._consul import ConsulAPI, Index, QueryResult
from dcy._errors import ConsulError, ConsulUnavailable, DcyError
from dcy._pacing import QueryPacer

if TYPE_CHECKING:
    from dcy._detect import Detector

log = logging.getLogger("dcy.watch")

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


# How long aclose() waits for cancelled loops to end.
STOP_GRACE = 5.0
# Retries after an outage: quick at first (an agent restart takes a second or two), then every
# few seconds at most.
WATCH_BACKOFF = Backoff(base=0.1, cap=5.0)
# While the agent gives no answer at all: one cheap request per engine at most every half
# second, whatever the loops' back-off. An agent back from a restart is then seen within half
# a second by every loop (a template re-renders within a second of it), while a hundred loops
# waiting out their own, longer back-off cost the agent nothing meanwhile.
AGENT_PROBE = Backoff(base=0.1, cap=0.5)
# Blocking queries an engine keeps for what cannot be detected (the catalog, a lock key, an
# agent service) and for the change detectors themselves, past the budget.
MIN_BLOCKING = 8


@dataclass(frozen=True, slots=True)
class WatchOptions:
    """Tuning of every loop of an engine. Times in seconds. ``min_interval``, ``burst`` and
    ``quiet_interval`` pace the queries (see ``dcy._pacing``); ``backoff`` paces the retries
    after transient errors (its deadline, if any, is ignored: a watch never gives up on an
    outage)."""

    wait: float = 60.0
    min_interval: float = 0.002
    burst: int = 20
    quiet_interval: float = 0.1
    backoff: Backoff = WATCH_BACKOFF
    first_answer_timeout: float = 10.0
    # The most connections the process opens to its agent, whatever it watches (a Consul
    # agent refuses a client address past http_max_conns_per_client = 200, every program on
    # it alike), and how many of them blocking queries may never take: registrations,
    # heartbeats and re-fetches go through those at once. See dcy._detect.
    max_connections: int = 32
    reserved_connections: int = 8

    def pacer(self) -> QueryPacer:
        """The pacing of one loop under these options (dcy/_pacing.py)."""
        return QueryPacer(
            min_interval=self.min_interval, burst=self.burst, quiet_interval=self.quiet_interval
        )

    @property
    def blocking_connections(self) -> int:
        """How many blocking queries may wait at once."""
        return self.max_connections - self.reserved_connections

    def __post_init__(self) -> None:
        for name in ("max_connections", "reserved_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.blocking_connections < MIN_BLOCKING:
            raise ValueError(
                f"max_connections ({self.max_connections}) must leave at least {MIN_BLOCKING} "
                f"connections for blocking queries above reserved_connections "
                f"({self.reserved_connections})"
            )
        for name in ("wait", "first_answer_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("min_interval", "quiet_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)!r}")
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1:
            raise ValueError(f"burst must be an int >= 1, got {self.burst!r}")


@dataclass(frozen=True, slots=True)
class Snapshot(Generic[T]):
    """The result of a query as last seen. ``stale`` is set while Consul cannot be reached;
    ``value`` then stays the last good one."""

    value: T
    index: Index
    contacted_at: float  # time.time() of the last successful answer
    stale: bool = False
    error: str | None = None

    @property
    def age(self) -> float:
        """Seconds since Consul last confirmed this value."""
        return max(0.0, time.time() - self.contacted_at)


class WatchSpec(Protocol[T_co]):
    """What one loop asks Consul. Specs are hashable: equal specs share one loop."""

    def __hash__(self) -> int: ...

    async def fetch(self, api: ConsulAPI, index: Index, wait: float) -> QueryResult: ...

    def decode(self, body: Any) -> T_co: ...


Callback = Callable[[Snapshot[Any]], Awaitable[None] | None]


class Subscription(Generic[T]):
    """A consumer of one watch: a callback run in its own task, or an async iterator.

    Its mailbox keeps only the newest snapshot, so a slow consumer skips intermediate states
    instead of queueing them. It is given the current snapshot first, if there is one. When
    the watch ends on an error that will not heal (an ACL refusal), iteration raises it after
    the last snapshot; a callback is not called again.
    """

    def __init__(
        self,
        watch: Watch[T],
        callback: Callback | None,
        on_end: Callable[[DcyError], None] | None = None,
    ) -> None:
        self.watch = watch
        self._callback = callback
        self._on_end = on_end
        self._latest: Snapshot[T] | None = None
        self._pending = asyncio.Event()
        self._closed = False
        self._error: DcyError | None = None
        self._task: asyncio.Task[None] | None = None
        if callback is not None:
            self._task = asyncio.get_running_loop().create_task(
                self._deliver(), name=f"dcy-subscriber:{watch.spec}"
            )

    def offer(self, snapshot: Snapshot[T]) -> None:
        """Called by the loop: never awaits, never runs user code."""
        self._latest = snapshot
        self._pending.set()

    def end(self, error: DcyError) -> None:
        """Called by the loop when it ends for good."""
        self._error = error
        self._pending.set()

    async def _deliver(self) -> None:
        assert self._callback is not None
        while (snapshot := await self._next()) is not None:
            try:
                result = self._callback(snapshot)
                if inspect.isawaitable(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("subscriber of %s failed; it stays subscribed", self.watch.spec)

    async def _next(self) -> Snapshot[T] | None:
        """The newest snapshot once there is one; None once the subscription is closed."""
        while True:
            await self._pending.wait()
            self._pending.clear()
            if self._closed:
                return None
            latest, self._latest = self._latest, None
            if latest is not None:
                if self._error is not None:
                    self._pending.set()  # the error follows this last snapshot
                return latest
            if self._error is not None:
                if self._callback is not None:
                    if self._on_end is not None:
                        self._on_end(self._error)
                    else:
                        log.error("watch of %s ended: %s", self.watch.spec, self._error)
                    return None
                raise self._error

    def __aiter__(self) -> AsyncIterator[Snapshot[T]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Snapshot[T]]:
        while (snapshot := await self._next()) is not None:
            yield snapshot

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Wakes an iterator waiting for the next snapshot, so `async for` ends on close.
        self._pending.set()
        self.watch._unsubscribe(self)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def __aenter__(self) -> Subscription[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Watch(Generic[T]):
    """One blocking-query loop and its consumers. Create through :meth:`WatchEngine.acquire`."""

    def __init__(self, spec: WatchSpec[T], engine: WatchEngine) -> None:
        self.spec = spec
        self.engine = engine
        self.snapshot: Snapshot[T] | None = None
        self.queries = 0
        self.users = 0
        self.last_error: DcyError | None = None
        self._subscribers: list[Subscription[T]] = []
        self._answered = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Past the connection budget: the detector whose answers say when to re-fetch.
        self.detector: Detector | None = None
        self._wanted = asyncio.Event()
        # Detected mode: re-fetches numbered as they are sent, the last one answered (or
        # failed), and the index it brought: a detector proving a change by a service's own
        # index awaits the re-fetch it triggered instead of asking the same query again.
        self._refetch_sent = 0
        self._refetch_done = 0
        self._refetch_index: Index | None = None
        self._refetched = asyncio.Event()
        # Told every answer that moved the index, news or not (a change detector sharing
        # this query; see dcy._detect). One returning True acts on it: news for the pacing
        # too (a check-less registration changes no catalog answer, and is all a detector
        # has to go by), so that the next query goes out at once.
        self.answer_observers: list[Callable[[QueryResult], bool]] = []
        self.detector_users = 0  # of `users`, change detectors sharing this query

    def start(self) -> None:
        self.detector = self.engine._detector_for(self)
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"dcy-watch:{self.spec}"
        )

    def restart(self) -> None:
        """Start over in the engine's current mode (blocking, or detected); the snapshot
        stays. Cancelling a blocking query closes its connection."""
        if self._task is not None:
            self._task.cancel()
            self.engine._stopping.add(self._task)
            self._task.add_done_callback(self.engine._stopping.discard)
        self._wanted.clear()
        self.start()

    def trigger(self) -> int:
        """A detector saw a change this query may show: re-fetch it. Returns the number of
        the re-fetch that will show it (see :meth:`refetched`)."""
        self._wanted.set()
        return self._refetch_sent + 1

    async def refetched(self, ticket: int) -> Index | None:
        """The index of re-fetch number ``ticket`` or a later one, once answered; None if
        it failed. A stopped watch never answers: callers bound the wait."""
        while self._refetch_done < ticket:
            self._refetched.clear()
            await self._refetched.wait()
        return self._refetch_index

    async def first(self, timeout: float | None = None) -> Snapshot[T]:
        """The current snapshot, waiting for Consul's first answer if there is none yet.

        Raises ConsulUnavailable after ``timeout`` without an answer, and any other error
        (ACL, TLS, a refused request) at once: waiting cannot fix those."""
        if self.snapshot is not None:
            return self.snapshot
        limit = self.engine.options.first_answer_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while self.snapshot is None:
            if self.last_error is not None and not self.last_error.transient:
                raise self.last_error
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConsulUnavailable(
                    f"no answer from Consul for {self.spec} within {limit:g}s"
                    + (f": {self.last_error}" if self.last_error else "")
                ) from self.last_error
            self._answered.clear()
            # asyncio.timeout rather than wait_for, which in Python 3.11 can lose a
            # cancellation arriving together with the answer.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._answered.wait()
        return self.snapshot

    def _add_subscriber(
        self, callback: Callback | None, on_end: Callable[[DcyError], None] | None = None
    ) -> Subscription[T]:
        subscription = Subscription(self, callback, on_end)
        self._subscribers.append(subscription)
        if self.snapshot is not None:
            subscription.offer(self.snapshot)
        return subscription

    def _unsubscribe(self, subscription: Subscription[T]) -> None:
        if subscription in self._subscribers:
            self._subscribers.remove(subscription)
            self.engine.release(self)

    def _publish(self, snapshot: Snapshot[T]) -> None:
        self.snapshot = snapshot
        for subscriber in tuple(self._subscribers):
            subscriber.offer(snapshot)

    async def _run(self) -> None:
        self.engine._starting.add(self)
        try:
            if self.detector is not None:
                await self._detected_loop(self.detector)
            else:
                await self._loop()
        finally:
            self.engine._starting.discard(self)

    def _refetch_answered(self, index: Index | None) -> None:
        self._refetch_done = self._refetch_sent
        self._refetch_index = index
        self._refetched.set()

    async def _detected_loop(self, detector: Detector) -> None:
        """Non-blocking re-fetches when the detector says so (and once per ``wait`` in any
        case, as a blocking query would renew itself), each compared with the last answer:
        one that changed nothing wakes nobody."""
        options = self.engine.options
        retry = replace(options.backoff, deadline=None).start()
        await detector.ready()
        while True:
            index: Index = self.snapshot.index if self.snapshot is not None else 0
            self._wanted.clear()
            self._refetch_sent += 1
            self.queries += 1
            try:
                async with self.engine.refetch_slots:
                    self.engine.refetches += 1
                    result = await self.spec.fetch(self.engine.api, 0, options.wait)
                self._accept(result, index)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._refetch_answered(None)
                if self._ends_on(exc):
                    return
                await asyncio.sleep(retry.next_delay() or 0.0)
                continue
            self._refetch_answered(result.index)
            retry.reset()
            self.engine._starting.discard(self)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(options.wait * (1 + random.random() / 16)):
                    await self._wanted.wait()

    def _ends_on(self, exc: Exception) -> bool:
        """Record a failed query; True when the loop must end (an error that will not heal),
        the engine then forgetting this watch."""
        if self._fail(exc):
            return False
        self.engine._forget(self)
        return True

    async def _loop(self) -> None:
        options = self.engine.options
        api = self.engine.api
        retry = replace(options.backoff, deadline=None).start()
        pacer = options.pacer()
        index: Index = 0
        pause = 0.0
        while True:
            if pause > 0:
                await asyncio.sleep(pause)
            sent = time.monotonic()
            pacer.spend(sent)
            self.queries += 1
            first = self.snapshot is None
            try:
                result = await self.spec.fetch(api, index, options.wait)
                index, news = self._accept(result, index)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._ends_on(exc):
                    return
                # After an error the agent may be a new one (restarted, or a server restored
                # from a snapshot) whose index is below ours: a blocking query with our index
                # would then wait out the whole `wait` before the backwards rule could fire.
                # Ask without blocking first; it costs one request per recovery.
                index = 0
                delay = retry.next_delay() or 0.0
                if _unanswered(exc):
                    if await self.engine.probe.wait_for_return(delay):
                        # Back after an outage: a failure after this one starts the back-off
                        # afresh (a dev agent answers 500 until it has elected itself).
                        retry.reset()
                else:
                    await asyncio.sleep(delay)
                pause = 0.0
                continue
            retry.reset()
            # While other loops still wait for their first answer (a template over hundreds
            # of services starting), the blocking query after this loop's first answer waits
            # like one after an answer without news: its index keeps any change made
            # meanwhile, and sent at once it would compete with the others' first answers
            # and with the first render. Alone, it goes out at once.
            if first:
                self.engine._starting.discard(self)
            crowded = first and bool(self.engine._starting)
            pause = pacer.delay(time.monotonic(), sent_at=sent, news=news and not crowded)
            # Let the subscribers this answer woke run before the next request goes out:
            # sending it first puts a socket write (milliseconds on a busy host, see
            # bench/propagation.py) ahead of every callback. The index keeps any change
            # made meanwhile, so yielding here cannot lose one. Twice: a callback often wakes
            # one more task (dcy-template's renderer), which then runs first too.
            await asyncio.sleep(0)
            await asyncio.sleep(0)

    def _accept(self, result: QueryResult, index: Index) -> tuple[Index, bool]:
        """Publish an answer if it changed anything; return the index of the next query and
        whether anything was published or acted on."""
        now = time.time()
        previous = self.snapshot
        new_index = result.index
        if isinstance(new_index, int) and new_index <= 0:
            new_index = 1
        self.last_error = None
        if previous is not None and new_index == index:
            # Same index: the wait ran out without a change. Note the contact, wake nobody
            # unless this answer ends an outage.
            self.snapshot = replace(previous, contacted_at=now, stale=False, error=None)
            if previous.stale:
                self._publish(self.snapshot)
            self._answered.set()
            return index, previous.stale
        acted = False
        for observe in tuple(self.answer_observers):
            acted = observe(result) or acted
        value = self.spec.decode(result.body)
        snapshot = Snapshot(value, new_index, now)
        news = previous is None or previous.stale or previous.value != value
        if news:
            self._publish(snapshot)
        else:
            self.snapshot = snapshot
        self._answered.set()
        if isinstance(new_index, int) and isinstance(index, int) and new_index < index:
            log.info("index of %s went backwards (%s → %s): resetting", self.spec, index, new_index)
            return 0, news or acted
        return new_index, news or acted

    def mark_stale(self, error: DcyError) -> None:
        """Consul cannot be asked (a detector of this query failed): keep the value, say so."""
        self.last_error = error
        self._answered.set()
        if self.snapshot is not None and not self.snapshot.stale:
            self._publish(replace(self.snapshot, stale=True, error=str(error)))

    def end(self, error: DcyError) -> None:
        """End for good with ``error``, told to every subscriber (a detector of this query
        was refused): the next user starts a new watch."""
        self._fail(error)
        self.engine._forget(self)
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            self.engine._stopping.add(self._task)
            self._task.add_done_callback(self.engine._stopping.discard)

    def _fail(self, exc: Exception) -> bool:
        """Record a failed query; whether the loop should retry it."""
        if isinstance(exc, DcyError):
            error = exc
            retry = exc.transient
            if retry:
                log.debug("watch of %s failed: %s", self.spec, exc)
            else:
                log.warning("watch of %s ended: %s", self.spec, exc)
        else:
            # Not an answer Consul gives (a proxy's garbage, a truncated body): worth another
            # try, and worth a stack trace.
            log.exception("watch of %s got an unusable answer", self.spec)
            error = ConsulError(f"unexpected answer for {self.spec}: {exc!r}")
            retry = True
        self.last_error = error
        self._answered.set()
        if self.snapshot is not None and not self.snapshot.stale:
            self._publish(replace(self.snapshot, stale=True, error=str(error)))
        if not retry:
            for subscriber in tuple(self._subscribers):
                subscriber.end(error)
        return retry

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for subscriber in tuple(self._subscribers):
            await subscriber.aclose()


def _unanswered(exc: Exception) -> bool:
    """Whether the agent gave no answer at all (refused, reset, timed out), as opposed to
    an answer saying it cannot serve the request now (a 5xx, a 429)."""
    return isinstance(exc, ConsulUnavailable) and exc.status is None


class AgentProbe:
    """Tells the loops of an engine when an agent that gave no answer answers again.

    Loops that failed without an answer wait for :meth:`wait_for_return` (at most their own
    back-off delay). The first of them starts one probe task, which asks the agent who it is
    (``/v1/agent/self``: local to the agent, no servers involved) every ``AGENT_PROBE`` delay
    until it answers: any answer, a refusal too, means it is there. If the probe saw it away
    at least once, every waiting loop is woken at once; if its first request is answered,
    nobody is (the failure was the query's own), and the loops keep their back-off."""

    def __init__(self, api: ConsulAPI, policy: Backoff = AGENT_PROBE) -> None:
        self._api = api
        self._policy = policy
        self._returned: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.probes = 0  # requests sent, for tests and metrics

    async def wait_for_return(self, timeout: float) -> bool:
        """Sleep ``timeout`` seconds, or less if the agent is seen answering again
        meanwhile (then True)."""
        if self._task is None or self._task.done():
            self._returned = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(
                self._probe(self._returned), name="dcy-agent-probe"
            )
        assert self._returned is not None
        returned = self._returned
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await returned.wait()
        return returned.is_set()

    async def _probe(self, returned: asyncio.Event) -> None:
        retry = self._policy.start()
        away = False
        while True:
            await asyncio.sleep(retry.next_delay() or self._policy.cap)
            self.probes += 1
            try:
                await self._api.agent_info()
            except ConsulUnavailable as exc:
                if exc.status is None:
                    away = True
                    continue
            except DcyError:
                pass  # a refusal (an ACL without agent:read) is an answer too
            break
        if away:
            log.info("Consul answers again: resuming every watch")
            returned.set()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


class WatchEngine:
    """Owns every loop of one process (one per distinct spec) and the seam they share."""

    def __init__(self, api: ConsulAPI, options: WatchOptions | None = None) -> None:
        self.api = api
        self.options = options or WatchOptions()
        self.probe = AgentProbe(api)
        self._watches: dict[Hashable, Watch[Any]] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._starting: set[Watch[Any]] = set()  # loops still without a first answer
        self._closed = False
        # Past the budget ("wide"): queries that can be detected stop blocking (dcy._detect).
        from dcy._detect import Detectors

        self.detectors = Detectors(self)
        self.wide = False
        # Re-fetches are quick non-blocking reads, run only past the budget, where blocking
        # queries are the few detectors: half the blocking connections may serve them (a
        # first render over 1,000 services asks 1,000 of them at once). The connector's
        # limit keeps the total within the budget whatever happens.
        self.refetch_slots = asyncio.Semaphore(max(1, self.options.blocking_connections // 2))
        self.refetches = 0  # non-blocking re-fetches of detected queries

    def _detector_for(self, watch: Watch[Any]) -> Detector | None:
        return self.detectors.attach(watch) if self.wide else None

    def _rebalance(self) -> None:
        """Go wide when the blocking queries would not fit in the budget; back to one
        blocking query per query when they fit in half of it (no flapping at the edge)."""
        # Over HTTP/2 a connection carries many blocking queries (dcy._h2).
        capacity = self.options.blocking_connections * self.api.streams_per_connection
        room = capacity - self.detectors.MAX_DETECTORS
        # A query only detectors use (their shared catalog query) leaves with them: it must
        # not keep the engine past the budget on its own.
        count = sum(1 for w in self._watches.values() if w.users > w.detector_users)
        wide = count > room if not self.wide else count > room // 2
        if wide == self.wide:
            return
        self.wide = wide
        log.info(
            "%d queries watched: %s",
            count,
            "past the connection budget, detecting changes with wide queries"
            if wide
            else "one blocking query per query again",
        )
        for watch in self._watches.values():
            if self.detectors.detectable(watch.spec):
                if watch.detector is not None:
                    self.detectors.detach(watch)
                watch.restart()

    @property
    def detector_wakeups(self) -> int:
        """Answers of the change detectors that moved their index."""
        return self.detectors.wakeups

    @property
    def blocking_queries(self) -> int:
        """Watches holding a blocking query of their own."""
        return sum(1 for w in self._watches.values() if w.detector is None)

    def acquire(self, spec: WatchSpec[T]) -> Watch[T]:
        """The watch for ``spec``, started if new; pair with :meth:`release` (subscriptions
        release themselves)."""
        if self._closed:
            raise RuntimeError("the watch engine is closed")
        watch = self._watches.get(spec)
        if watch is None:
            watch = Watch(spec, self)
            self._watches[spec] = watch
            self._rebalance()
            if watch._task is None:
                watch.start()
        watch.users += 1
        return watch

    def subscribe(
        self,
        spec: WatchSpec[T],
        callback: Callback | None = None,
        *,
        on_end: Callable[[DcyError], None] | None = None,
    ) -> Subscription[T]:
        """Subscribe to ``spec``'s snapshots; the loop lives as long as a subscriber does.
        ``on_end`` is told, instead of the log, when the loop ends on an error that will not
        heal (a callback is not called again after that)."""
        return self.acquire(spec)._add_subscriber(callback, on_end)

    def _forget(self, watch: Watch[Any]) -> None:
        """A loop that ended for good leaves the table: the next user starts a new one."""
        if self._watches.get(watch.spec) is watch:
            del self._watches[watch.spec]
            self.detectors.detach(watch)
            self._rebalance()

    def release(self, watch: Watch[Any]) -> None:
        watch.users -= 1
        if watch.users <= 0 and self._watches.get(watch.spec) is watch:
            del self._watches[watch.spec]
            self.detectors.detach(watch)
            self._rebalance()
            if watch._task is not None:
                watch._task.cancel()
                # Awaited by aclose, so that a closed engine leaves no task behind.
                self._stopping.add(watch._task)
                watch._task.add_done_callback(self._stopping.discard)

    @property
    def watches(self) -> tuple[Watch[Any], ...]:
        return tuple(self._watches.values())

    async def aclose(self) -> None:
        self._closed = True
        watches = list(self._watches.values())
        self._watches.clear()
        await asyncio.gather(*(w.stop() for w in watches), return_exceptions=True)
        await self.probe.aclose()
        await self.detectors.aclose()
        if self._stopping:
            # Cancelled already; a loop that ignores it must not hang the close for ever.
            _, stuck = await asyncio.wait(set(self._stopping), timeout=STOP_GRACE)
            for task in stuck:
                log.error("watch task %s did not stop within %gs", task.get_name(), STOP_GRACE)
