"""The seam between dcy and Consul: a small async interface, and its real implementation.

Everything dcy asks Consul goes through :class:`ConsulAPI`. :class:`HttpConsul` implements it on
py-consul with one aiohttp session (one connection pool) for every call of a process;
``dcy.testing.FakeConsul`` implements it in memory for unit tests. The contract tests in
``tests/`` run the same assertions against both.

Indexes: Consul's blocking queries take an ``index`` (an int from ``X-Consul-Index``); agent
endpoints block on a content ``hash`` instead (``X-Consul-ContentHash``). Both travel as the
``index`` of :class:`QueryResult`, an ``int`` or a ``str``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import consul.aio
import consul.base
import orjson
from consul.exceptions import Timeout as PyConsulTimeout
from yarl import URL

from dcy._config import ConsulConfig
from dcy._errors import AclDenied, ConsulError, ConsulUnavailable, TlsError

log = logging.getLogger("dcy.consul")

Index = int | str

# Consul adds up to wait/16 of jitter to a blocking query; this much more covers a slow answer.
_HTTP_SLACK = 10.0
_CALL_TIMEOUT = 10.0


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

    async def update_ttl(self, check_id: str, status: str, output: str = "") -> None: ...

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
        """``PUT /v1/kv/<key>``: False when a check-and-set, acquire or release was refused.
        At most one of ``cas``, ``acquire``, ``release`` (ValueError otherwise)."""
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
        goes critical or is deregistered, and refuses to create it while one is critical."""
        ...

    async def session_renew(self, session_id: str) -> bool:
        """``PUT /v1/session/renew/<id>``: False when the session no longer exists."""
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

    async def catalog_datacenters(self) -> list[str]:
        """``GET /v1/catalog/datacenters``: every known datacenter, nearest first."""
        ...

    async def coordinate_datacenters(self) -> list[dict[str, Any]]:
        """``GET /v1/coordinate/datacenters``: the WAN coordinates of each datacenter's
        servers."""
        ...

    async def aclose(self) -> None: ...


class _SharedSessionHTTPClient(consul.aio.HTTPClient):  # type: ignore[misc]
    """py-consul's aiohttp adapter, but on a session dcy built (unix sockets, full TLS)."""

    def __init__(self, config: ConsulConfig, session: aiohttp.ClientSession) -> None:
        consul.base.HTTPClient.__init__(self, "localhost", config.port, "http", True, None)
        self.base_uri = config.base_url
        self._session = session


class _PyConsul(consul.aio.Consul):  # type: ignore[misc]
    def __init__(self, config: ConsulConfig, session: aiohttp.ClientSession) -> None:
        self._dcy_http = _SharedSessionHTTPClient(config, session)
        super().__init__(host=config.host, port=config.port or 1, scheme="http", verify=False)
        # py-consul prefers CONSUL_HTTP_TOKEN from the environment over its argument; dcy's
        # config already resolved the precedence (explicit argument first), so set it here.
        self.token = config.token

    def http_connect(self, *args: Any, **kwargs: Any) -> _SharedSessionHTTPClient:
        return self._dcy_http


def _raw(response: consul.base.Response) -> consul.base.Response:
    return response


