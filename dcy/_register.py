"""Self-registration: a service announces itself, stays announced, and leaves cleanly.

A :class:`Registration` registers once, then keeps a watch (through the engine) on its own
entry in the local agent. When the agent forgets it — a restarted dev agent, an operator's
deregister — the watch sees it gone and registers again. A TTL check gets a heartbeat task.
Every check carries ``DeregisterCriticalServiceAfter``, so a crashed process that never said
goodbye disappears from the catalog on its own.

Besides its check (is it ready to serve?), an instance may have a ``liveness`` check (is the
process there at all?): a TCP connect succeeds while the process lives, however busy it is,
and fails at once when it is gone. That is what a leadership binds its session to; a
readiness check fails under load or while a dependency is down, and would cost the leader
its lock.

A registration is *lost* when Consul refuses, for good, what keeping it needs: a heartbeat, a
re-registration or the watch of its own entry is answered with an error no retry can cure
(the token was deleted or lost ``service:write``, TLS with the agent fails). It then stops
trying and says so, the way a :class:`~dcy.Leadership` reports a loss: ``lost`` is set,
``error`` holds the refusal, ``wait_lost()`` returns it and ``on_lost`` is called. Transient
errors (an agent restarting, an election) never lose it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

from dcy._consul import AgentInfo, ConsulAPI, Index, QueryResult
from dcy._defaults import MIN_DEREGISTER_AFTER
from dcy._errors import DcyError, UnknownCheck
from dcy._query import validate_service_name
from dcy._watch import Snapshot, Subscription, WatchEngine

log = logging.getLogger("dcy.register")

# Consul answers a hash-blocking query for an unknown agent service at once with a 404, so an
# absent service cannot be waited on: poll it at this pace until it exists again.
ABSENT_POLL_INTERVAL = 1.0
_ABSENT = "absent"


@dataclass(frozen=True, slots=True)
class HttpCheck:
    """Consul GETs ``url`` (default ``http://<address>:<port><path>``); 2xx passing, 429
    warning, anything else critical."""

    path: str = "/health"
    url: str | None = None
    interval: float = 5.0
    timeout: float = 2.0


@dataclass(frozen=True, slots=True)
class TcpCheck:
    """Consul opens a TCP connection to ``address:port``; connected means passing."""

    interval: float = 5.0
    timeout: float = 2.0


@dataclass(frozen=True, slots=True)
class TtlCheck:
    """The service itself reports; a heartbeat every ttl/3 keeps it passing while the
    process lives."""

    ttl: float = 10.0


CheckSpec = HttpCheck | TcpCheck | TtlCheck
CheckKind = Literal["http", "tcp", "ttl"]
_CHECK_KINDS: dict[str, CheckSpec] = {"http": HttpCheck(), "tcp": TcpCheck(), "ttl": TtlCheck()}


@dataclass(frozen=True, slots=True)
class ServiceDefinition:
    """A validated registration, ready to send; build with :func:`define_service`."""

    service_id: str
    name: str
    address: str
    port: int
    tags: tuple[str, ...]
    meta: Mapping[str, str]
    check: CheckSpec | None
    deregister_after: float
    payload: Mapping[str, Any] = field(compare=False)
    liveness: HttpCheck | TcpCheck | None = None

    @property
    def check_id(self) -> str:
        return f"service:{self.service_id}"

    @property
    def liveness_check_id(self) -> str:
        return f"service:{self.service_id}:alive"


class ServiceOptions(TypedDict, total=False):
    """What a registration takes besides its name and port, in ``Dcy.register`` and
    ``SyncDcy.register`` alike; the defaults are :func:`define_service`'s."""

    address: str | None
    service_id: str | None
    tags: Iterable[str]
    meta: Mapping[str, str] | None
    check: CheckSpec | CheckKind | None
    liveness: HttpCheck | TcpCheck | None
    deregister_after: float


def define_service(
    name: str,
    port: int,
    *,
    agent: AgentInfo,
    address: str | None = None,
    service_id: str | None = None,
    tags: Iterable[str] = (),
    meta: Mapping[str, str] | None = None,
    check: CheckSpec | CheckKind | None = "http",
    liveness: HttpCheck | TcpCheck | None = None,
    deregister_after: float = MIN_DEREGISTER_AFTER,
) -> ServiceDefinition:
    """Validate every argument and build the agent's registration payload.

    Raises ValueError (InvalidName for names) before anything reaches Consul."""
    validate_service_name(name)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"invalid port {port!r} for service {name!r}: use an int in 1-65535")
    if isinstance(check, str):
        if check not in _CHECK_KINDS:
            raise ValueError(
                f"unknown check type {check!r} for service {name!r}: use http, tcp, ttl or None"
            )
        check = _CHECK_KINDS[check]
    elif check is not None and not isinstance(check, HttpCheck | TcpCheck | TtlCheck):
        raise ValueError(f"unknown check {check!r}: use HttpCheck, TcpCheck, TtlCheck or None")
    if liveness is not None and not isinstance(liveness, HttpCheck | TcpCheck):
        raise ValueError(
            f"liveness={liveness!r}: use TcpCheck (or HttpCheck): Consul must see the process "
            "gone without its help"
        )
    if not math.isfinite(deregister_after) or deregister_after < MIN_DEREGISTER_AFTER:
        raise ValueError(
            f"deregister_after={deregister_after!r}: Consul needs at least "
            f"{MIN_DEREGISTER_AFTER:.0f} seconds"
        )
    tag_tuple = tuple(tags)
    if isinstance(tags, str) or not all(isinstance(t, str) and t for t in tag_tuple):
        raise ValueError(f"tags must be non-empty strings, got {tags!r}")
    meta_dict = dict(meta or {})
    for key, value in meta_dict.items():
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise ValueError(f"meta must map non-empty strings to strings, got {key!r}: {value!r}")
    host = address or agent.node_address or "127.0.0.1"
    sid = service_id or f"{name}-{agent.node_name}-{port}"
    payload: dict[str, Any] = {
        "ID": sid,
        "Name": name,
        "Address": host,
        "Port": port,
        "Tags": list(tag_tuple),
        "Meta": meta_dict,
    }
    if check is not None:
        payload["Check"] = _check_payload(check, name, sid, host, port, deregister_after)
    if liveness is not None:
        alive = _check_payload(liveness, name, sid, host, port, deregister_after)
        alive["CheckID"] = f"service:{sid}:alive"
        alive["Name"] = f"{alive['Name']} (liveness)"
        alive["Notes"] = f"{alive['Notes']}; fails only when the process is gone"
        # Registered by the process itself, which is there: no critical start to wait out.
        alive["Status"] = "passing"
        payload["Checks"] = [alive]
    return ServiceDefinition(
        sid, name, host, port, tag_tuple, meta_dict, check, deregister_after, payload, liveness
    )


