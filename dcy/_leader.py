"""Leader election: at most one holder of a named lock, across processes and nodes.

    async with dcy.leadership("mailer") as leader:   # returns once this process leads
        while not leader.lost.is_set():
            await send_one_batch()
    # leaving the block steps down: the lock is released, the session destroyed

How it works, after Consul's leader-election guide
(https://developer.hashicorp.com/consul/docs/dynamic-app-config/sessions/application-leader-election):

* a **session** on the local node, tied to the node's ``serfHealth`` check and to the
  service checks given as ``checks`` (say ``registration.liveness_check_ids``), with a TTL
  that a background task renews every ``ttl/2`` and behavior ``release``. Consul refuses
  such a session while one of those checks is critical: the contender waits until it passes;
* the **lock key** ``dcy/leader/<name>`` (see :data:`LEADER_PREFIX`), acquired with that
  session. Its value names the holder in JSON: ``{"node", "host", "pid", "service_id"}``.
* contenders wait on a **blocking query** of the lock key (the watch engine's shared loop,
  not a polling loop) and try to acquire it only when it is free. A free key that still
  refuses them is in its lock-delay: they retry after about 0.25s, 0.5s, then every second
  (``BID_BACKOFF``, jittered) until it expires (Consul does not say when), or sooner when
  the key changes.

The holder is told that it lost leadership (``leader.lost`` is set, ``wait_lost()`` returns,
``on_lost`` is called) when Consul says so, or when it can no longer be sure:

* the lock key shows another session, no session, or no key;
* a renewal answers that the session is gone (``SessionInvalid``), or is refused for good
  (an ACL refusal: never retried);
* no renewal succeeded for ``ttl`` minus a margin (a tenth of the TTL, at most 1 s), counted
  from when the last successful one was sent. Consul keeps a session for 2 x ttl after its
  last renewal, so until then the session cannot have expired.

Losing contact is not a loss by itself: a Consul server election (seconds of "No cluster
leader"), an agent restart or a stalled agent only mark the lock watch stale, and renewals
are retried (``dcy.Backoff``) until one succeeds or the validity runs out. What the validity
does not cover is a holder whose whole host is cut off from the servers: they may invalidate
its session (its node's ``serfHealth`` fails) while it still counts on its TTL, and only the
lock-delay keeps a new leader out meanwhile. Keep ``lock_delay`` at least ``ttl`` where hosts
can be partitioned (the defaults, 15 s and 10 s, do). After a loss dcy releases the lock and
destroys the session when it can; it never re-acquires inside the same ``async with``.

Timing (Consul semantics, measured against Consul 1.14):

* ``ttl`` (10s, Consul's minimum): renewed every ttl/3, so that an outage of up to 2/3 of
  the TTL costs nothing. Consul invalidates a session 2 x ttl after its last renewal
  (``SessionTTLMultiplier``). A holder killed with SIGKILL never destroys its session, so the
  next leader takes over after about 2 x ttl + lock_delay.
* ``checks``: a session bound to the holder's own service check ends as soon as Consul sees
  that check critical, so a killed holder is replaced after the check's interval (or its TTL)
  + lock_delay instead. The holder also loses leadership whenever its check fails: bind only
  checks that fail when this process should not lead, such as a liveness ``TcpCheck``
  (``dcy.register(..., liveness=TcpCheck())``), not a readiness check that fails under load.
* ``lock_delay`` (default 15s, Consul's own default): after a session is invalidated, nobody
  can acquire its locks for this long. It is the time an old leader cut off from the servers
  has to notice (at most its validity, ttl minus the margin) before a new one starts. A
  smaller value (1s) gives faster takeover after a crash and is fine where a holder cannot be
  partitioned from its agent's servers (one host, dev, tests); Consul caps it at 60s.
* a graceful exit releases the lock before destroying the session, so no lock-delay applies
  and a waiting contender takes over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dcy._backoff import Backoff, is_transient
from dcy._consul import AgentInfo, ConsulAPI, Index, QueryResult
from dcy._defaults import DEFAULT_LOCK_DELAY, DEFAULT_TTL
from dcy._errors import CheckCritical, DcyError, SessionInvalid
from dcy._kv_specs import KeyValue
from dcy._reads import read_lock
from dcy._watch import Snapshot, Subscription, WatchEngine

log = logging.getLogger("dcy.leader")

LEADER_PREFIX = "dcy/leader/"
MIN_TTL, MAX_TTL = 10.0, 86400.0  # Consul refuses other session TTLs
MAX_LOCK_DELAY = 60.0
# Bids refused (another contender, a lock-delay, our check still critical, an outage): Consul
# does not say when to try again, so try soon, then every second or so until something
# changes (a lock-delay of 1 s is over by the third try; with jitter, contenders spread).
BID_BACKOFF = Backoff(base=0.25, cap=1.0)
# Renewals that failed for a transient reason: retried at least every second, so that the
# first renewal after an outage comes within a second of its end.
RENEW_BACKOFF = Backoff(base=0.1, cap=1.0)
# Stepping down (release the lock, destroy the session) when the agent never answers: give up
# after this long; the session then expires on its own (2 x TTL after its last renewal).
STEP_DOWN_TIMEOUT = 5.0
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._-]+)*")

OnLost = Callable[["Leadership"], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class LockState:
    """The lock key as one answer showed it, with that answer's index."""

    entry: KeyValue | None
    index: int


