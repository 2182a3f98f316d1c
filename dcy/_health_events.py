"""Health-state subscriptions: check-state transitions (passing → warning → critical and back).

Built on the watch engine like everything else that reads Consul: all services of a datacenter
come from one ``/v1/health/state/any`` loop (:class:`~dcy._specs.HealthStateSpec`), one
service from the same ``/v1/health/service/<name>`` loop that resolution uses. Consecutive
snapshots are diffed per check (keyed by node and check ID) into :class:`Transition` records.

Rules:

* The first snapshot is the baseline: checks already in some state are not reported.
* Debounce: a new state is reported only once it has held for ``debounce`` seconds; a flap
  back to the reported state inside that window reports nothing. Chains inside the window
  (passing → warning → critical) restart the window and report only where they settle.
* A check that appears is reported only if it settles in a state other than passing, with
  ``old_status`` ``"absent"``; one that appears passing is adopted silently (a registration is
  not an alert).
* A check that disappears is reported with ``new_status`` ``"deregistered"`` (an instance
  reaped by ``deregister_critical_service_after`` is worth knowing about); a re-registration
  inside the debounce window, as after an agent restart, reports nothing.
* A watch Consul refuses for good (the token was deleted or lost a permission, TLS fails)
  ends: ``wait_ended()`` returns that error, ``async for`` raises it after the transitions
  already reported, and a callback is not called again. Outages never end it.
* Snapshots marked stale (Consul unreachable) carry no news and are ignored. Between two
  snapshots the engine keeps only the newest, so with ``debounce=0`` a state that lasted
  shorter than one round trip to Consul may be skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from dcy._consul import ConsulAPI, Index, QueryResult
from dcy._errors import DcyError
from dcy._query import Check, Instance, ServiceQuery
from dcy._specs import HealthServiceSpec
from dcy._watch import Snapshot, Subscription, WatchEngine, WatchSpec

log = logging.getLogger("dcy.health")

ABSENT = "absent"
DEREGISTERED = "deregistered"

_CheckKey = tuple[str, str]  # (node, check ID): check IDs are unique per node only


@dataclass(frozen=True, slots=True)
class Transition:
    """One check that changed state, with the check's data when the change was reported."""

    check_id: str
    name: str
    node: str
    service_id: str
    service_name: str
    old_status: str  # passing, warning, critical, or "absent" for a check that appeared
    new_status: str  # passing, warning, critical, or "deregistered" for one that vanished
    output: str
    notes: str
    at: float  # time.time() when Consul was first seen reporting the new state

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.at))
        subject = f"service {self.service_name} ({self.service_id})" if self.service_id else "node"
        output = self.output.strip().splitlines()[0] if self.output.strip() else ""
        return (
            f"{stamp}Z {self.old_status} -> {self.new_status}: {subject} on {self.node}, "
            f"check {self.name!r} [{self.check_id}]" + (f": {output}" if output else "")
        )


@dataclass(slots=True)
class _Pending:
    status: str
    since: float  # time.monotonic()
    at: float  # time.time()
    check: Check


class TransitionTracker:
    """Diffs consecutive check lists into transitions, debounced. No I/O, no clock of its
    own: the caller passes the time, so the rules can be tested step by step."""

    def __init__(self, debounce: float = 0.0) -> None:
        if debounce < 0:
            raise ValueError(f"debounce must not be negative, got {debounce!r}")
        self.debounce = debounce
        self._reported: dict[_CheckKey, str] | None = None  # None until the baseline
        self._latest: dict[_CheckKey, Check] = {}
        self._pending: dict[_CheckKey, _Pending] = {}

    @property
    def has_baseline(self) -> bool:
        return self._reported is not None

    def observe(self, checks: Iterable[Check], *, now: float, at: float) -> None:
        """Take in the full list of checks as Consul reports it now."""
        current = {(c.node, c.check_id): c for c in checks}
        reported = self._reported
        if reported is None:
            self._reported = {key: check.status for key, check in current.items()}
            self._latest = current
            return
        for key in current.keys() | reported.keys() | self._pending.keys():
            check = current.get(key)
            observed = check.status if check is not None else ABSENT
            known = reported.get(key, ABSENT)
            if observed == known or (known == ABSENT and observed == "passing"):
                # Back where the consumer thinks it is, or a healthy newcomer: nothing to say.
                self._pending.pop(key, None)
                if known == ABSENT and check is not None:
                    reported[key] = observed
                continue
            pending = self._pending.get(key)
            latest = check if check is not None else self._latest[key]
            if pending is not None and pending.status == observed:
                pending.check = latest
            else:
                self._pending[key] = _Pending(observed, now, at, latest)
        # Keep the last data of vanished checks until their removal is reported.
        vanished = reported.keys() - current.keys()
        self._latest = {k: self._latest[k] for k in vanished if k in self._latest} | current

    def next_deadline(self) -> float | None:
        """When the oldest pending change has held long enough (time.monotonic())."""
        if not self._pending:
            return None
        return min(p.since for p in self._pending.values()) + self.debounce

    def due(self, now: float) -> list[Transition]:
        """The pending changes that have held for ``debounce`` seconds, oldest first."""
        reported = self._reported
        if reported is None:
            return []
        ready = sorted(
            (p.since, key) for key, p in self._pending.items() if now - p.since >= self.debounce
        )
        transitions = []
        for _, key in ready:
            pending = self._pending.pop(key)
            old = reported.get(key, ABSENT)
            if pending.status == ABSENT:
                reported.pop(key, None)
                self._latest.pop(key, None)
                new = DEREGISTERED
            else:
                reported[key] = new = pending.status
            check = pending.check
            transitions.append(
                Transition(
                    check_id=check.check_id,
                    name=check.name,
                    node=check.node,
                    service_id=check.service_id,
                    service_name=check.service_name,
                    old_status=old,
                    new_status=new,
                    output=check.output,
                    notes=check.notes,
                    at=pending.at,
                )
            )
        return transitions