def _check_payload(
    check: CheckSpec, name: str, sid: str, host: str, port: int, deregister_after: float
) -> dict[str, Any]:
    hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    common: dict[str, Any] = {
        "CheckID": f"service:{sid}",
        "DeregisterCriticalServiceAfter": _duration(deregister_after),
    }
    if isinstance(check, HttpCheck):
        url = check.url or f"http://{hostport}{check.path}"
        return common | {
            "Name": f"{name} HTTP {check.path if check.url is None else url}",
            "Notes": f"GET {url} every {_duration(check.interval)}: 2xx means ready to serve,"
            " anything else takes this instance out of rotation",
            "HTTP": url,
            "Interval": _duration(check.interval),
            "Timeout": _duration(check.timeout),
        }
    if isinstance(check, TcpCheck):
        return common | {
            "Name": f"{name} TCP {hostport}",
            "Notes": f"TCP connect to {hostport} every {_duration(check.interval)}",
            "TCP": hostport,
            "Interval": _duration(check.interval),
            "Timeout": _duration(check.timeout),
        }
    return common | {
        "Name": f"{name} heartbeat",
        "Notes": f"The process reports every {_duration(check.ttl / 3)}; silent for "
        f"{_duration(check.ttl)} means it is gone or hung",
        "TTL": _duration(check.ttl),
        # Passing from the start: the first heartbeat follows at once, and a fresh
        # instance should not flap through critical.
        "Status": "passing",
    }


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.0f}ms"


@dataclass(frozen=True, slots=True)
class AgentServiceSpec:
    """One service registered with the local agent; the value is None when the agent does
    not know it (never registered, deregistered, or forgotten by a restarted agent)."""

    service_id: str

    async def fetch(self, api: ConsulAPI, index: Index, wait: float) -> QueryResult:
        if index == _ABSENT:
            await asyncio.sleep(ABSENT_POLL_INTERVAL)
            index = ""
        result = await api.agent_service(self.service_id, index=index, wait=wait)
        return result if result.body is not None else QueryResult(_ABSENT, None)

    def decode(self, body: Any) -> str | None:
        # Presence is all the keeper of a registration needs; the ID says it.
        return None if body is None else str(body.get("ID") or self.service_id)

    def __str__(self) -> str:
        return f"agent service {self.service_id}"


OnRegistrationLost = Callable[["Registration"], Awaitable[None] | None]