@dataclass(frozen=True, slots=True)
class LockKeySpec:
    """The lock key, published on every change of its index.

    A plain KeySpec publishes only when the entry differs, so "missing, then acquired by us,
    then deleted" read in one answer would look like no change at all; with the index in
    the value, the holder sees that answer and can tell it came after its acquisition."""

    key: str

    async def fetch(self, api: ConsulAPI, index: Index, wait: float) -> QueryResult:
        result = await api.kv_get(self.key, index=index, wait=wait)
        return QueryResult(result.index, (result.index, result.body))

    def decode(self, body: Any) -> LockState:
        index, entries = body
        entry = KeyValue.from_entry(entries[0]) if entries else None
        return LockState(entry, index if isinstance(index, int) else 0)

    def __str__(self) -> str:
        return f"lock {self.key}"


class Leadership:
    """One process's bid for a named leadership; an async context manager.

    ``async with`` returns once this process holds the lock (cancel it, or wrap it in
    ``asyncio.timeout``, to stop waiting). Leaving the block steps down."""

    def __init__(
        self,
        api: ConsulAPI,
        engine: WatchEngine,
        agent: AgentInfo,
        name: str,
        *,
        ttl: float = DEFAULT_TTL,
        lock_delay: float = DEFAULT_LOCK_DELAY,
        service_id: str | None = None,
        checks: Sequence[str] = (),
        on_lost: OnLost | None = None,
        renew_interval: float | None = None,
        validity: float | None = None,
    ) -> None:
        """``renew_interval`` (default ttl/3) and ``validity`` (default ttl minus a margin,
        see the module's docstring) are for tests; other values defeat their purpose."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(
                f"invalid leadership name {name!r}: use letters, digits, '.', '_', '-', "
                "and '/' between parts"
            )
        if not MIN_TTL <= ttl <= MAX_TTL:
            raise ValueError(f"ttl={ttl!r}: Consul takes session TTLs from 10s to 24h")
        if not 0 <= lock_delay <= MAX_LOCK_DELAY:
            raise ValueError(f"lock_delay={lock_delay!r}: use 0 to 60 seconds")
        self.name = name
        self.key = LEADER_PREFIX + name
        self.ttl = ttl
        self.lock_delay = lock_delay
        self.renew_interval = ttl / 3 if renew_interval is None else renew_interval
        # How long after sending a successful renewal this process may still count on its
        # session (see the module's docstring).
        self.validity = ttl - min(1.0, ttl / 10) if validity is None else validity
        self._valid_until = 0.0
        self._renew_error: DcyError | None = None
        # Why the lock's watch ended for good (an ACL refusal): contending cannot go on.
        self._watch_error: DcyError | None = None
        self.service_id = service_id
        if isinstance(checks, str | bytes):
            raise TypeError("checks takes a sequence of check IDs, not one string")
        self.checks = tuple(checks)
        self.session_id: str | None = None
        self.lost = asyncio.Event()
        self.lost_reason: str | None = None
        self._api = api
        self._engine = engine
        self._agent = agent
        self._on_lost = on_lost
        self._leader = False
        self._held_index = 0
        self._latest: Snapshot[LockState] | None = None
        self._changed = asyncio.Event()
        self._session_gone = False
        self._subscription: Subscription[LockState] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._entered = False

    # -- what the holder reads ---------------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        """True from acquisition until leadership is lost or given up."""
        return self._leader and not self.lost.is_set()

    async def wait_lost(self) -> str:
        """Return (the reason) once leadership is lost or given up."""
        await self.lost.wait()
        return self.lost_reason or "lost"

    @property
    def holder(self) -> Mapping[str, Any] | None:
        """Who holds the lock as last seen (node, host, pid, service_id), or None if nobody."""
        entry = self._latest.value.entry if self._latest is not None else None
        if entry is None or entry.session is None:
            return None
        try:
            identity = json.loads(entry.raw)
        except ValueError:
            return None
        return identity if isinstance(identity, dict) else None

    # -- lifecycle ---------------------------------------------------------------------------
    async def __aenter__(self) -> Leadership:
        if self._entered:
            raise RuntimeError("a Leadership is entered once; ask dcy.leadership() again")
        self._entered = True
        try:
            await self._open_session_once_healthy()
            self._subscription = self._engine.subscribe(
                LockKeySpec(self.key), self._on_snapshot, on_end=self._on_watch_end
            )
            self._renewer = self._spawn(self._renew_forever(), "renew")
            await self._contend()
        except BaseException:
            await self._step_down("gave up waiting")
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._step_down("stepped down")

    # -- contending --------------------------------------------------------------------------
    async def _open_session(self) -> None:
        sent = time.monotonic()
        self.session_id = await self._api.session_create(
            name=f"dcy leader {self.name} ({self._agent.node_name} pid {os.getpid()})",
            ttl=self.ttl,
            lock_delay=self.lock_delay,
            behavior="release",
            node_checks=("serfHealth",),
            service_checks=self.checks,
        )
        self._valid_until = sent + self.validity
        self._session_gone = False

    async def _open_session_once_healthy(self) -> None:
        """Consul refuses a session bound to a critical check: a process whose own check is
        not passing yet (just registered, say) waits for it instead of failing, as it waits
        out an outage. Other refusals (an unknown check, an ACL) are raised at once."""
        retry = BID_BACKOFF.start()
        while True:
            try:
                await self._open_session()
                return
            except DcyError as exc:
                if not self._may_wait(exc):
                    raise
                log.info("%s waits to open its session: %s", self.key, exc)
            await retry.wait()

    def _may_wait(self, exc: DcyError) -> bool:
        """Whether a refused bid heals by waiting: an outage, or one of our checks critical."""
        return is_transient(exc) or (isinstance(exc, CheckCritical) and exc.check_id in self.checks)

    async def _contend(self) -> None:
        retry = BID_BACKOFF.start()
        while True:
            if self._watch_error is not None:
                raise self._watch_error  # the lock cannot be watched: waiting is hopeless
            self._changed.clear()
            snapshot = self._latest
            timeout: float | None = None
            if self._session_gone and not await self._reopen_session():
                timeout = retry.next_delay()
            elif snapshot is not None and not snapshot.stale and self._free(snapshot.value.entry):
                if await self._try_acquire():
                    return
                # Free but refused: another contender was faster (the watch will show it),
                # the lock-delay of an invalidated holder runs, or our session just ended.
                timeout = retry.next_delay()
            else:
                retry.reset()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._changed.wait()

    async def _reopen_session(self) -> bool:
        """A new session after ours ended while waiting (an agent restart, say)."""
        try:
            await self._open_session()
        except DcyError as exc:
            if not self._may_wait(exc):
                raise
            log.warning("cannot open a new session for %s yet: %s", self.key, exc)
            return False
        return True

    def _free(self, entry: KeyValue | None) -> bool:
        return entry is None or entry.session is None or entry.session == self.session_id

    async def _try_acquire(self) -> bool:
        assert self.session_id is not None
        try:
            acquired = await self._api.kv_put(self.key, self._identity(), acquire=self.session_id)
            if not acquired:
                return False
            # Learn the index of our acquisition: snapshots older than it say nothing about
            # this leadership and must not end it.
            entry = await read_lock(self._api, self.key)
        except SessionInvalid as exc:
            self._session_gone = True
            log.info("cannot acquire %s: %s", self.key, exc)
            return False
        except DcyError as exc:
            if not is_transient(exc):
                raise  # waiting cannot fix a missing permission
            log.debug("cannot acquire %s yet: %s", self.key, exc)
            await self._release_quietly()
            return False
        if entry is None or entry.session != self.session_id:
            return False
        self._held_index = entry.modify_index
        self._leader = True
        log.info("this process leads %s (session %s)", self.name, self.session_id)
        self._spawn(self._expire_when_invalid(), "validity")
        latest = self._latest
        if latest is None or latest.value.index < entry.modify_index:
            # Our read is newer than what the watch showed so far: `holder` names us now,
            # not once the watch catches up.
            self._latest = Snapshot(
                LockState(entry, entry.modify_index), entry.modify_index, time.time()
            )
        else:
            self._on_snapshot(latest)
        return True

    def _identity(self) -> bytes:
        identity: dict[str, Any] = {
            "node": self._agent.node_name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        if self.service_id:
            identity["service_id"] = self.service_id
        return json.dumps(identity, sort_keys=True).encode()

    # -- holding -----------------------------------------------------------------------------
    def _on_snapshot(self, snapshot: Snapshot[LockState]) -> None:
        self._latest = snapshot
        self._changed.set()
        if self.is_leader:
            reason = self._loss_in(snapshot)
            if reason is not None:
                self._lose(reason)

    def _on_watch_end(self, error: DcyError) -> None:
        self._watch_error = error
        if self.is_leader:
            self._lose(f"the watch of the lock {self.key} ended: {error}")
        self._changed.set()

    def _loss_in(self, snapshot: Snapshot[LockState]) -> str | None:
        if snapshot.stale:
            return None  # no news; the validity deadline covers a long silence
        if snapshot.value.index < self._held_index:
            return None  # from before our acquisition
        entry = snapshot.value.entry
        if entry is None:
            return f"the lock key {self.key} was deleted"
        if entry.session is None:
            return f"the lock {self.key} was released (session invalidated?)"
        if entry.session != self.session_id:
            return f"the lock {self.key} is held by session {entry.session}"
        return None

    async def _renew_forever(self) -> None:
        retry = RENEW_BACKOFF.start()
        delay = self.renew_interval
        while True:
            await asyncio.sleep(delay)
            delay = self.renew_interval
            session_id = self.session_id
            assert session_id is not None
            sent = time.monotonic()
            try:
                await self._api.session_renew(session_id)
            except SessionInvalid:
                if self.is_leader:
                    self._lose(f"session {session_id} was invalidated")
                    return
                self._session_gone = True
                self._changed.set()
                continue
            except DcyError as exc:
                self._renew_error = exc
                if not is_transient(exc):
                    if self.is_leader:
                        self._lose(f"Consul refused to renew session {session_id}: {exc}")
                        return
                    log.warning("cannot renew session %s: %s", session_id, exc)
                    continue
                log.info("could not renew session %s (retrying): %s", session_id, exc)
                delay = retry.next_delay() or self.renew_interval
                continue
            self._valid_until = max(self._valid_until, sent + self.validity)
            self._renew_error = None
            retry.reset()

    async def _expire_when_invalid(self) -> None:
        """Lose the leadership once no renewal succeeded within the session's validity."""
        while self.is_leader:
            remaining = self._valid_until - time.monotonic()
            if remaining <= 0:
                self._lose(
                    f"no renewal of session {self.session_id} succeeded within "
                    f"{self.validity:g}s: {self._renew_error or 'no answer'}"
                )
                return
            await asyncio.sleep(remaining)

    def _lose(self, reason: str) -> None:
        if self.lost.is_set():
            return
        self._leader = False
        self.lost_reason = reason
        self.lost.set()
        log.warning("lost leadership of %s: %s", self.name, reason)
        if self._on_lost is not None:
            self._spawn(self._call_on_lost(self._on_lost), "on-lost")
        # Stop claiming at once: free the lock for the next leader if it is still ours.
        self._spawn(self._release_quietly(destroy=True), "release")

    async def _call_on_lost(self, callback: OnLost) -> None:
        try:
            result = callback(self)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("on_lost callback of leadership %s failed", self.name)

    # -- stepping down -----------------------------------------------------------------------
    async def _release_quietly(self, *, destroy: bool = False) -> None:
        session_id = self.session_id
        if session_id is None:
            return
        if self._renewer is not None and destroy:
            self._renewer.cancel()
        try:
            # Release before destroying: a released lock has no lock-delay.
            await self._api.kv_put(self.key, b"", release=session_id)
            if destroy:
                await self._api.session_destroy(session_id)
                self.session_id = None
        except DcyError as exc:
            log.info("could not give up %s cleanly (Consul expires it): %s", self.key, exc)

    async def _step_down(self, reason: str) -> None:
        was_leader = self.is_leader
        self._leader = False
        if not self.lost.is_set():
            self.lost_reason = reason
            self.lost.set()
        if self._renewer is not None:
            self._renewer.cancel()
        for task in self._tasks:
            if task.get_name().endswith(":validity"):
                task.cancel()
        # A release begun at the loss finishes first; on_lost callbacks run on, unawaited.
        releasing = [t for t in self._tasks if t.get_name().endswith(":release")]
        await asyncio.gather(self._renewer or asyncio.sleep(0), return_exceptions=True)
        try:
            # Each request has its own timeout; together they must not hold a process that
            # is stopping for longer than this when the agent never answers.
            async with asyncio.timeout(STEP_DOWN_TIMEOUT):
                await asyncio.gather(*releasing, return_exceptions=True)
                if self._subscription is not None:
                    await self._subscription.aclose()
                    self._subscription = None
                await self._release_quietly(destroy=True)
        except TimeoutError:
            log.warning(
                "could not give up %s within %gs (Consul expires the session)",
                self.key,
                STEP_DOWN_TIMEOUT,
            )
        finally:
            for task in releasing:
                task.cancel()
            if self._subscription is not None:
                await self._subscription.aclose()
                self._subscription = None
        if was_leader:
            log.info("stepped down as leader of %s", self.name)

    def _spawn(self, coroutine: Coroutine[Any, Any, None], role: str) -> asyncio.Task[None]:
        name = f"dcy-leader:{self.name}:{role}"
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)  # a reference, so the task is not collected while it runs
        task.add_done_callback(self._tasks.discard)
        return task
