"""The one retry policy (dcy.Backoff) and what it retries."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from dcy import AclDenied, Backoff, ConsulUnavailable, DcyError, TlsError, is_transient, retrying


def test_delays_double_from_base_with_jitter_up_to_the_cap() -> None:
    """Delay n is drawn from [ceiling/2, ceiling], the ceiling doubling from base to cap."""
    policy = Backoff(base=0.1, cap=2.0)
    for failures in range(1, 40):
        ceiling = min(2.0, 0.1 * 2 ** (failures - 1))
        draws = [policy.delay(failures) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in draws)
        assert len(set(draws)) > 1  # jittered
    assert policy.delay(10**9) <= 2.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base": 0}, "base must be positive"),
        ({"base": -1}, "base must be positive"),
        ({"base": 1.0, "cap": 0.5}, "at least its base"),
        ({"deadline": 0}, "deadline must be positive"),
    ],
)
def test_bad_policies_are_refused(kwargs: dict[str, float], message: str) -> None:
    """A policy that could spin or never wait fails at construction, quoting the value."""
    with pytest.raises(ValueError, match=message):
        Backoff(**kwargs)


def test_a_deadline_bounds_the_sequence_and_no_delay_passes_it() -> None:
    """With a deadline, delays are cut to what is left and the sequence then ends (None)."""
    now = [100.0]
    retry = Backoff(base=1.0, cap=10.0, deadline=2.5).start(clock=lambda: now[0])
    assert retry.next_delay() is not None  # the first failure starts the clock
    now[0] += 2.0
    delay = retry.next_delay()
    assert delay is not None and delay <= 0.5 + 1e-9
    now[0] += 0.5
    assert retry.next_delay() is None
    retry.reset()
    assert retry.failures == 0 and retry.next_delay() is not None


def test_only_transient_errors_are_transient() -> None:
    """An outage may heal; a refused ACL, a TLS problem or a foreign error will not."""
    assert is_transient(ConsulUnavailable("away"))
    assert not is_transient(AclDenied("no", status=403))
    assert not is_transient(TlsError("bad certificate"))
    assert not is_transient(DcyError("other"))
    assert not is_transient(OSError("not ours"))


async def test_retrying_waits_out_transient_errors() -> None:
    """Transient failures are retried (each reported) until the attempt succeeds."""
    calls: list[float] = []
    reported: list[int] = []

    async def attempt() -> str:
        calls.append(time.monotonic())
        if len(calls) < 4:
            raise ConsulUnavailable("not yet")
        return "done"

    result = await retrying(
        attempt,
        Backoff(base=0.01, cap=0.02),
        on_retry=lambda exc, retry, delay: reported.append(retry.failures),
    )
    assert result == "done" and len(calls) == 4 and reported == [1, 2, 3]
    assert all(b - a >= 0.004 for a, b in itertools.pairwise(calls))


async def test_retrying_never_retries_what_will_not_heal() -> None:
    """An ACL refusal is raised at its first occurrence."""
    calls = 0

    async def attempt() -> None:
        nonlocal calls
        calls += 1
        raise AclDenied("Permission denied", status=403)

    with pytest.raises(AclDenied):
        await retrying(attempt, Backoff(base=0.01, cap=0.02))
    assert calls == 1


async def test_retrying_gives_up_at_the_deadline_with_the_last_error() -> None:
    """Past its deadline the sequence raises the last transient error."""

    async def attempt() -> None:
        raise ConsulUnavailable("still away")

    started = time.monotonic()
    with pytest.raises(ConsulUnavailable, match="still away"):
        await asyncio.wait_for(retrying(attempt, Backoff(0.01, 0.05, deadline=0.3)), 5)
    assert 0.25 <= time.monotonic() - started < 2
