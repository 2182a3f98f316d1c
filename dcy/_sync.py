"""``SyncDcy``: dcy for code that is not an asyncio program (Flask, Django, Celery, scripts).

    with dcy.SyncDcy() as client:               # or client = dcy.SyncDcy().open()
        client.register("worker", 9002)          # stays registered until close
        worker = client.pick("worker")           # from the shared, long-lived watch

It is the asyncio client :class:`dcy.Dcy`, run on one background thread that the client
owns (``dcy-engine``): the same watches, cache, registrations and leaderships, with blocking
methods that any number of threads may call at once. A call is handed to the engine's event
loop and waits for its answer there, so every thread shares one watch per name.

Threads. ``open`` (or ``with``) starts the engine thread; ``close`` (or leaving ``with``)
stops it after the async client's own goodbyes (step down, deregister), and so does the
interpreter's exit or the client being garbage-collected, whichever comes first. Callbacks
(``subscribe``, ``watch_health``, ``on_lost``) run one at a time on a second thread of the
client (``dcy-callback``), never on the engine thread: a slow callback delays the next
callback, not the engine, and a callback may call the client's blocking methods.

Fork. A child process forked while a client is open (gunicorn, Celery prefork) gets an engine
thread of its own on its first call: it never reads or writes the parent's sockets. What the
parent registered, leads or subscribed to stays the parent's; the child makes its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import selectors
import threading
import weakref
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, Unpack

from dcy._dcy import CLOSE_BUDGET, Dcy
from dcy._defaults import DEFAULT_LOCK_DELAY, DEFAULT_TTL
from dcy._query import Instance
from dcy._resolve import Datacenters, Lookup, Resolver, Strategy
from dcy._watch import Snapshot, Subscription

if TYPE_CHECKING:
    from dcy._health_events import HealthWatch, Transition
    from dcy._kv import Value
    from dcy._kv_specs import KeyValue
    from dcy._leader import Leadership
    from dcy._register import Registration, ServiceOptions

log = logging.getLogger("dcy")

T = TypeVar("T")
A = TypeVar("A")

# Closing waits this long for the async client's goodbyes, beyond their own budget.
_CLOSE_MARGIN = 5.0


class _Engine:
    """One event loop on one thread, with an async Dcy open on it, for one process."""

    def __init__(self, dcy: Dcy) -> None:
        self.pid = os.getpid()
        self.dcy = dcy
        # Our own selector, so that a forked child can make its copy harmless (see forked).
        self.selector = selectors.DefaultSelector()
        self.loop = asyncio.SelectorEventLoop(self.selector)
        self.callbacks = ThreadPoolExecutor(1, thread_name_prefix="dcy-callback")
        self.thread = threading.Thread(target=self._run, name="dcy-engine", daemon=True)
        self.thread.start()
        try:
            self.run(dcy.open())
        except BaseException:
            self._halt()
            raise

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the engine's loop and wait for its result in this thread."""
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError(
                "a blocking SyncDcy method was called on its engine thread; it would wait for "
                "itself. Use the async client (SyncDcy.aio) in code that runs there."
            )
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()  # an interrupted caller (Ctrl-C, a timeout) stops the work too
            raise

    def on_callback_thread(self, callback: Callable[[A], object]) -> Callable[[A], Any]:
        """An async callback for the engine that runs ``callback`` on the callback thread."""
        loop, callbacks = self.loop, self.callbacks

        async def deliver(value: A) -> None:
            await loop.run_in_executor(callbacks, callback, value)

        return deliver

    def stop(self) -> None:
        """Close the async client, then stop the loop and both threads. Idempotent; does
        nothing in a forked child, whose copy of this engine is the parent's."""
        if os.getpid() != self.pid or not self.thread.is_alive():
            return
        if threading.current_thread() is self.thread:
            # Collected on the engine thread itself: close from a thread that can wait.
            threading.Thread(target=self.stop, name="dcy-close", daemon=True).start()
            return
        try:
            self.run(self.dcy.aclose(), timeout=CLOSE_BUDGET + _CLOSE_MARGIN)
        except Exception as exc:  # closing must go on: threads must not be left behind
            log.warning("dcy: closing the client failed: %r", exc)
        finally:
            self._halt()

    def _halt(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join(CLOSE_BUDGET + _CLOSE_MARGIN)
        # From a callback, waiting for the callback thread would wait for itself.
        on_callback = threading.current_thread().name.startswith("dcy-callback")
        self.callbacks.shutdown(wait=not on_callback, cancel_futures=True)

    def forked(self) -> None:
        """In a child just forked: this engine's thread does not exist here, and its objects
        refer to the parent's sockets. Its event-loop selector is the parent's epoll instance
        too, so an unregister from here (an object closed by garbage collection) would remove
        the parent's sockets from it: point that descriptor at nothing of the parent's."""
        fileno = getattr(self.selector, "fileno", None)
        if fileno is None:
            return
        devnull = os.open(os.devnull, os.O_RDONLY)
        try:
            os.dup2(devnull, fileno())
        finally:
            os.close(devnull)


# Engines of a parent, as copied into a forked child: kept referenced there for the child's
# life, so that garbage collection never closes what the parent still uses.
_ABANDONED: list[_Engine] = []
_CLIENTS: weakref.WeakSet[SyncDcy] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for client in list(_CLIENTS):
        client._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class SyncDcy:
    """A blocking client of the local Consul agent; see the module docstring.

    Takes :class:`dcy.Dcy`'s arguments. Use as ``with SyncDcy(...) as client``, or call
    :meth:`open` and :meth:`close`."""

    def __init__(self, address: str | None = None, **options: Any) -> None:
        # Built at once so that bad arguments fail here, in the caller's thread.
        self._first: Dcy | None = Dcy(address, **options)
        self._make: Callable[[], Dcy] = partial(Dcy, address, **options)
        self._lock = threading.Lock()
        self._engine: _Engine | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._opened = False
        self._closed = False
        _CLIENTS.add(self)

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> SyncDcy:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> SyncDcy:
        """Start the engine thread and ask the agent who it is (waiting for it as
        ``Dcy.open`` does); returns the client (``client = SyncDcy().open()``). Raises
        ConsulUnavailable, AclDenied, TlsError like ``Dcy.open``."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this SyncDcy is closed; make a new one")
            if self._engine is None or self._engine.pid != os.getpid():
                self._start()
            self._opened = True
        return self

    def close(self) -> None:
        """Step down, deregister, stop every watch and both threads (see ``Dcy.aclose``).
        Idempotent. In a forked child it closes the child's own engine only."""
        with self._lock:
            self._closed = True
            engine, self._engine = self._engine, None
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
        if engine is not None:
            engine.stop()

    def _start(self) -> _Engine:
        dcy = self._first or self._make()
        self._first = None
        engine = _Engine(dcy)
        self._engine = engine
        # At interpreter exit, or when the client is collected unclosed: no thread left.
        self._finalizer = weakref.finalize(self, engine.stop)
        return engine

    def _forked(self) -> None:
        """In a forked child: the parent's engine is not ours; the next call starts one."""
        self._lock = threading.Lock()  # it may have been held by a thread that is gone
        engine, self._engine = self._engine, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if engine is not None:
            engine.forked()
            _ABANDONED.append(engine)

    def _live(self) -> _Engine:
        engine = self._engine
        if engine is not None and engine.pid == os.getpid():
            return engine
        with self._lock:
            if self._closed or not self._opened:
                raise RuntimeError("SyncDcy is not open: use `with SyncDcy() as client`")
            engine = self._engine
            if engine is None or engine.pid != os.getpid():
                engine = self._start()
            return engine

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine of the async client (:attr:`aio`) on the engine thread and wait
        for its result: the way to anything this class does not mirror."""
        return self._live().run(coro, timeout)

    @property
    def aio(self) -> Dcy:
        """The async client on the engine thread. Its coroutines run only there (through
        :meth:`run`), and so do objects it returns, such as a ``Registration``."""
        return self._live().dcy

    @property
    def resolver(self) -> Resolver:
        return self._live().dcy.resolver

    def _deliver(self, callback: Callable[[A], object]) -> Callable[[A], Any]:
        return self._live().on_callback_thread(callback)

    # -- resolution --------------------------------------------------------------------------
    def lookup(
        self, name: str, *, timeout: float | None = None, datacenters: Datacenters | None = None
    ) -> Lookup:
        """Instances matching ``name`` plus freshness; see ``Dcy.lookup``."""
        dcy = self.aio
        return self.run(dcy.lookup(name, timeout=timeout, datacenters=datacenters))

    def instances(
        self, name: str, *, timeout: float | None = None, datacenters: Datacenters | None = None
    ) -> tuple[Instance, ...]:
        """Instances matching ``name`` (default: passing); see ``Dcy.instances``."""
        dcy = self.aio
        return self.run(dcy.instances(name, timeout=timeout, datacenters=datacenters))

    def pick(
        self,
        name: str,
        strategy: Strategy = "round_robin",
        *,
        datacenters: Datacenters | None = None,
    ) -> Instance:
        """One instance of ``name`` from the cache; see ``Dcy.pick``."""
        dcy = self.aio
        return self.run(dcy.pick(name, strategy, datacenters=datacenters))

    def subscribe(
        self, name: str, callback: Callable[[Snapshot[Any]], object]
    ) -> SyncHandle[Subscription[Any]]:
        """Call ``callback`` with every snapshot of ``name``'s instances (all states) as they
        change, on the client's callback thread; close the handle to stop."""
        deliver = self._deliver(callback)
        dcy = self.aio

        async def subscribe() -> Subscription[Any]:
            return dcy.subscribe(name, deliver)

        return SyncHandle(self, self.run(subscribe()))

    def watch_health(
        self,
        service: str | None,
        callback: Callable[[Transition], object],
        *,
        debounce: float = 0.0,
        datacenter: str | None = None,
    ) -> SyncHandle[HealthWatch]:
        """Call ``callback`` with check-state transitions (see ``Dcy.watch_health``), on the
        client's callback thread; close the handle to stop."""
        deliver = self._deliver(callback)
        dcy = self.aio

        async def watch() -> HealthWatch:
            return dcy.watch_health(service, deliver, debounce=debounce, datacenter=datacenter)

        return SyncHandle(self, self.run(watch()))

    # -- registration, KV, leadership --------------------------------------------------------
    def register(
        self,
        name: str,
        port: int,
        *,
        on_lost: Callable[[Registration], object] | None = None,
        **options: Unpack[ServiceOptions],
    ) -> Registration:
        """Register an instance and keep it registered until :meth:`deregister` or close;
        ``options`` as ``Dcy.register``'s. ``on_lost`` runs on the callback thread."""
        dcy = self.aio
        lost = None if on_lost is None else self._deliver(on_lost)
        return self.run(dcy.register(name, port, on_lost=lost, **options))

    def deregister(self, registration: Registration) -> None:
        """Deregister an instance this client registered."""
        self.run(registration.deregister())

    @property
    def kv(self) -> SyncKeyValueStore:
        """Consul's key/value store, in blocking form."""
        return SyncKeyValueStore(self)

    def leadership(
        self,
        name: str,
        *,
        ttl: float = DEFAULT_TTL,
        lock_delay: float = DEFAULT_LOCK_DELAY,
        service_id: str | None = None,
        checks: Sequence[str] = (),
        on_lost: Callable[[Leadership], object] | None = None,
    ) -> SyncLeadership:
        """A bid for the leadership ``name``: ``with client.leadership("app") as leader``
        returns once this process leads; see ``Dcy.leadership``. ``on_lost`` runs on the
        callback thread."""
        dcy = self.aio
        deliver = None if on_lost is None else self._deliver(on_lost)

        async def bid() -> Leadership:
            return dcy.leadership(
                name,
                ttl=ttl,
                lock_delay=lock_delay,
                service_id=service_id,
                checks=checks,
                on_lost=deliver,
            )

        return SyncLeadership(self, self.run(bid()))


class _Closable(Protocol):
    async def aclose(self) -> None: ...


H = TypeVar("H", bound=_Closable)


class SyncHandle(Generic[H]):
    """A running subscription or health watch; ``close()`` (or ``with``) ends it."""

    def __init__(self, client: SyncDcy, handle: H) -> None:
        self._client = client
        self.handle = handle  # the async object, to be used on the engine thread only

    def close(self) -> None:
        self._client.run(self.handle.aclose())

    def __enter__(self) -> SyncHandle[H]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncLeadership:
    """A leadership bid in blocking form: entering waits until this process leads."""

    def __init__(self, client: SyncDcy, leadership: Leadership) -> None:
        self._client = client
        self.leadership = leadership

    def __enter__(self) -> SyncLeadership:
        self._client.run(self.leadership.__aenter__())
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.run(self.leadership.__aexit__(None, None, None))

    @property
    def is_leader(self) -> bool:
        return self.leadership.is_leader

    @property
    def holder(self) -> Mapping[str, Any] | None:
        return self.leadership.holder

    def wait_lost(self, timeout: float | None = None) -> str:
        """Return (the reason) once leadership is lost or given up; TimeoutError after
        ``timeout`` seconds."""
        return self._client.run(self.leadership.wait_lost(), timeout)


class SyncKeyValueStore:
    """``Dcy.kv`` in blocking form (watches: ``SyncDcy.run`` with the async store)."""

    def __init__(self, client: SyncDcy) -> None:
        self._client = client

    def entry(self, key: str, *, datacenter: str | None = None) -> KeyValue | None:
        kv = self._client.aio.kv
        return self._client.run(kv.entry(key, datacenter=datacenter))

    def get(
        self, key: str, default: str | None = None, *, datacenter: str | None = None
    ) -> str | None:
        kv = self._client.aio.kv
        return self._client.run(kv.get(key, default, datacenter=datacenter))

    def get_bytes(
        self, key: str, default: bytes | None = None, *, datacenter: str | None = None
    ) -> bytes | None:
        kv = self._client.aio.kv
        return self._client.run(kv.get_bytes(key, default, datacenter=datacenter))

    def list(
        self, prefix: str = "", *, datacenter: str | None = None
    ) -> MappingProxyType[str, KeyValue]:
        kv = self._client.aio.kv
        return self._client.run(kv.list(prefix, datacenter=datacenter))

    def put(
        self, key: str, value: Value, *, flags: int | None = None, cas: int | None = None
    ) -> bool:
        kv = self._client.aio.kv
        return self._client.run(kv.put(key, value, flags=flags, cas=cas))

    def cas(self, key: str, value: Value, index: int, *, flags: int | None = None) -> bool:
        kv = self._client.aio.kv
        return self._client.run(kv.cas(key, value, index, flags=flags))

    def delete(self, key: str, *, recurse: bool = False, cas: int | None = None) -> bool:
        kv = self._client.aio.kv
        return self._client.run(kv.delete(key, recurse=recurse, cas=cas))
