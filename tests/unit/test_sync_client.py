"""SyncDcy's threads and blocking methods, on the fake Consul (driven on the engine thread,
where the fake's watchers live)."""

from __future__ import annotations

import asyncio
import gc
import importlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import dcy
from dcy import Backoff, Snapshot, SyncDcy, WatchOptions
from dcy.testing import FakeConsul
from tests.harness import until

FAST = WatchOptions(wait=1.0, backoff=Backoff(0.05, 0.2), first_answer_timeout=2.0)


def dcy_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("dcy-"))


def on_engine(client: SyncDcy, change: Callable[[], Any]) -> None:
    """Change the fake on the engine thread, as the agent would change under the watches."""

    async def apply() -> None:
        change()

    client.run(apply())


@pytest.fixture
def fake_client() -> Iterator[tuple[FakeConsul, SyncDcy]]:
    fake = FakeConsul()
    with SyncDcy(api=fake, watch_options=FAST) as client:
        yield fake, client


def test_open_starts_one_engine_thread_and_close_stops_every_thread() -> None:
    """No thread before open; the engine thread while open; none left after close."""
    before = dcy_threads()
    client = SyncDcy(api=FakeConsul(), watch_options=FAST)
    assert dcy_threads() == before
    assert client.open() is client
    assert dcy_threads().count("dcy-engine") == before.count("dcy-engine") + 1
    client.close()
    assert dcy_threads() == before
    client.close()  # idempotent


def test_a_client_dropped_unclosed_stops_its_threads() -> None:
    """Garbage collection of an open client stops its engine (the finalizer that also runs
    at interpreter exit)."""
    before = dcy_threads()
    client = SyncDcy(api=FakeConsul(), watch_options=FAST)
    client.open()
    del client
    gc.collect()
    until(lambda: dcy_threads() == before, timeout=10, what="the engine thread gone")


def test_interpreter_exit_closes_an_open_client() -> None:
    """A script that never closes its client exits at once, with no dcy thread left when its
    last exit hook runs, and its registration deregistered."""
    script = """
import atexit, threading
from dcy import SyncDcy, TtlCheck
from dcy.testing import FakeConsul
fake = FakeConsul()

def report():
    names = [t.name for t in threading.enumerate() if t.name.startswith("dcy-")]
    print("threads", names, "deregistered", fake.calls["deregister_service"])

atexit.register(report)  # registered first: runs after the client's own hook
client = SyncDcy(api=fake)
client.open()
client.register("worker", 7100, check=TtlCheck(ttl=30))
print("registered", fake.calls["register_service"])
"""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["registered 1", "threads [] deregistered 1"]
    assert time.monotonic() - started < 30


def test_blocking_methods_answer_from_the_shared_cache(
    fake_client: tuple[FakeConsul, SyncDcy],
) -> None:
    """pick, instances and lookup from many threads share one watch per name."""
    fake, client = fake_client
    on_engine(client, lambda: fake.add_service("worker", port=7101, address="10.0.0.1"))
    on_engine(client, lambda: fake.add_service("worker", port=7102, address="10.0.0.2"))
    with ThreadPoolExecutor(16) as pool:
        picks = list(pool.map(lambda _: client.pick("worker").port, range(64)))
    assert sorted(set(picks)) == [7101, 7102]
    assert len(client.instances("worker")) == 2
    assert client.lookup("worker").stale is False
    specs = [str(w.spec) for w in client.aio.engine.watches if "worker" in str(w.spec)]
    assert len(specs) == 1


