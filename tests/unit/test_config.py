"""ConsulConfig.from_env: address, token and TLS settings read like Consul's own CLI reads them."""

from __future__ import annotations

from pathlib import Path

import pytest

from dcy import ConsulConfig


def _from(environ: dict[str, str], **kwargs: object) -> ConsulConfig:
    return ConsulConfig.from_env(environ=environ, **kwargs)  # type: ignore[arg-type]


# -- CONSUL_HTTP_ADDR --------------------------------------------------------------------------


def test_defaults_without_environment() -> None:
    """With nothing set, dcy talks plain HTTP to 127.0.0.1 port 8500, verifying TLS if ever used."""
    config = _from({})
    assert (config.scheme, config.host, config.port) == ("http", "127.0.0.1", 8500)
    assert config.socket_path is None and config.token is None
    assert config.verify is True
    assert config.base_url == "http://127.0.0.1:" + str(8500)
    assert config.ssl_context() is None


@pytest.mark.parametrize(
    ("addr", "scheme", "host", "port"),
    [
        ("consul.local:18600", "http", "consul.local", 18600),
        ("10.1.2.3:18500", "http", "10.1.2.3", 18500),
        ("http://consul.local:18501", "http", "consul.local", 18501),
        ("http://consul.local:18502/", "http", "consul.local", 18502),
        ("https://consul.local:9501", "https", "consul.local", 9501),
        ("[::1]:18503", "http", "::1", 18503),
        ("https://[::1]:8501", "https", "::1", 8501),
        ("consul.local", "http", "consul.local", 8500),
        ("http://consul.local", "http", "consul.local", 8500),
        ("https://consul.local", "https", "consul.local", 8501),
        ("  consul.local:1234 ", "http", "consul.local", 1234),
    ],
)
def test_http_addr_forms(addr: str, scheme: str, host: str, port: int) -> None:
    """host:port, http://, https:// and bracketed IPv6 parse; a missing port gets a default."""
    config = _from({"CONSUL_HTTP_ADDR": addr})
    assert (config.scheme, config.host, config.port, config.socket_path) == (
        scheme,
        host,
        port,
        None,
    )


def test_ipv6_host_is_bracketed_in_urls() -> None:
    """An IPv6 host is written in brackets in the base URL and the address."""
    config = _from({"CONSUL_HTTP_ADDR": "[::1]:18500"})
    assert config.base_url == "http://[::1]:18500"


def test_unix_socket_address() -> None:
    """unix:///path selects the socket; the URL host is only a placeholder."""
    config = _from({"CONSUL_HTTP_ADDR": "unix:///run/consul/http.sock"})
    assert config.scheme == "unix"
    assert config.socket_path == "/run/consul/http.sock"
    assert config.address == "unix:///run/consul/http.sock"
    assert config.base_url == "http://localhost"
    assert config.ssl_context() is None


@pytest.mark.parametrize(
    ("addr", "scheme", "port"),
    [("consul.local:8501", "https", 8501), ("consul.local", "https", 8501)],
)
def test_consul_http_ssl_selects_https(addr: str, scheme: str, port: int) -> None:
    """CONSUL_HTTP_SSL=true turns a scheme-less address into https."""
    config = _from({"CONSUL_HTTP_ADDR": addr, "CONSUL_HTTP_SSL": "true"})
    assert (config.scheme, config.port) == (scheme, port)


def test_consul_http_ssl_is_never_downgraded_by_an_http_address() -> None:
    """As in Consul's Go API, an explicit http:// does not undo CONSUL_HTTP_SSL=true."""
    config = _from({"CONSUL_HTTP_ADDR": "http://consul.local:8501", "CONSUL_HTTP_SSL": "1"})
    assert config.scheme == "https"


def test_consul_http_ssl_false_keeps_http() -> None:
    """CONSUL_HTTP_SSL=false (or empty) leaves a scheme-less address on http."""
    assert _from({"CONSUL_HTTP_ADDR": "h:1", "CONSUL_HTTP_SSL": "false"}).scheme == "http"
    assert _from({"CONSUL_HTTP_ADDR": "h:1", "CONSUL_HTTP_SSL": ""}).scheme == "http"


