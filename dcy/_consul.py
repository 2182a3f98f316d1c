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
import json
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import consul.aio
import consul.base
from consul.exceptions import Timeout as PyConsulTimeout

from dcy._config import ConsulConfig
from dcy._errors import AclDenied, ConsulError, ConsulUnavailable, TlsError

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

    async def agent_service(
        self, service_id: str, *, index: Index = "", wait: float | None = None
    ) -> QueryResult:
        """``GET /v1/agent/service/<id>`` (hash-blocking); body None when not registered."""
        ...

    async def register_service(self, definition: Mapping[str, Any]) -> None: ...

    async def deregister_service(self, service_id: str) -> None: ...

    async def update_ttl(self, check_id: str, status: str, output: str = "") -> None: ...

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
            headers={"User-Agent": "dcy"},
        )
        self._client = _PyConsul(config, self._session)

    # -- the pipeline: _get/_put → _call → py-consul → aiohttp ------------------------------
    async def _call(
        self,
        method: str,
        path: str,
        params: list[tuple[str, Any]] | None = None,
        *,
        data: str = "",
        timeout: float = _CALL_TIMEOUT,
    ) -> consul.base.Response:
        headers = self._client.prepare_headers()
        if self.config.tls_server_name:
            headers["Host"] = self.config.tls_server_name
        http = self._client.http
        self.requests += 1
        try:
            async with asyncio.timeout(timeout):
                if method == "GET":
                    response = await http.get(_raw, path, params=params, headers=headers)
                elif method == "PUT":
                    response = await http.put(_raw, path, params=params, data=data, headers=headers)
                else:
                    response = await http.delete(_raw, path, params=params, headers=headers)
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
        timeout = _CALL_TIMEOUT
        if index and wait is not None:
            params = [*params, ("index", index), ("wait", f"{max(wait, 0.001) * 1000:.0f}ms")]
            timeout = wait * 1.0625 + _HTTP_SLACK
        response = await self._call("GET", path, params, timeout=timeout)
        header = "X-Consul-ContentHash" if hash_index else "X-Consul-Index"
        raw_index = response.headers.get(header, "")
        new_index: Index = raw_index if hash_index else _int_index(raw_index)
        if response.code == 404:
            return QueryResult(new_index, None)
        return QueryResult(new_index, json.loads(response.body) if response.body else None)

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
        await self._call("PUT", f"/v1/agent/service/deregister/{service_id}")

    async def update_ttl(self, check_id: str, status: str, output: str = "") -> None:
        await self._call(
            "PUT",
            f"/v1/agent/check/update/{check_id}",
            data=json.dumps({"Status": status, "Output": output}),
        )

    async def aclose(self) -> None:
        await self._session.close()


def _int_index(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        return 0


def _raise_for_status(response: consul.base.Response, method: str, path: str) -> None:
    code = response.code
    if code < 400 or (code == 404 and method == "GET"):
        return
    detail = (response.body or "").strip()[:300]
    where = f"{method} {path}"
    if code == 403 or (code == 401):
        raise AclDenied(f"Consul denied {where}: {detail or 'permission denied'}", status=code)
    if code in (429, 500, 502, 503, 504):
        # Rate limiting, leader elections and "no path to datacenter" are outages that
        # pass; a watch retries them with backoff like a refused connection.
        raise ConsulUnavailable(f"Consul could not serve {where}: {code} {detail}")
    raise ConsulError(f"Consul refused {where}: {code} {detail}", status=code)