def test_subscribe_calls_back_on_the_callback_thread(
    fake_client: tuple[FakeConsul, SyncDcy],
) -> None:
    """Callbacks run on the client's callback thread, may call the blocking API, and stop
    once the handle is closed."""
    fake, client = fake_client
    seen: list[tuple[str, int, int]] = []

    def callback(snapshot: Snapshot[Any]) -> None:
        # A blocking call from a callback works: the engine thread is not the caller.
        instances = len(client.instances("api"))
        seen.append((threading.current_thread().name, len(snapshot.value), instances))

    on_engine(client, lambda: fake.add_service("api", port=7101))
    with client.subscribe("api", callback):
        until(lambda: len(seen) >= 1, what="the first snapshot")
        on_engine(client, lambda: fake.add_service("api", port=7102))
        until(lambda: any(count == 2 for _, count, _ in seen), what="the second instance")
    assert all(name.startswith("dcy-callback") for name, _, _ in seen)
    delivered = len(seen)
    on_engine(client, lambda: fake.add_service("api", port=7103))
    time.sleep(0.3)  # a closed subscription must stay silent: nothing to wait for
    assert len(seen) == delivered
    client.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("dcy-callback")]


def test_a_blocking_call_on_the_engine_thread_is_refused(
    fake_client: tuple[FakeConsul, SyncDcy],
) -> None:
    """Code running on the engine thread (an async callback) that calls a blocking method
    gets an error instead of a deadlock."""
    _, client = fake_client

    async def blocking_inside() -> None:
        client.pick("anything")

    with pytest.raises(RuntimeError, match="engine thread"):
        client.run(blocking_inside())


def test_kv_and_registration_in_blocking_form(fake_client: tuple[FakeConsul, SyncDcy]) -> None:
    _, client = fake_client
    assert client.kv.put("config/a", "1")
    assert client.kv.get("config/a") == "1"
    assert list(client.kv.list("config/")) == ["config/a"]
    assert client.kv.delete("config/a") and client.kv.get("config/a") is None
    registration = client.register("svc", 9100, check=dcy.TtlCheck(ttl=30))
    assert [i.port for i in client.instances("svc")] == [9100]
    client.deregister(registration)
    until(lambda: client.instances("svc") == (), what="the instance gone")


def test_a_closed_or_unopened_client_says_so() -> None:
    client = SyncDcy(api=FakeConsul())
    with pytest.raises(RuntimeError, match="not open"):
        client.pick("x")
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.open()


def test_bad_arguments_fail_in_the_constructor() -> None:
    with pytest.raises(ValueError, match="wait_for_agent"):
        SyncDcy(wait_for_agent=-1)


@pytest.mark.parametrize(
    ("module", "dependency", "extra"),
    [("dcy._requests", "requests", "dcy[requests]"), ("dcy._httpx", "httpx", "dcy[httpx]")],
)
def test_a_missing_extra_is_named(
    monkeypatch: pytest.MonkeyPatch, module: str, dependency: str, extra: str
) -> None:
    """Without the optional dependency, the ImportError says which extra to install."""
    monkeypatch.setitem(sys.modules, dependency, None)  # as if not installed
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=extra.replace("[", r"\[").replace("]", r"\]")):
        importlib.import_module(module)


def test_leadership_in_blocking_form(fake_client: tuple[FakeConsul, SyncDcy]) -> None:
    """Entering waits until this process leads; leaving steps down (the lock is free)."""
    _, client = fake_client
    with client.leadership("app", ttl=10, lock_delay=0) as leader:
        assert leader.is_leader
        with pytest.raises(TimeoutError):
            leader.wait_lost(timeout=0.1)
    assert not leader.is_leader
    with client.leadership("app", ttl=10, lock_delay=0) as again:
        assert again.is_leader


def test_a_client_collected_on_its_engine_thread_is_still_closed() -> None:
    """The finalizer runs wherever the last reference goes, the engine thread too: the
    client is still closed (its registration deregistered) and every thread stops."""
    before = dcy_threads()
    fake = FakeConsul()
    client = SyncDcy(api=fake, watch_options=FAST).open()
    client.register("svc", 9100, check=dcy.TtlCheck(ttl=30))

    async def running_loop() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    loop = client.run(running_loop())
    holder = [client]
    del client

    async def drop() -> None:
        holder.clear()  # the last reference, dropped on the engine thread

    asyncio.run_coroutine_threadsafe(drop(), loop)
    until(lambda: dcy_threads() == before, timeout=15, what="every dcy thread gone")
    assert fake.calls["deregister_service"] == 1