@pytest.mark.parametrize(
    ("addr", "fragment"),
    [
        ("ftp://consul.local:21", "unknown scheme"),
        ("consul.local:99999", "invalid port"),
        ("consul.local:http", "invalid port"),
        ("consul.local:-1", "invalid port"),
        ("unix://", "no socket path"),
        ("http://:18500", "not of the form"),
        ("http://consul.local:18500/v1/agent", "not of the form"),
    ],
)
def test_bad_addresses_raise_value_error_quoting_the_input(addr: str, fragment: str) -> None:
    """An unusable CONSUL_HTTP_ADDR raises ValueError naming the problem and quoting it."""
    with pytest.raises(ValueError, match=fragment) as caught:
        _from({"CONSUL_HTTP_ADDR": addr})
    assert repr(addr) in str(caught.value)


def test_blank_address_argument_raises() -> None:
    """A blank address is refused rather than silently meaning the default."""
    with pytest.raises(ValueError, match="empty"):
        _from({"CONSUL_HTTP_ADDR": "   "})


# -- tokens ------------------------------------------------------------------------------------


def _token_file(tmp_path: Path, name: str, token: str) -> str:
    path = tmp_path / name
    path.write_text(token + "\n")
    return str(path)


def test_token_from_environment() -> None:
    """CONSUL_HTTP_TOKEN alone sets the token."""
    assert _from({"CONSUL_HTTP_TOKEN": "env-token"}).token == "env-token"


def test_token_file_beats_env_token(tmp_path: Path) -> None:
    """CONSUL_HTTP_TOKEN_FILE wins over CONSUL_HTTP_TOKEN, as in Consul's Go API."""
    env = {
        "CONSUL_HTTP_TOKEN": "env-token",
        "CONSUL_HTTP_TOKEN_FILE": _token_file(tmp_path, "t", "file-token"),
    }
    assert _from(env).token == "file-token"


def test_token_argument_beats_token_file(tmp_path: Path) -> None:
    """An explicit token argument wins over any token file and the environment."""
    env = {
        "CONSUL_HTTP_TOKEN": "env-token",
        "CONSUL_HTTP_TOKEN_FILE": _token_file(tmp_path, "t", "file-token"),
    }
    assert _from(env, token="arg-token").token == "arg-token"
    assert _from(env, token="arg-token", token_file=env["CONSUL_HTTP_TOKEN_FILE"]).token == (
        "arg-token"
    )


def test_token_file_argument_beats_env_token_file(tmp_path: Path) -> None:
    """An explicit token_file argument wins over CONSUL_HTTP_TOKEN_FILE and CONSUL_HTTP_TOKEN."""
    env = {
        "CONSUL_HTTP_TOKEN": "env-token",
        "CONSUL_HTTP_TOKEN_FILE": _token_file(tmp_path, "env", "env-file-token"),
    }
    arg_file = _token_file(tmp_path, "arg", "arg-file-token")
    assert _from(env, token_file=arg_file).token == "arg-file-token"


def test_token_file_is_stripped(tmp_path: Path) -> None:
    """Whitespace and the trailing newline around a token in a file are ignored."""
    path = tmp_path / "t"
    path.write_text("  secret-id \n\n")
    assert _from({"CONSUL_HTTP_TOKEN_FILE": str(path)}).token == "secret-id"


def test_unreadable_token_file_raises_quoting_the_path(tmp_path: Path) -> None:
    """A token file that cannot be read is a ValueError that names the file."""
    missing = str(tmp_path / "no-such-token")
    with pytest.raises(ValueError, match="token file") as caught:
        _from({"CONSUL_HTTP_TOKEN_FILE": missing})
    assert repr(missing) in str(caught.value)
    with pytest.raises(ValueError, match="token file"):
        _from({}, token_file=str(tmp_path))  # a directory


def test_empty_env_token_means_no_token() -> None:
    """An empty CONSUL_HTTP_TOKEN is no token at all."""
    assert _from({"CONSUL_HTTP_TOKEN": ""}).token is None


# -- TLS ---------------------------------------------------------------------------------------


