"""Mutual TLS: one agent serving HTTPS only with ``verify_incoming = true``. Every component
works with a client certificate (CONSUL_CACERT, CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY or the
matching flags), and fails at once, non-zero, naming TLS, without one or with a wrong CA."""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from dcy import Dcy, TlsError, WatchOptions
from tests import programs
from tests.harness import ConsulAgent, HealthServer, TlsFiles, eventually

pytestmark = pytest.mark.integration

FAST = WatchOptions(wait=2.0, first_answer_timeout=5.0)
# A TLS refusal is not transient: a run that fails on it ends long before this.
FAIL_FAST = 15.0


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return TlsFiles.create(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, tls: TlsFiles) -> Iterator[ConsulAgent]:
    consul = ConsulAgent(
        tmp_path_factory.mktemp("consul-mtls"), hcl=[tls.agent_hcl()], tls_client=tls
    ).start()
    try:
        yield consul
    finally:
        consul.stop()


@pytest.fixture
def other_ca(tmp_path: Path) -> TlsFiles:
    """A second CA with its own client certificate: not the one the agent trusts."""
    return TlsFiles.create(tmp_path / "other")


@pytest.fixture
async def health_server() -> AsyncIterator[HealthServer]:
    server = await HealthServer().start()
    yield server
    await server.stop()


def _env(agent: ConsulAgent, tls: TlsFiles | None, **extra: str) -> dict[str, str]:
    files = {}
    if tls is not None:
        files = {
            "CONSUL_CACERT": str(tls.ca),
            "CONSUL_CLIENT_CERT": str(tls.client_cert),
            "CONSUL_CLIENT_KEY": str(tls.client_key),
        }
    return programs.consul_env(CONSUL_HTTP_ADDR=agent.https_url, **files, **extra)


def _flags(tls: TlsFiles) -> list[str]:
    return [
        "-ca-file", str(tls.ca),
        "-client-cert", str(tls.client_cert),
        "-client-key", str(tls.client_key),
    ]  # fmt: skip


def _fails_naming_tls(argv: list[str], env: dict[str, str]) -> str:
    """Run a program that must give up on TLS: non-zero, fast, saying why."""
    stderr = programs.fails_fast(argv, env, FAIL_FAST, "TLS")
    assert "certificate" in stderr.lower(), stderr
    return stderr


# -- the library ---------------------------------------------------------------------------
async def test_library_with_client_certificate_registers_and_resolves(
    agent: ConsulAgent, tls: TlsFiles, health_server: HealthServer, unique_name: str
) -> None:
    """With CA, client certificate and key as arguments, dcy registers and resolves."""
    async with Dcy(
        agent.https_url,
        ca_file=str(tls.ca),
        client_cert=str(tls.client_cert),
        client_key=str(tls.client_key),
        watch_options=FAST,
    ) as dcy:
        await dcy.register(unique_name, health_server.port)
        instance = await eventually(lambda: dcy.instances(unique_name), what="passing instance")
        assert instance[0].port == health_server.port


