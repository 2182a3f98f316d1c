"""The seam between dcy and Consul: a small async interface, and its real implementation.

Everything dcy asks Consul goes through :class:`ConsulAPI`. :class:`HttpConsul` implements it
for every request of a process, read or write, through one pipeline
(:meth:`HttpConsul._request`): the URL built once, the answer read, its index taken from the
headers, its JSON decoded with orjson, and every error status classified where it arrives
(``dcy._answers``) into dcy's typed errors. The bytes travel over one aiohttp session (one
connection pool), or, to an HTTPS agent that offers it, as HTTP/2 streams (``dcy._h2``).
``dcy.testing.FakeConsul`` implements the same interface in memory for unit tests; the
contract tests in ``tests/`` run the same assertions against both.

Why no Consul client library (py-consul, measured here with Consul 1.14): importing
``consul.aio`` adds ~40 ms to ``import aiohttp`` (~150 ms), because it imports ``requests``
for its sync client; its aiohttp adapter opens a session of its own (no unix socket, no
client certificate of ours) unless one overrides its private methods; and its URL quoting,
text decoding and response wrapping were most of the client-side time of a blocking read
(bench/template.py). Consul's HTTP API is small and stable: the dozen requests dcy makes are
less code than the adapter around a client.

Indexes: Consul's blocking queries take an ``index`` (an int from ``X-Consul-Index``); agent
endpoints block on a content ``hash`` instead (``X-Consul-ContentHash``). Both travel as the
``index`` of :class:`QueryResult`, an ``int`` or a ``str``.

Reads outside the watch engine are deliberate one-shot reads, all of them in ``dcy._reads``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import socket
import ssl
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
import orjson
from yarl import URL

from dcy._answers import FILTERED_BY_ACLS, classify, hidden_by_acls
from dcy._config import ConsulConfig
from dcy._errors import (
    ConsulUnavailable,
    H2Unavailable,
    TlsError,
    TlsHandshakeFailed,
    UnknownService,
)
from dcy._sockets import count_connections

if TYPE_CHECKING:
    from dcy._h2 import H2Pool

log = logging.getLogger("dcy.consul")

Index = int | str

# Consul adds up to wait/16 of jitter to a blocking query; this much more covers a slow answer.
_HTTP_SLACK = 10.0
_CALL_TIMEOUT = 10.0
# HTTP/2 connections when no budget is set: each carries hundreds of streams.
_UNBOUNDED_H2_CONNECTIONS = 64


@dataclass(frozen=True, slots=True)
class QueryResult:
    """One answer of a (possibly blocking) read: the new index and the decoded body.

    ``body`` is None when Consul answered 404 (an unknown key or agent service).
    """

    index: Index
    body: Any


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """What dcy learns from ``/v1/agent/self``."""

    datacenter: str
    node_name: str
    domain: str
    dns_port: int
    dns_address: str
    version: str
    node_address: str = ""


class ConsulAPI(Protocol):
    """The only operations dcy performs on Consul."""

    async def agent_info(self) -> AgentInfo: ...

    async def health_service(
        self,
        name: str,
        *,
        tag: str | None = None,
        datacenter: str | None = None,
        index: Index = 0,
        wait: float | None = None,
    ) -> QueryResult:
        """``GET /v1/health/service/<name>``: every instance in every state, with checks."""
        ...

    async def catalog_services(
        self, *, datacenter: str | None = None, index: Index = 0, wait: float | None = None
    ) -> QueryResult:
        """``GET /v1/catalog/services``: service name → tags."""
        ...

    async def catalog_nodes(
        self, *, datacenter: str | None = None, index: Index = 0, wait: float | None = None
    ) -> QueryResult:
        """``GET /v1/catalog/nodes``: every node with its address and meta."""
        ...

    async def catalog_node(
        self,
        node: str,
        *,
        datacenter: str | None = None,
        index: Index = 0,
        wait: float | None = None,
    ) -> QueryResult:
        """``GET /v1/catalog/node/<node>``: one node and its services; body None if unknown."""
        ...

    async def agent_service(
        self, service_id: str, *, index: Index = "", wait: float | None = None
    ) -> QueryResult:
        """``GET /v1/agent/service/<id>`` (hash-blocking); body None when not registered."""
        ...

    async def register_service(self, definition: Mapping[str, Any]) -> None: ...

    async def deregister_service(self, service_id: str) -> None:
        """Remove a local registration; one the agent does not know (deregistered already,
        or forgotten by a restarted agent) is no error: either way it is gone."""
        ...

    async def update_ttl(self, check_id: str, status: str, output: str = "") -> None:
        """``PUT /v1/agent/check/update/<id>``; UnknownCheck when the agent has no such check."""
        ...

    async def kv_get(
        self,
        key: str,
        *,
        recurse: bool = False,
        index: Index = 0,
        wait: float | None = None,
        datacenter: str | None = None,
    ) -> QueryResult:
        """``GET /v1/kv/<key>``: a list of entries (``Key``, ``Value`` as bytes, ``Flags``,
        ``Session``, ``ModifyIndex``, ``CreateIndex``, ``LockIndex``), every key under the
        prefix with ``recurse``; body None when nothing matches (404)."""
        ...

    async def kv_put(
        self,
        key: str,
        value: bytes,
        *,
        cas: int | None = None,
        acquire: str | None = None,
        release: str | None = None,
        flags: int | None = None,
    ) -> bool:
        """``PUT /v1/kv/<key>``: False when a check-and-set, acquire or release was refused;
        SessionInvalid when ``acquire`` names a session that does not exist. At most one of
        ``cas``, ``acquire``, ``release`` (ValueError otherwise)."""
        ...

    async def kv_delete(self, key: str, *, recurse: bool = False, cas: int | None = None) -> bool:
        """``DELETE /v1/kv/<key>``: False only when a check-and-set was refused."""
        ...

    async def session_create(
        self,
        *,
        name: str,
        ttl: float,
        lock_delay: float,
        behavior: str = "release",
        node_checks: tuple[str, ...] = ("serfHealth",),
        service_checks: tuple[str, ...] = (),
    ) -> str:
        """``PUT /v1/session/create`` on the local node; returns the session ID. Consul
        invalidates the session when one of ``node_checks`` or ``service_checks`` (check IDs)
        goes critical or is deregistered, and refuses to create it: CheckCritical while one is
        critical, UnknownCheck when one is not registered."""
        ...

    async def session_renew(self, session_id: str) -> None:
        """``PUT /v1/session/renew/<id>``; SessionInvalid when the session no longer exists."""
        ...

    async def session_destroy(self, session_id: str) -> None:
        """``PUT /v1/session/destroy/<id>``: invalidates the session (lock-delay applies to
        locks it still holds). Destroying an unknown session is not an error."""
        ...

    async def session_info(self, session_id: str) -> dict[str, Any] | None:
        """``GET /v1/session/info/<id>``: the session, or None when it does not exist."""
        ...

    async def health_state(
        self,
        state: str = "any",
        *,
        datacenter: str | None = None,
        index: Index = 0,
        wait: float | None = None,
    ) -> QueryResult:
        """``GET /v1/health/state/<state>``: every check of the datacenter (node and service
        checks) in ``state``: passing, warning, critical or any. Other states: ValueError."""
        ...

    async def health_state_bytes(
        self, *, datacenter: str | None = None, index: Index = 0, wait: float | None = None
    ) -> QueryResult:
        """``GET /v1/health/state/any`` undecoded: ``body`` holds the answer's bytes as
        Consul sent them (a change detector decodes only what changed, dcy._array_delta)."""
        ...

    async def kv_bytes(
        self,
        prefix: str,
        *,
        index: Index = 0,
        wait: float | None = None,
        datacenter: str | None = None,
    ) -> QueryResult:
        """``GET /v1/kv/<prefix>?recurse`` undecoded: ``body`` holds the answer's bytes
        (values in base64, as Consul sent them), None when nothing is there (404)."""
        ...

    async def health_state_index(self, *, datacenter: str | None = None) -> Index:
        """The index of ``/v1/health/state/any`` (the checks table's newest write), without
        its body: a ``filter`` no check matches."""
        ...

    async def ui_services(self, *, datacenter: str | None = None) -> QueryResult:
        """``GET /v1/internal/ui/services`` (non-blocking): per service ``Name``,
        ``InstanceCount``, ``Nodes``, ``Tags``, check counts; body None when the agent has
        no such endpoint (404)."""
        ...

    async def catalog_datacenters(self) -> list[str]:
        """``GET /v1/catalog/datacenters``: every known datacenter, nearest first."""
        ...

    async def coordinate_datacenters(self) -> list[dict[str, Any]]:
        """``GET /v1/coordinate/datacenters``: the WAN coordinates of each datacenter's
        servers."""
        ...

    @property
    def streams_per_connection(self) -> int:
        """How many blocking queries one connection to the agent carries at once (1 over
        HTTP/1.1): the watch engine's connection budget is counted in these."""
        ...

    async def aclose(self) -> None: ...


# A filter no check matches (a check ID is never empty).
NO_CHECK = 'CheckID == ""'


class _Answer:
    """What the pipeline hands back: the status, the index header, the raw body."""

    __slots__ = ("body", "filtered", "index", "status")

    def __init__(self, status: int, index: Index, body: bytes, filtered: bool = False) -> None:
        self.status = status
        self.index = index
        self.body = body
        self.filtered = filtered

    def json(self) -> Any:
        return orjson.loads(self.body) if self.body else None


Params = Sequence[tuple[str, Any]]


class HttpConsul:
    """The real Consul, over HTTP(S) or a unix socket."""

    def __init__(
        self, config: ConsulConfig, *, max_connections: int = 0, blocking_connections: int = 0
    ) -> None:
        """Create inside a running event loop. ``max_connections`` bounds the connections
        to the agent (0: unbounded, every blocking query holding one for its whole wait);
        ``blocking_connections`` how many of them blocking queries may hold at once (0: all),
        so that writes and one-shot reads never queue behind them."""
        self.config = config
        self.requests = 0
        self.max_connections = max_connections
        self._blocking_slots = (
            asyncio.Semaphore(blocking_connections) if blocking_connections > 0 else None
        )
        self._in_flight = 0
        connector: aiohttp.BaseConnector
        if config.scheme == "unix":
            assert config.socket_path is not None
            connector = aiohttp.UnixConnector(path=config.socket_path, limit=max_connections)
        else:
            context = config.ssl_context()
            connector = aiohttp.TCPConnector(
                limit=max_connections,
                ssl=context if context is not None else False,
                # Keep-alive connections are the whole point of a watch; resolving
                # "localhost" per connection is not.
                ttl_dns_cache=300,
                family=socket.AF_UNSPEC,
            )
        headers = {
            "User-Agent": "dcy",
            # No gzip: the agent is local, and compressing every answer (Consul) and inflating
            # it (us) is time between a change and its consumers (bench/template.py).
            "Accept-Encoding": "identity",
        }
        if config.token:
            headers["X-Consul-Token"] = config.token
        # The name the agent's certificate must carry (and SNI), when it is not the host we
        # dial: Consul's CLI checks CONSUL_TLS_SERVER_NAME the same way.
        self._server_hostname = config.tls_server_name if config.scheme == "https" else None
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=_CALL_TIMEOUT),
            headers=headers,
        )
        self._base_url = config.base_url
        # Over HTTPS, HTTP/2 first (dcy._h2): every request a stream, so blocking queries
        # share a few connections; HTTP/1.1 through the session above if the agent declines.
        self._h2: H2Pool | None = None
        if config.scheme == "https":
            from dcy._h2 import H2Pool

            h2_context = config.ssl_context()
            assert h2_context is not None
            self._h2 = H2Pool(
                config.host,
                config.port,
                context=h2_context,
                server_hostname=config.tls_server_name,
                max_connections=max_connections or _UNBOUNDED_H2_CONNECTIONS,
                blocking_connections=blocking_connections,
                headers=list(headers.items()),
                connect_timeout=_CALL_TIMEOUT,
            )
        self._streams = 1

    # -- the pipeline: every request, read or write --------------------------------------------
    async def _request(
        self,
        method: str,
        path: str,
        params: Params = (),
        *,
        body: bytes | None = None,
        index: Index = 0,
        wait: float | None = None,
        hash_index: bool = False,
        everything_visible: bool = False,
    ) -> _Answer:
        """Send one request and classify its outcome. A ``wait`` with a non-empty ``index``
        makes it a blocking query. A GET answered 404 comes back (an unknown key or agent
        service is an answer); every other error status raises what ``classify`` says.

        A read of named things (a service's instances, a session) that ACLs filtered down
        to nothing is AclDenied. With ``everything_visible`` (all services, all nodes, every
        check in a state) an empty filtered answer is an answer: the token may lack read on
        what was left out and still have read on things that merely do not exist now."""
        timeout = _CALL_TIMEOUT
        blocking = False
        if index and wait is not None:
            blocking = True
            name = "hash" if hash_index else "index"
            params = [*params, (name, index), ("wait", f"{max(wait, 0.001) * 1000:.0f}ms")]
            timeout = wait * 1.0625 + _HTTP_SLACK
        # Built by hand, once: yarl parsing and re-quoting the URL was a measurable part of
        # each blocking read (bench/template.py).
        target = urllib.parse.quote(path, safe="/:")
        if params:
            target = f"{target}?{urllib.parse.urlencode(params)}"
        self.requests += 1
        if blocking and self._blocking_slots is not None and self._streams == 1:
            async with self._blocking_slots:
                answer = await self._send(method, path, target, body, timeout, blocking, hash_index)
        else:
            answer = await self._send(method, path, target, body, timeout, blocking, hash_index)
        if answer.filtered and not everything_visible and not answer.json():
            # A list read whose every entry the token may not see answers 200 and empty:
            # without this, a missing service:read or node:read looks like "no instances".
            raise hidden_by_acls(f"{method} {path}")
        return answer

    async def _send(
        self,
        method: str,
        path: str,
        target: str,
        body: bytes | None,
        timeout: float,
        blocking: bool,
        hash_index: bool,
    ) -> _Answer:
        index_header = "X-Consul-ContentHash" if hash_index else "X-Consul-Index"
        pool = self._h2
        if pool is not None:
            try:
                with self._transport_errors(method, path, timeout):
                    async with asyncio.timeout(timeout):
                        reply = await pool.request(method, target, body, blocking=blocking)
            except H2Unavailable as declined:
                if self._h2 is pool:
                    log.info(
                        "Consul at %s does not speak HTTP/2 (%s): HTTP/1.1",
                        self._base_url,
                        declined,
                    )
                    self._h2 = None
                    await pool.aclose()
            else:
                self._streams = pool.streams_per_connection
                status, raw = reply.status, reply.body
                header = reply.headers.get(index_header.lower(), "")
                filtered = reply.headers.get(FILTERED_BY_ACLS.lower()) == "true"
                return self._answer(method, path, status, header, raw, filtered, hash_index)
        with self._transport_errors(method, path, timeout):
            async with (
                asyncio.timeout(timeout),
                self._session.request(
                    method,
                    URL(self._base_url + target, encoded=True),
                    data=body,
                    server_hostname=self._server_hostname,
                ) as response,
            ):
                raw = await response.read()
                status = response.status
                header = response.headers.get(index_header, "")
                filtered = response.headers.get(FILTERED_BY_ACLS) == "true"
        return self._answer(method, path, status, header, raw, filtered, hash_index)

    def _answer(
        self,
        method: str,
        path: str,
        status: int,
        header: str,
        raw: bytes,
        filtered: bool,
        hash_index: bool,
    ) -> _Answer:
        if status >= 400 and not (status == 404 and method == "GET"):
            raise classify(
                status,
                raw.decode("utf-8", "replace"),
                operation=f"{method} {path}",
                address=self.config.address,
            )
        return _Answer(status, header if hash_index else _int_index(header), raw, filtered)

    @contextlib.contextmanager
    def _transport_errors(self, method: str, path: str, timeout: float) -> Iterator[None]:
        """Failures below HTTP as dcy's errors."""
        try:
            yield
        except TimeoutError as exc:
            raise ConsulUnavailable(
                f"Consul at {self.config.address} did not answer {method} {path} within "
                f"{timeout:.0f}s",
                address=self.config.address,
            ) from exc
        except (
            aiohttp.ClientSSLError,
            aiohttp.ServerFingerprintMismatch,
            TlsHandshakeFailed,
        ) as exc:
            raise TlsError(
                f"TLS with Consul at {self.config.address} failed: {exc}. Check CONSUL_CACERT "
                "(the CA that signed the agent's certificate), CONSUL_TLS_SERVER_NAME and the "
                "client certificate"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            refusal = _tls_refusal(exc)
            if refusal is not None:
                # With TLS 1.3 the agent refuses a missing or unknown client certificate
                # after the handshake looked done: it arrives as a read error, and is no
                # more transient than a refused handshake.
                raise TlsError(
                    f"TLS with Consul at {self.config.address} failed: the agent refused our "
                    f"client certificate ({refusal.reason or refusal}). Check "
                    "CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY (a certificate signed by the "
                    "agent's CA)"
                ) from exc
            raise ConsulUnavailable(
                f"cannot reach Consul at {self.config.address}: {exc}",
                address=self.config.address,
            ) from exc

    async def _read(
        self,
        path: str,
        params: Params,
        *,
        index: Index,
        wait: float | None,
        everything_visible: bool = False,
    ) -> QueryResult:
        answer = await self._request(
            "GET", path, params, index=index, wait=wait, everything_visible=everything_visible
        )
        return QueryResult(answer.index, None if answer.status == 404 else answer.json())

    # -- ConsulAPI ----------------------------------------------------------------------------
    async def agent_info(self) -> AgentInfo:
        body = (await self._request("GET", "/v1/agent/self")).json() or {}
        config = body.get("Config") or {}
        debug = body.get("DebugConfig") or {}
        dns_address = "127.0.0.1"
        for addr in debug.get("DNSAddrs") or ():
            # "udp://127.0.0.1:8600": the agent's own listener, 0.0.0.0 meaning loopback works.
            host = str(addr).split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
            if host and host not in ("0.0.0.0", "::"):
                dns_address = host
                break
        return AgentInfo(
            datacenter=config.get("Datacenter") or "",
            node_name=config.get("NodeName") or "",
            domain=(debug.get("DNSDomain") or "consul").strip("."),
            dns_port=int(debug.get("DNSPort") or 8600),
            dns_address=dns_address,
            version=config.get("Version") or "",
            node_address=(body.get("Member") or {}).get("Addr") or "",
        )

    async def health_service(
        self,
        name: str,
        *,
        tag: str | None = None,
        datacenter: str | None = None,
        index: Index = 0,
        wait: float | None = None,
    ) -> QueryResult:
        params: list[tuple[str, Any]] = []
        if tag:
            params.append(("tag", tag))
        if datacenter:
            params.append(("dc", datacenter))
        return await self._read(f"/v1/health/service/{name}", params, index=index, wait=wait)

    async def catalog_services(
        self, *, datacenter: str | None = None, index: Index = 0, wait: float | None = None
    ) -> QueryResult:
        params = [("dc", datacenter)] if datacenter else []
        return await self._read(
            "/v1/catalog/services", params, index=index, wait=wait, everything_visible=True
        )

    async def catalog_nodes(
        self, *, datacenter: str | None = None, index: Index = 0, wait: float | None = None
    ) -> QueryResult:
        params = [("dc", datacenter)] if datacenter else []
        return await self._read(
            "/v1/catalog/nodes", params, index=index, wait=wait, everything_visible=True
        )

    async def catalog_node(
        self,
        node: str,
        *,
        datacenter: str | None = None,
        index: Index = 0,
        wait: float | None = None,
    ) -> QueryResult:
        params = [("dc", datacenter)] if datacenter else []
        return await self._read(f"/v1/catalog/node/{node}", params, index=index, wait=wait)

    async def agent_service(
        self, service_id: str, *, index: Index = "", wait: float | None = None
    ) -> QueryResult:
        answer = await self._request(
            "GET", f"/v1/agent/service/{service_id}", index=index, wait=wait, hash_index=True
        )
        if answer.status == 404:
            return QueryResult("", None)
        return QueryResult(answer.index, answer.json())

    async def register_service(self, definition: Mapping[str, Any]) -> None:
        await self._request(
            "PUT",
            "/v1/agent/service/register",
            [("replace-existing-checks", "true")],
            body=orjson.dumps(definition),
        )

    async def deregister_service(self, service_id: str) -> None:
        try:
            await self._request("PUT", f"/v1/agent/service/deregister/{service_id}")
        except UnknownService as exc:
            log.debug("%s was not registered with the agent: %s", service_id, exc)

    async def update_ttl(self, check_id: str, status: str, output: str = "") -> None:
        await self._request(
            "PUT",
            f"/v1/agent/check/update/{check_id}",
            body=orjson.dumps({"Status": status, "Output": output}),
        )

    async def kv_get(
        self,
        key: str,
        *,
        recurse: bool = False,
        index: Index = 0,
        wait: float | None = None,
        datacenter: str | None = None,
    ) -> QueryResult:
        params: list[tuple[str, Any]] = [("recurse", "true")] if recurse else []
        if datacenter:
            params.append(("dc", datacenter))
        result = await self._read(f"/v1/kv/{key}", params, index=index, wait=wait)
        if result.body is None:
            return result
        return QueryResult(result.index, [_kv_entry(raw) for raw in result.body])

    async def kv_put(
        self,
        key: str,
        value: bytes,
        *,
        cas: int | None = None,
        acquire: str | None = None,
        release: str | None = None,
        flags: int | None = None,
    ) -> bool:
        params = kv_write_params(cas=cas, acquire=acquire, release=release)
        if flags is not None:
            params.append(("flags", flags))
        answer = await self._request("PUT", f"/v1/kv/{key}", params, body=bytes(value))
        return answer.json() is True

    async def kv_delete(self, key: str, *, recurse: bool = False, cas: int | None = None) -> bool:
        params = kv_write_params(cas=cas, recurse=recurse)
        answer = await self._request("DELETE", f"/v1/kv/{key}", params)
        return answer.json() is True

    async def session_create(
        self,
        *,
        name: str,
        ttl: float,
        lock_delay: float,
        behavior: str = "release",
        node_checks: tuple[str, ...] = ("serfHealth",),
        service_checks: tuple[str, ...] = (),
    ) -> str:
        check_session_behavior(behavior)
        payload: dict[str, Any] = {
            "Name": name,
            "TTL": f"{ttl:g}s",
            "LockDelay": f"{lock_delay * 1000:.0f}ms",
            "Behavior": behavior,
            "NodeChecks": list(node_checks),
        }
        if service_checks:
            payload["ServiceChecks"] = [{"ID": check_id} for check_id in service_checks]
        answer = await self._request("PUT", "/v1/session/create", body=orjson.dumps(payload))
        return str(answer.json()["ID"])

    async def session_renew(self, session_id: str) -> None:
        await self._request("PUT", f"/v1/session/renew/{session_id}")

    async def session_destroy(self, session_id: str) -> None:
        await self._request("PUT", f"/v1/session/destroy/{session_id}")

    async def session_info(self, session_id: str) -> dict[str, Any] | None:
        sessions = (await self._request("GET", f"/v1/session/info/{session_id}")).json()
        return dict(sessions[0]) if sessions else None

    async def health_state(
        self,
        state: str = "any",
        *,
        datacenter: str | None = None,
        index: Index = 0,
        wait: float | None = None,
    ) -> QueryResult:
        check_health_state(state)
        params = [("dc", datacenter)] if datacenter else []
        return await self._read(
            f"/v1/health/state/{state}", params, index=index, wait=wait, everything_visible=True
        )

    async def health_state_bytes(
        self, *, datacenter: str | None = None, index: Index = 0, wait: float | None = None
    ) -> QueryResult:
        params = [("dc", datacenter)] if datacenter else []
        answer = await self._request(
            "GET", "/v1/health/state/any", params, index=index, wait=wait, everything_visible=True
        )
        return QueryResult(answer.index, answer.body)

    async def kv_bytes(
        self,
        prefix: str,
        *,
        index: Index = 0,
        wait: float | None = None,
        datacenter: str | None = None,
    ) -> QueryResult:
        params: list[tuple[str, Any]] = [("recurse", "true")]
        if datacenter:
            params.append(("dc", datacenter))
        answer = await self._request("GET", f"/v1/kv/{prefix}", params, index=index, wait=wait)
        return QueryResult(answer.index, None if answer.status == 404 else answer.body)

    async def health_state_index(self, *, datacenter: str | None = None) -> Index:
        # Consul takes the index before it filters: an empty answer with the table's index.
        params = [("filter", NO_CHECK), *([("dc", datacenter)] if datacenter else [])]
        answer = await self._request("GET", "/v1/health/state/any", params, everything_visible=True)
        return answer.index

    async def ui_services(self, *, datacenter: str | None = None) -> QueryResult:
        params = [("dc", datacenter)] if datacenter else []
        return await self._read(
            "/v1/internal/ui/services", params, index=0, wait=None, everything_visible=True
        )

    async def catalog_datacenters(self) -> list[str]:
        answer = await self._request("GET", "/v1/catalog/datacenters")
        return [str(dc) for dc in answer.json() or ()]

    async def coordinate_datacenters(self) -> list[dict[str, Any]]:
        return list((await self._request("GET", "/v1/coordinate/datacenters")).json() or ())

    @property
    def open_connections(self) -> int | None:
        """TCP connections this process holds to the agent, as the kernel counts them
        (Linux); None where that cannot be read (a unix socket, another system)."""
        if self.config.scheme == "unix":
            return None
        return count_connections(self._base_url)

    @property
    def streams_per_connection(self) -> int:
        """Blocking queries one connection carries: 1 over HTTP/1.1, the agent's stream
        limit over HTTP/2."""
        return self._streams

    async def aclose(self) -> None:
        if self._h2 is not None:
            await self._h2.aclose()
        await self._session.close()


# OpenSSL's names (``SSLError.reason``) for the alerts a peer sends when it will not accept
# us: no client certificate, one it cannot verify, expired, revoked, or a handshake it
# refuses. Only these end a watch; any other TLS error (a damaged record, say) is a broken
# connection like any other, and retried.
_REFUSED_BY_PEER = frozenset(
    {
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_HANDSHAKE_FAILURE",
        "TLSV1_ALERT_UNKNOWN_CA",
        "TLSV1_ALERT_ACCESS_DENIED",
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "TLSV1_ALERT_INSUFFICIENT_SECURITY",
    }
)


def _tls_refusal(exc: BaseException) -> ssl.SSLError | None:
    """The alert by which the agent refused us, behind a connection error, if there is one
    (see ``_REFUSED_BY_PEER``)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        # An SSLError made outside the ssl module may lack the attribute.
        reason = getattr(current, "reason", None)
        if isinstance(current, ssl.SSLError) and reason in _REFUSED_BY_PEER:
            return current
        current = current.__cause__ or current.__context__
    return None


HEALTH_STATES = ("any", "passing", "warning", "critical")


def check_health_state(state: str) -> str:
    """Consul 1.14 answers an unknown state with an empty list; dcy refuses it instead."""
    if state not in HEALTH_STATES:
        raise ValueError(f"unknown health state {state!r}: use one of {', '.join(HEALTH_STATES)}")
    return state


def _int_index(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        return 0


SESSION_BEHAVIORS = ("release", "delete")


def check_session_behavior(behavior: str) -> str:
    if behavior not in SESSION_BEHAVIORS:
        raise ValueError(f"unknown session behavior {behavior!r}: use release or delete")
    return behavior


def kv_write_params(
    *,
    cas: int | None = None,
    acquire: str | None = None,
    release: str | None = None,
    recurse: bool = False,
) -> list[tuple[str, Any]]:
    """The query parameters of a KV write; combinations Consul would resolve silently (the
    last one wins) raise ValueError instead."""
    # Consul silently lets the last of these win; one write means one of them.
    named = (("cas", cas), ("acquire", acquire), ("release", release))
    given: list[tuple[str, Any]] = [(name, v) for name, v in named if v is not None]
    if len(given) > 1:
        raise ValueError(f"use at most one of cas, acquire, release; got {dict(given)!r}")
    if cas is not None and (isinstance(cas, bool) or cas < 0):
        raise ValueError(f"cas must be an index >= 0, got {cas!r}")
    if recurse and cas is not None:
        raise ValueError("a recursive delete cannot be a check-and-set")
    return [*given, ("recurse", "true")] if recurse else given


def _kv_entry(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Consul's JSON entry with ``Value`` decoded from base64 (null, an empty value, → b"")."""
    value = raw.get("Value")
    return {
        "Key": raw["Key"],
        "Value": base64.b64decode(value) if value else b"",
        "Flags": int(raw.get("Flags") or 0),
        "Session": raw.get("Session") or None,
        "ModifyIndex": int(raw.get("ModifyIndex") or 0),
        "CreateIndex": int(raw.get("CreateIndex") or 0),
        "LockIndex": int(raw.get("LockIndex") or 0),
    }