def test_tls_settings_from_environment() -> None:
    """CONSUL_CACERT, CONSUL_CAPATH, CLIENT_CERT/KEY and TLS_SERVER_NAME are read."""
    config = _from(
        {
            "CONSUL_HTTP_ADDR": "https://consul.local:8501",
            "CONSUL_CACERT": "/etc/consul/ca.pem",
            "CONSUL_CAPATH": "/etc/consul/cas",
            "CONSUL_CLIENT_CERT": "/etc/consul/client.pem",
            "CONSUL_CLIENT_KEY": "/etc/consul/client-key.pem",
            "CONSUL_TLS_SERVER_NAME": "server.dc1.sd",
        }
    )
    assert config.ca_file == "/etc/consul/ca.pem"
    assert config.ca_path == "/etc/consul/cas"
    assert config.client_cert == "/etc/consul/client.pem"
    assert config.client_key == "/etc/consul/client-key.pem"
    assert config.tls_server_name == "server.dc1.sd"


@pytest.mark.parametrize(
    ("raw", "verify"),
    [
        ("false", False),
        ("FALSE", False),
        ("0", False),
        ("f", False),
        ("no", False),
        ("true", True),
        ("True", True),
        ("1", True),
        ("t", True),
        ("", True),
    ],
)
def test_ssl_verify_parsing(raw: str, verify: bool) -> None:
    """CONSUL_HTTP_SSL_VERIFY takes Go-style booleans; empty means the default (verify)."""
    assert _from({"CONSUL_HTTP_SSL_VERIFY": raw}).verify is verify


def test_no_verify_yields_a_permissive_context() -> None:
    """With verification off, the https context checks neither host name nor chain."""
    config = _from({"CONSUL_HTTP_ADDR": "https://h:8501", "CONSUL_HTTP_SSL_VERIFY": "false"})
    context = config.ssl_context()
    assert context is not None
    assert context.check_hostname is False
    assert context.verify_mode.name == "CERT_NONE"


@pytest.mark.parametrize("name", ["CONSUL_HTTP_SSL", "CONSUL_HTTP_SSL_VERIFY"])
def test_non_boolean_values_raise_quoting_the_input(name: str) -> None:
    """A boolean variable with another value is a ValueError naming variable and value."""
    with pytest.raises(ValueError) as caught:
        _from({name: "maybe"})
    assert name in str(caught.value)
    assert "'maybe'" in str(caught.value)


# -- explicit arguments ----------------------------------------------------------------------


def test_explicit_arguments_win_over_the_environment() -> None:
    """Every explicit argument beats its environment variable."""
    env = {
        "CONSUL_HTTP_ADDR": "env-host:1111",
        "CONSUL_HTTP_TOKEN": "env-token",
        "CONSUL_CACERT": "/env/ca.pem",
        "CONSUL_CAPATH": "/env/cas",
        "CONSUL_CLIENT_CERT": "/env/cert.pem",
        "CONSUL_CLIENT_KEY": "/env/key.pem",
        "CONSUL_TLS_SERVER_NAME": "env.sd",
        "CONSUL_HTTP_SSL_VERIFY": "false",
    }
    config = _from(
        env,
        address="https://arg-host:2222",
        token="arg-token",
        ca_file="/arg/ca.pem",
        ca_path="/arg/cas",
        client_cert="/arg/cert.pem",
        client_key="/arg/key.pem",
        tls_server_name="arg.sd",
        verify=True,
    )
    assert (config.scheme, config.host, config.port) == ("https", "arg-host", 2222)
    assert config.token == "arg-token"
    assert (config.ca_file, config.ca_path) == ("/arg/ca.pem", "/arg/cas")
    assert (config.client_cert, config.client_key) == ("/arg/cert.pem", "/arg/key.pem")
    assert config.tls_server_name == "arg.sd"
    assert config.verify is True


def test_explicit_verify_false_wins_over_environment() -> None:
    """verify=False disables verification even when the environment asks for it."""
    assert _from({"CONSUL_HTTP_SSL_VERIFY": "true"}, verify=False).verify is False


def test_environ_argument_isolates_from_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """With an explicit environ mapping, os.environ is not consulted at all."""
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "from-os:1")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "os-token")
    config = _from({})
    assert (config.host, config.port, config.token) == ("127.0.0.1", 8500, None)
    assert ConsulConfig.from_env().host == "from-os"