TransitionCallback = Callable[[Transition], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class HealthStateSpec:
    """Every check of a datacenter, node and service checks alike, in any state."""

    datacenter: str | None = None

    async def fetch(self, api: ConsulAPI, index: Index, wait: float) -> QueryResult:
        return await api.health_state("any", datacenter=self.datacenter, index=index, wait=wait)

    def decode(self, body: Any) -> tuple[Check, ...]:
        checks = (Check.from_api(raw) for raw in body or ())
        return tuple(sorted(checks, key=lambda c: (c.node, c.check_id)))

    def __str__(self) -> str:
        return f"health state{'@' + self.datacenter if self.datacenter else ''}"


class HealthWatch:
    """Transitions of the checks one watch sees. Give a callback (sync or async, run in
    order, one at a time), or iterate with ``async for``; close with :meth:`aclose` or
    ``async with``."""

    def __init__(
        self,
        engine: WatchEngine,
        spec: WatchSpec[Any],
        checks_of: Callable[[Any], Iterable[Check]],
        *,
        debounce: float = 0.0,
        callback: TransitionCallback | None = None,
    ) -> None:
        self.spec = spec
        self._tracker = TransitionTracker(debounce)
        self._checks_of = checks_of
        self._callback = callback
        self._wake = asyncio.Event()
        self._baseline = asyncio.Event()
        self._queue: asyncio.Queue[Transition | DcyError | None] = asyncio.Queue()
        self._closed = False
        self._blind = False
        #: The refusal that ended the watch (see :meth:`wait_ended`); None while it runs.
        self.error: DcyError | None = None
        self._ended = asyncio.Event()
        self._subscription: Subscription[Any] = engine.subscribe(
            spec, self._on_snapshot, on_end=self._on_end
        )
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"dcy-health-watch:{spec}"
        )

    @property
    def debounce(self) -> float:
        return self._tracker.debounce

    async def ready(self, timeout: float | None = None) -> None:
        """Wait until the baseline is taken: changes after this are reported. Raises like the
        first lookup does (ConsulUnavailable after ``timeout``, AclDenied at once)."""
        await self._subscription.watch.first(timeout)
        await self._baseline.wait()

    async def wait_ended(self) -> DcyError:
        """Return (the refusal) once Consul refused the watch for good: nothing more will be
        reported. An alerting program should stop on it rather than watch nothing."""
        await self._ended.wait()
        assert self.error is not None
        return self.error

    def _on_end(self, error: DcyError) -> None:
        # The engine has logged it; whoever waits on the end decides what it means.
        self.error = error
        self._ended.set()
        self._queue.put_nowait(error)

    def _on_snapshot(self, snapshot: Snapshot[Any]) -> None:
        if snapshot.stale:
            # An alerting consumer must hear that it is blind, not only that all is quiet.
            log.warning("%s: lost contact with Consul (%s); retrying", self.spec, snapshot.error)
            self._blind = True
            return
        if self._blind:
            log.warning("%s: Consul answers again", self.spec)
            self._blind = False
        self._tracker.observe(
            self._checks_of(snapshot.value), now=time.monotonic(), at=snapshot.contacted_at
        )
        self._baseline.set()
        self._wake.set()

    async def _run(self) -> None:
        while True:
            deadline = self._tracker.next_deadline()
            delay = None if deadline is None else deadline - time.monotonic()
            if delay is None or delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
            self._wake.clear()
            for transition in self._tracker.due(time.monotonic()):
                await self._emit(transition)

    async def _emit(self, transition: Transition) -> None:
        if self._callback is None:
            self._queue.put_nowait(transition)
            return
        try:
            result = self._callback(transition)
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("health watch callback failed on %s; it stays subscribed", transition)

    def __aiter__(self) -> AsyncIterator[Transition]:
        if self._callback is not None:
            raise TypeError("this health watch delivers to its callback; iterate one without")
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Transition]:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            if isinstance(item, DcyError):
                raise item
            yield item

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._subscription.aclose()
        self._queue.put_nowait(None)  # ends every `async for`

    async def __aenter__(self) -> HealthWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def health_watch(
    engine: WatchEngine,
    query: ServiceQuery | None,
    *,
    datacenter: str | None = None,
    debounce: float = 0.0,
    callback: TransitionCallback | None = None,
) -> HealthWatch:
    """Transitions of every check in ``datacenter`` (``query`` None) or of one service's
    instances (their node checks included: they make the instance unhealthy too)."""
    if query is None:
        return HealthWatch(
            engine, HealthStateSpec(datacenter), _same, debounce=debounce, callback=callback
        )
    spec = HealthServiceSpec.of(query, datacenter=datacenter)
    return HealthWatch(engine, spec, _checks_of_instances, debounce=debounce, callback=callback)


def _same(checks: tuple[Check, ...]) -> tuple[Check, ...]:
    return checks


def _checks_of_instances(instances: tuple[Instance, ...]) -> Iterable[Check]:
    # A node check appears in the entry of every instance on that node; the tracker keys by
    # (node, check ID), so the repeats collapse into one.
    for instance in instances:
        yield from instance.checks