async def test_library_reads_client_certificate_from_environment(
    agent: ConsulAgent, tls: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CONSUL_CACERT, CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY are enough."""
    for name, value in _env(agent, tls).items():
        if name.startswith("CONSUL_"):
            monkeypatch.setenv(name, value)
    async with Dcy(watch_options=FAST) as dcy:
        assert dcy.agent is not None and dcy.agent.datacenter == "dc1"


@pytest.mark.parametrize("missing", ["client certificate", "the agent's CA"])
async def test_library_without_client_certificate_or_with_wrong_ca_raises_tls_error(
    agent: ConsulAgent, tls: TlsFiles, other_ca: TlsFiles, missing: str
) -> None:
    """No client certificate, or trusting another CA: TlsError at once, however long the
    client would wait for an agent."""
    kwargs: dict[str, Any] = (
        {"ca_file": str(tls.ca)}
        if missing == "client certificate"
        else {
            "ca_file": str(other_ca.ca),
            "client_cert": str(tls.client_cert),
            "client_key": str(tls.client_key),
        }
    )
    started = time.monotonic()
    with pytest.raises(TlsError, match="TLS with Consul"):
        async with Dcy(agent.https_url, wait_for_agent=60, **kwargs):
            pass
    assert time.monotonic() - started < 5


async def test_client_certificate_of_another_ca_is_refused(
    agent: ConsulAgent, tls: TlsFiles, other_ca: TlsFiles
) -> None:
    """The agent refuses a certificate its CA did not sign (verify_incoming)."""
    with pytest.raises(TlsError):
        async with Dcy(
            agent.https_url,
            ca_file=str(tls.ca),
            client_cert=str(other_ca.client_cert),
            client_key=str(other_ca.client_key),
            wait_for_agent=60,
        ):
            pass


async def test_tls_server_name_is_what_the_certificate_must_name(
    agent: ConsulAgent, tls: TlsFiles
) -> None:
    """CONSUL_TLS_SERVER_NAME replaces the dialled host in the certificate check: the agent's
    name works, a name its certificate lacks is a TlsError."""
    files: dict[str, Any] = {
        "ca_file": str(tls.ca),
        "client_cert": str(tls.client_cert),
        "client_key": str(tls.client_key),
    }
    async with Dcy(agent.https_url, tls_server_name="server.dc1.sd", **files) as dcy:
        assert dcy.agent is not None
    with pytest.raises(TlsError):
        async with Dcy(agent.https_url, tls_server_name="server.elsewhere.sd", **files):
            pass


async def test_ssl_verify_false_skips_the_agent_check_but_still_needs_a_client_cert(
    agent: ConsulAgent, tls: TlsFiles, other_ca: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CONSUL_HTTP_SSL_VERIFY=false trusts any agent certificate (another CA is no
    obstacle); the agent still wants a client certificate."""
    monkeypatch.setenv("CONSUL_HTTP_SSL_VERIFY", "false")
    certs: dict[str, Any] = {"client_cert": str(tls.client_cert), "client_key": str(tls.client_key)}
    async with Dcy(agent.https_url, ca_file=str(other_ca.ca), **certs) as dcy:
        assert dcy.config.verify is False and dcy.agent is not None
    with pytest.raises(TlsError):
        async with Dcy(agent.https_url, wait_for_agent=60):
            pass


# -- the programs --------------------------------------------------------------------------
def test_dcy_template_renders_over_mtls_and_fails_without_certificate(
    agent: ConsulAgent, tls: TlsFiles, tmp_path: Path
) -> None:
    """dcy-template -once renders with the CONSUL_* files and with the -consul-ssl-* flags;
    without the client certificate it exits 1 at once, naming TLS, writing nothing."""
    source = tmp_path / "in.j2"
    source.write_text('{% for s in service("consul") %}{{ s.Port }}{% endfor %}\n')
    out = tmp_path / "out.txt"
    argv = [programs.program("dcy-template"), "-once", "-template", f"{source}:{out}"]
    done = subprocess.run(argv, env=_env(agent, tls), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert out.read_text().strip().isdigit()
    out.unlink()
    flags = [
        "-consul-addr", agent.https_url, "-consul-ssl",
        "-consul-ssl-ca-cert", str(tls.ca),
        "-consul-ssl-cert", str(tls.client_cert),
        "-consul-ssl-key", str(tls.client_key),
    ]  # fmt: skip
    done = subprocess.run(
        [*argv, *flags], env=_env(agent, None), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert out.exists()
    out.unlink()
    env = _env(agent, None, CONSUL_CACERT=str(tls.ca))
    _fails_naming_tls(argv, env)
    assert not out.exists()


def test_dcy_register_over_mtls_and_fails_without_certificate(
    agent: ConsulAgent, tls: TlsFiles, unique_name: str
) -> None:
    """dcy-register with the Consul CLI's TLS flags registers its program; without the client
    certificate it stops the program and exits non-zero at once."""
    argv = [
        programs.program("dcy-register"),
        "--name",
        unique_name,
        "--port",
        "1",
        "--check",
        "ttl",
    ]
    proc = programs.start([*argv, *_flags(tls), "--", "sleep", "60"], _env(agent, None))
    try:
        programs.wait_for(
            lambda: programs.passing(agent, unique_name), proc, "dcy-register registered"
        )
    finally:
        stderr = programs.stop(proc)
    assert not agent.api(f"/v1/health/checks/{unique_name}"), stderr
    _fails_naming_tls([*argv, "-ca-file", str(tls.ca), "--", "sleep", "60"], _env(agent, None))


def test_dcy_alert_over_mtls_and_fails_without_certificate(
    agent: ConsulAgent, tls: TlsFiles, other_ca: TlsFiles
) -> None:
    """dcy-alert watches with the client certificate; with a wrong CA it exits 1 at once."""
    proc = programs.start([programs.program("dcy-alert"), *_flags(tls)], _env(agent, None))
    try:
        programs.wait_for_stderr(proc, "watching every check")
    finally:
        programs.stop(proc)
    assert proc.returncode == 0
    _fails_naming_tls(
        [programs.program("dcy-alert"), "-ca-file", str(other_ca.ca), "-client-cert",
         str(tls.client_cert), "-client-key", str(tls.client_key)],
        _env(agent, None),
    )  # fmt: skip


@pytest.mark.parametrize("service", ["sensor", "worker", "app"])
def test_services_register_over_mtls_and_exit_without_certificate(
    agent: ConsulAgent, tls: TlsFiles, service: str
) -> None:
    """A service registers and passes its check with the CONSUL_* TLS files; without the
    client certificate it exits 1 at once, naming TLS."""
    path = programs.program(f"dcy-{service}")
    proc = programs.start([path, "--check-interval", "0.5"], _env(agent, tls))
    try:
        programs.wait_for(lambda: programs.passing(agent, service), proc, f"{service} passing")
    finally:
        stderr = programs.stop(proc)
    assert proc.returncode == 0, stderr
    _fails_naming_tls([path], _env(agent, None, CONSUL_CACERT=str(tls.ca)))