class Registration:
    """A registered instance. Keeps itself registered until :meth:`deregister`, or until
    Consul refuses that for good (see :meth:`wait_lost`)."""

    def __init__(
        self,
        definition: ServiceDefinition,
        api: ConsulAPI,
        engine: WatchEngine,
        *,
        on_lost: OnRegistrationLost | None = None,
    ) -> None:
        self.definition = definition
        self._api = api
        self._engine = engine
        self._keeper: Subscription[str | None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._closed = False
        self.registrations = 0
        self._ttl_status = ("passing", "alive")
        #: Set once Consul refused for good what keeping this registration needs.
        self.lost = asyncio.Event()
        #: That refusal (an AclDenied, a TlsError, ...); None while not lost.
        self.error: DcyError | None = None
        self._on_lost = on_lost
        self._callbacks: set[asyncio.Task[None]] = set()

    @property
    def service_id(self) -> str:
        return self.definition.service_id

    @property
    def check_ids(self) -> tuple[str, ...]:
        """The IDs of this instance's checks: its check, then its liveness check."""
        ids = (self.definition.check_id,) if self.definition.check is not None else ()
        return ids + self.liveness_check_ids

    @property
    def liveness_check_ids(self) -> tuple[str, ...]:
        """The liveness check's ID (none without one): what a leadership binds its session
        to (``dcy.leadership(name, checks=registration.liveness_check_ids)``)."""
        return (self.definition.liveness_check_id,) if self.definition.liveness else ()

    async def wait_lost(self) -> DcyError:
        """Return (the refusal) once the registration is lost: Consul refused a heartbeat, a
        re-registration or the watch of its entry with an error that will not heal. The
        instance may still be in the catalog, but nothing keeps it there any more."""
        await self.lost.wait()
        assert self.error is not None
        return self.error

    async def start(self) -> None:
        await self._register()
        self._keeper = self._engine.subscribe(
            AgentServiceSpec(self.service_id), self._on_agent_entry, on_end=self._lose
        )
        if isinstance(self.definition.check, TtlCheck):
            self._heartbeat = asyncio.get_running_loop().create_task(
                self._beat(self.definition.check.ttl / 3), name=f"dcy-heartbeat:{self.service_id}"
            )

    async def _register(self) -> None:
        payload = dict(self.definition.payload)
        if isinstance(self.definition.check, TtlCheck):
            # Re-registering must not reset a TTL check the service reported failing.
            payload["Check"] = {**payload["Check"], "Status": self._ttl_status[0]}
        await self._api.register_service(payload)
        self.registrations += 1
        if self.registrations > 1:
            log.warning("re-registered %s: the agent had forgotten it", self.service_id)

    async def _on_agent_entry(self, snapshot: Snapshot[str | None]) -> None:
        if snapshot.value is None and not snapshot.stale and not self._closed:
            # The keeper's watch polls an absent service, so the next attempt follows.
            await self._reregister_quietly()

    async def _beat(self, every: float) -> None:
        while not self.lost.is_set():
            status, output = self._ttl_status
            try:
                await self._api.update_ttl(self.definition.check_id, status, output)
            except UnknownCheck:
                # The agent forgot us (restarted) before our watch of the entry noticed.
                await self._reregister_quietly()
            except DcyError as exc:
                if not exc.transient:
                    self._lose(exc)
                    return
                log.debug("heartbeat of %s failed: %s", self.service_id, exc)
            await asyncio.sleep(every)

    async def _reregister_quietly(self) -> None:
        if self.lost.is_set():
            return
        try:
            await self._register()
        except DcyError as exc:
            if not exc.transient:
                self._lose(exc)
            else:
                log.warning("cannot re-register %s yet: %s", self.service_id, exc)

    def _lose(self, error: DcyError) -> None:
        """Stop keeping the registration: retrying a refusal that will not heal only hides
        it. Called from the heartbeat task, the keeper's callback or its end."""
        if self.lost.is_set() or self._closed:
            return
        self.error = error
        self.lost.set()
        log.error("%s can no longer be kept registered: %s", self.service_id, error)
        heartbeat = self._heartbeat
        if heartbeat is not None and heartbeat is not asyncio.current_task():
            heartbeat.cancel()
        if self._keeper is not None:
            # Not awaited here: this may run in the keeper's own task.
            self._spawn(self._keeper.aclose(), "keeper-close")
        if self._on_lost is not None:
            self._spawn(self._call_on_lost(self._on_lost), "on-lost")

    def _spawn(self, coroutine: Coroutine[Any, Any, None], role: str) -> None:
        task = asyncio.get_running_loop().create_task(
            coroutine, name=f"dcy-registration-{role}:{self.service_id}"
        )
        self._callbacks.add(task)
        task.add_done_callback(self._callbacks.discard)

    async def _call_on_lost(self, callback: OnRegistrationLost) -> None:
        try:
            result = callback(self)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("on_lost callback of registration %s failed", self.service_id)

    async def set_status(
        self, status: Literal["passing", "warning", "critical"], output: str = ""
    ) -> None:
        """Report a TTL check's state now (and keep reporting it with each heartbeat)."""
        if not isinstance(self.definition.check, TtlCheck):
            raise ValueError(f"{self.service_id} has no TTL check to report to")
        if status not in ("passing", "warning", "critical"):
            raise ValueError(f"invalid status {status!r}: use passing, warning or critical")
        self._ttl_status = (status, output)
        await self._api.update_ttl(self.definition.check_id, status, output)

    async def deregister(self) -> None:
        """Stop keeping the registration alive, then remove it from the agent."""
        if self._closed:
            return
        self._closed = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        if self._keeper is not None:
            await self._keeper.aclose()
        await self._api.deregister_service(self.service_id)

    async def __aenter__(self) -> Registration:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.deregister()
