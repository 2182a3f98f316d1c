"""The one retry policy: how long to wait before trying again, and when to stop.

Every retry loop of dcy, and of the services built on it, waits with a :class:`Backoff`: the
watch engine's queries, leadership renewals and bids, the wait for an agent at start,
registrations, webhooks, NSQ reconnects and publishes. Only transient failures are retried
(:func:`is_transient`: an unreachable agent, a leader election, a 429 or 5xx); an ACL refusal
or a TLS problem is raised at once, wherever it happens, because waiting cannot fix it.

Delays grow exponentially from ``base`` up to ``cap``, each drawn uniformly from the upper
half of its ceiling: clients that failed together (one agent restart) spread their retries
out instead of arriving together, and no delay is shorter than half the intended one. An
optional ``deadline`` bounds the whole sequence, counted from its first failure.

    retry = Backoff(base=0.1, cap=2.0, deadline=30).start()
    while True:
        try:
            return await attempt()
        except DcyError as exc:
            if not is_transient(exc) or not await retry.wait():
                raise

or, the same loop in one call: ``await retrying(attempt, Backoff(...))``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from dcy._errors import DcyError

T = TypeVar("T")


def is_transient(exc: BaseException) -> bool:
    """Whether the failure may go away by itself: dcy's transient errors
    (``ConsulUnavailable``), never an ACL refusal, a TLS problem or a refused request."""
    return isinstance(exc, DcyError) and exc.transient


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential, capped, jittered delays; times in seconds. ``deadline`` None retries
    forever."""

    base: float = 0.1
    cap: float = 5.0
    deadline: float | None = None

    def __post_init__(self) -> None:
        if not self.base > 0:
            raise ValueError(f"backoff base must be positive, got {self.base!r}")
        if not self.cap >= self.base:
            raise ValueError(f"backoff cap {self.cap!r} must be at least its base {self.base!r}")
        if self.deadline is not None and not self.deadline > 0:
            raise ValueError(f"backoff deadline must be positive, got {self.deadline!r}")

    def delay(self, failures: int) -> float:
        """The delay after failure number ``failures`` (1-based), deadline aside."""
        ceiling = min(self.cap, self.base * 2 ** min(max(failures, 1) - 1, 30))
        return random.uniform(ceiling / 2, ceiling)

    def start(self, *, clock: Callable[[], float] = time.monotonic) -> Retry:
        """A fresh sequence of attempts under this policy."""
        return Retry(self, clock)


class Retry:
    """One sequence of attempts: counts failures, says how long to wait, knows the deadline.
    ``reset()`` after a success starts the next failure from ``base`` again."""

    __slots__ = ("_clock", "_started", "failures", "policy")

    def __init__(self, policy: Backoff, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.failures = 0
        self._clock = clock
        self._started: float | None = None

    def reset(self) -> None:
        self.failures = 0
        self._started = None

    @property
    def elapsed(self) -> float:
        """Seconds since the first failure of this sequence (0 before any)."""
        return 0.0 if self._started is None else self._clock() - self._started

    def next_delay(self) -> float | None:
        """Count one more failure; return the delay before the next attempt, or None when
        the deadline has passed. A delay never reaches past the deadline."""
        now = self._clock()
        if self._started is None:
            self._started = now
        self.failures += 1
        delay = self.policy.delay(self.failures)
        if self.policy.deadline is not None:
            remaining = self._started + self.policy.deadline - now
            if remaining <= 0:
                return None
            delay = min(delay, remaining)
        return delay

    async def wait(self) -> bool:
        """Count a failure and sleep its delay; False (at once) when the deadline passed."""
        delay = self.next_delay()
        if delay is None:
            return False
        await asyncio.sleep(delay)
        return True


async def retrying(
    attempt: Callable[[], Awaitable[T]],
    policy: Backoff,
    *,
    retry_if: Callable[[BaseException], bool] = is_transient,
    on_retry: Callable[[BaseException, Retry, float], None] | None = None,
) -> T:
    """Await ``attempt()`` until it succeeds. Failures for which ``retry_if`` is true are
    retried under ``policy`` (``on_retry(error, retry, delay)`` is told of each); any other
    failure, or one after the deadline, is raised."""
    retry = policy.start()
    while True:
        try:
            return await attempt()
        except Exception as exc:
            if not retry_if(exc):
                raise
            delay = retry.next_delay()
            if delay is None:
                raise
            if on_retry is not None:
                on_retry(exc, retry, delay)
            await asyncio.sleep(delay)
