"""Where the Consul agent is and how to talk to it, read the way Consul's own CLI reads it.

Explicit arguments win over the environment; the environment wins over defaults. Variables:
``CONSUL_HTTP_ADDR`` (``host:port``, ``http://``, ``https://`` or ``unix:///path``),
``CONSUL_HTTP_SSL``, ``CONSUL_HTTP_TOKEN``, ``CONSUL_HTTP_TOKEN_FILE`` (as in Consul's Go API,
a token file beats a token from the environment), ``CONSUL_CACERT``, ``CONSUL_CAPATH``,
``CONSUL_CLIENT_CERT``, ``CONSUL_CLIENT_KEY``, ``CONSUL_TLS_SERVER_NAME`` and
``CONSUL_HTTP_SSL_VERIFY``.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

Scheme = Literal["http", "https", "unix"]

DEFAULT_ADDRESS = "127.0.0.1:8500"


@dataclass(frozen=True, slots=True)
class ConsulConfig:
    """A resolved connection configuration; build it with :meth:`from_env`."""

    scheme: Scheme = "http"
    host: str = "127.0.0.1"
    port: int = 8500
    socket_path: str | None = None
    token: str | None = None
    ca_file: str | None = None
    ca_path: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    tls_server_name: str | None = None
    verify: bool = True

    @property
    def address(self) -> str:
        """The address as a person would write it in CONSUL_HTTP_ADDR."""
        if self.scheme == "unix":
            return f"unix://{self.socket_path}"
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        # Over a unix socket the host part of the URL is only a placeholder.
        if self.scheme == "unix":
            return "http://localhost"
        return f"{self.scheme}://{_bracket(self.host)}:{self.port}"

    @classmethod
    def from_env(
        cls,
        address: str | None = None,
        *,
        token: str | None = None,
        token_file: str | None = None,
        ca_file: str | None = None,
        ca_path: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        tls_server_name: str | None = None,
        verify: bool | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> ConsulConfig:
        env = os.environ if environ is None else environ
        raw_address = address or env.get("CONSUL_HTTP_ADDR") or DEFAULT_ADDRESS
        force_https = _env_bool(env, "CONSUL_HTTP_SSL", default=False)
        scheme, host, port, socket_path = parse_address(raw_address, force_https=force_https)
        resolved_token = token
        if resolved_token is None:
            resolved_token = _read_token_file(token_file or env.get("CONSUL_HTTP_TOKEN_FILE"))
        if resolved_token is None:
            resolved_token = env.get("CONSUL_HTTP_TOKEN") or None
        if verify is None:
            verify = _env_bool(env, "CONSUL_HTTP_SSL_VERIFY", default=True)
        return cls(
            scheme=scheme,
            host=host,
            port=port,
            socket_path=socket_path,
            token=resolved_token,
            ca_file=ca_file or env.get("CONSUL_CACERT") or None,
            ca_path=ca_path or env.get("CONSUL_CAPATH") or None,
            client_cert=client_cert or env.get("CONSUL_CLIENT_CERT") or None,
            client_key=client_key or env.get("CONSUL_CLIENT_KEY") or None,
            tls_server_name=tls_server_name or env.get("CONSUL_TLS_SERVER_NAME") or None,
            verify=verify,
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for https (None for plain http and unix sockets)."""
        if self.scheme != "https":
            return None
        context = ssl.create_default_context(cafile=self.ca_file, capath=self.ca_path)
        if self.client_cert:
            context.load_cert_chain(self.client_cert, self.client_key)
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def parse_address(text: str, *, force_https: bool = False) -> tuple[Scheme, str, int, str | None]:
    """Split a CONSUL_HTTP_ADDR value into (scheme, host, port, unix socket path)."""
    value = text.strip()
    if not value:
        raise ValueError("Consul address is empty")
    if value.startswith("unix://"):
        path = value[len("unix://") :]
        if not path:
            raise ValueError(f"Consul address {text!r} names no socket path")
        return "unix", "localhost", 0, path
    if "://" not in value:
        value = ("https://" if force_https else "http://") + value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError(
            f"Consul address {text!r} has unknown scheme {parts.scheme!r}: "
            "use http://, https:// or unix://"
        )
    scheme: Scheme = "https" if force_https or parts.scheme == "https" else "http"
    if not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"Consul address {text!r} is not of the form [scheme://]host[:port]")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"Consul address {text!r} has an invalid port") from exc
    if port is None:
        port = 8501 if scheme == "https" else 8500
    return scheme, parts.hostname, port, None


def _read_token_file(path: str | None) -> str | None:
    if not path:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read Consul token file {path!r}: {exc.strerror}") from exc
    return token or None


def _env_bool(env: Mapping[str, str], name: str, *, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in ("1", "t", "true", "yes"):
        return True
    if lowered in ("0", "f", "false", "no"):
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean (use true or false)")


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