class HttpConsul:
    """The real Consul, over HTTP(S) or a unix socket, through py-consul."""

    def __init__(self, config: ConsulConfig, *, max_connections: int = 0) -> None:
        """Create inside a running event loop. ``max_connections`` 0 means unbounded: every
        blocking query holds one connection for its whole wait."""
        self.config = config
        self.requests = 0
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
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=_CALL_TIMEOUT),
            # No gzip: the agent is local, and compressing every answer (Consul) and inflating
            # it (us) is time between a change and its consumers (bench/template.py).
            headers={"User-Agent": "dcy", "Accept-Encoding": "identity"},
        )
        self._client = _PyConsul(config, self._session)
        self._base_url = config.base_url
        self._read_headers = self._headers()

    # -- the pipeline: reads (_get) straight on aiohttp; writes _call → py-consul → aiohttp --
    @contextlib.contextmanager
    def _errors(self, method: str, path: str, timeout: float) -> Iterator[None]:
        """Transport failures as dcy's errors; the caller wraps it in asyncio.timeout."""
        try:
            yield
        except TimeoutError as exc:
            raise ConsulUnavailable(
                f"Consul at {self.config.address} did not answer {method} {path} within "
                f"{timeout:.0f}s",
                address=self.config.address,
            ) from exc
        except (aiohttp.ClientSSLError, aiohttp.ServerFingerprintMismatch) as exc:
            raise TlsError(
                f"TLS with Consul at {self.config.address} failed: {exc}. Check CONSUL_CACERT "
                "(the CA that signed the agent's certificate), CONSUL_TLS_SERVER_NAME and the "
                "client certificate"
            ) from exc
        except (aiohttp.ClientError, OSError, PyConsulTimeout) as exc:
            raise ConsulUnavailable(
                f"cannot reach Consul at {self.config.address}: {exc}",
                address=self.config.address,
            ) from exc

    def _headers(self) -> dict[str, str]:
        headers: dict[str, str] = self._client.prepare_headers()
        if self.config.tls_server_name:
            headers["Host"] = self.config.tls_server_name
        return headers

    async def _call(
        self,
        method: str,
        path: str,
        params: list[tuple[str, Any]] | None = None,
        *,
        data: str | bytes = "",
        timeout: float = _CALL_TIMEOUT,
    ) -> consul.base.Response:
        headers = self._headers()
        http = self._client.http
        self.requests += 1
        with self._errors(method, path, timeout):
            async with asyncio.timeout(timeout):
                if method == "GET":
                    response = await http.get(_raw, path, params=params, headers=headers)
                elif method == "PUT":
                    response = await http.put(_raw, path, params=params, data=data, headers=headers)
                else:
                    response = await http.delete(_raw, path, params=params, headers=headers)
        _raise_for_status(response, method, path)
        return response

    async def _get(
        self,
        path: str,
        params: list[tuple[str, Any]],
        *,
        index: Index,
        wait: float | None,
        hash_index: bool = False,
    ) -> QueryResult:
        """A (blocking) read. It skips py-consul: this is the path between a change in Consul
        and every watcher, run hundreds of times at once when a template starts over hundreds
        of services, and py-consul's URL quoting, text decoding and response wrapping (then
        aiohttp parsing the URL again) were most of its client-side time (bench/template.py).
        """
        timeout = _CALL_TIMEOUT
        if index and wait is not None:
            params = [*params, ("index", index), ("wait", f"{max(wait, 0.001) * 1000:.0f}ms")]
            timeout = wait * 1.0625 + _HTTP_SLACK
        url = self._base_url + urllib.parse.quote(path, safe="/:")
        if params:
            url = f"{url}?{urllib.parse.urlencode(params)}"
        self.requests += 1
        with self._errors("GET", path, timeout):
            async with asyncio.timeout(timeout):
                async with self._session.get(
                    URL(url, encoded=True), headers=self._read_headers
                ) as response:
                    body = await response.read()
                    status = response.status
                    headers = response.headers
        if status >= 400:
            text = body.decode("utf-8", "replace")
            _raise_for_status(consul.base.Response(status, headers, text), "GET", path)
        header = "X-Consul-ContentHash" if hash_index else "X-Consul-Index"
        raw_index = headers.get(header, "")
        new_index: Index = raw_index if hash_index else _int_index(raw_index)
        if status == 404:
            return QueryResult(new_index, None)
        return QueryResult(new_index, orjson.loads(body) if body else None)

    # -- ConsulAPI ----------------------------------------------------------------------------
    async def agent_info(self) -> AgentInfo:
        response = await self._call("GET", "/v1/agent/self")
        body = json.loads(response.body)
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
        return await self._get(f"/v1/health/service/{name}", params, index=index, wait=wait)

    async def catalog_services(
        self, *, datacenter: str | None = None, index: Index = 0, wait: float | None = None
    ) -> QueryResult:
        params = [("dc", datacenter)] if datacenter else []
        return await self._get("/v1/catalog/services", params, index=index, wait=wait)

    async def catalog_nodes(
        self, *, datacenter: str | None = None, index: Index = 0, wait: float | None = None
    ) -> QueryResult:
        params = [("dc", datacenter)] if datacenter else []
        return await self._get("/v1/catalog/nodes", params, index=index, wait=wait)

    async def catalog_node(
        self,
        node: str,
        *,
        datacenter: str | None = None,
        index: Index = 0,
        wait: float | None = None,
    ) -> QueryResult:
        params = [("dc", datacenter)] if datacenter else []
        return await self._get(f"/v1/catalog/node/{node}", params, index=index, wait=wait)

    async def agent_service(
        self, service_id: str, *, index: Index = "", wait: float | None = None
    ) -> QueryResult:
        params: list[tuple[str, Any]] = []
        timeout = _CALL_TIMEOUT
        if index and wait is not None:
            params = [("hash", index), ("wait", f"{max(wait, 0.001) * 1000:.0f}ms")]
            timeout = wait * 1.0625 + _HTTP_SLACK
        response = await self._call(
            "GET", f"/v1/agent/service/{service_id}", params, timeout=timeout
        )
        new_hash = response.headers.get("X-Consul-ContentHash", "")
        if response.code == 404:
            return QueryResult("", None)
        return QueryResult(new_hash, json.loads(response.body))

    async def register_service(self, definition: Mapping[str, Any]) -> None:
        await self._call(
            "PUT",
            "/v1/agent/service/register",
            [("replace-existing-checks", "true")],
            data=json.dumps(definition),
        )

    async def deregister_service(self, service_id: str) -> None:
        try:
            await self._call("PUT", f"/v1/agent/service/deregister/{service_id}")
        except ConsulError as exc:
            if exc.status != 404:
                raise
            log.debug("%s was not registered with the agent: %s", service_id, exc)

    async def update_ttl(self, check_id: str, status: str, output: str = "") -> None:
        await self._call(
            "PUT",
            f"/v1/agent/check/update/{check_id}",
            data=json.dumps({"Status": status, "Output": output}),
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
        result = await self._get(f"/v1/kv/{key}", params, index=index, wait=wait)
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
        response = await self._call("PUT", f"/v1/kv/{key}", params, data=bytes(value))
        return (response.body or "").strip() == "true"

    async def kv_delete(self, key: str, *, recurse: bool = False, cas: int | None = None) -> bool:
        params = kv_write_params(cas=cas, recurse=recurse)
        response = await self._call("DELETE", f"/v1/kv/{key}", params)
        return (response.body or "").strip() == "true"

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
        response = await self._call("PUT", "/v1/session/create", data=json.dumps(payload))
        return str(json.loads(response.body)["ID"])

    async def session_renew(self, session_id: str) -> bool:
        try:
            await self._call("PUT", f"/v1/session/renew/{session_id}")
        except ConsulError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def session_destroy(self, session_id: str) -> None:
        await self._call("PUT", f"/v1/session/destroy/{session_id}")

    async def session_info(self, session_id: str) -> dict[str, Any] | None:
        response = await self._call("GET", f"/v1/session/info/{session_id}")
        sessions = json.loads(response.body) if response.body else None
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
        return await self._get(f"/v1/health/state/{state}", params, index=index, wait=wait)

    async def catalog_datacenters(self) -> list[str]:
        response = await self._call("GET", "/v1/catalog/datacenters")
        return [str(dc) for dc in json.loads(response.body or "[]")]

    async def coordinate_datacenters(self) -> list[dict[str, Any]]:
        response = await self._call("GET", "/v1/coordinate/datacenters")
        return list(json.loads(response.body or "[]"))

    async def aclose(self) -> None:
        await self._session.close()


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


# Consul answers these refusals of a request with 500; they are not outages to retry.
_REFUSALS_AS_500 = ("invalid session", "Invalid Session TTL", "Missing check", "critical state")


def _raise_for_status(response: consul.base.Response, method: str, path: str) -> None:
    code = response.code
    if code < 400 or (code == 404 and method == "GET"):
        return
    detail = (response.body or "").strip()[:300]
    where = f"{method} {path}"
    if code == 403 or (code == 401):
        raise AclDenied(f"Consul denied {where}: {detail or 'permission denied'}", status=code)
    if code == 500 and any(phrase in detail for phrase in _REFUSALS_AS_500):
        raise ConsulError(f"Consul refused {where}: {detail}", status=code)
    if code in (429, 500, 502, 503, 504):
        # Rate limiting, leader elections and "no path to datacenter" are outages that
        # pass; a watch retries them with backoff like a refused connection.
        raise ConsulUnavailable(f"Consul could not serve {where}: {code} {detail}")
    raise ConsulError(f"Consul refused {where}: {code} {detail}", status=code)
