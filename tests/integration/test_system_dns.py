"""`*.service.sd` for every program: `inv dns` (dnsmasq in front of the host's resolver).

Two layers. The setup logic (tasks/_dns_setup.py) runs on files in a temporary folder with a
real dnsmasq on a free port. The whole path — glibc, /etc/resolv.conf, dnsmasq on port 53,
Consul's DNS, a redis registered by dcy-register — runs inside a private network and mount
namespace (tests/sandbox.py), so the machine's own resolver is never touched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from tasks._dns_setup import (
    MARKER,
    DnsPaths,
    DnsSetupError,
    ForwarderSettings,
    render_resolv_conf,
    setup,
    undo,
)
from tests.harness import ConsulAgent, ManagedProcess, free_ports, until
from tests.sandbox import CONSUL_DNS_PORT, CONSUL_HTTP_PORT, VENV_BIN, Sandbox

pytestmark = pytest.mark.integration

HOST_RESOLV = Path("/etc/resolv.conf")


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


# -- the setup logic on plain files ------------------------------------------------------------
@pytest.fixture
def paths(tmp_path: Path) -> Iterator[DnsPaths]:
    """A resolver file and state folder in tmp; any dnsmasq started on them is stopped."""
    resolved = DnsPaths(tmp_path / "etc" / "resolv.conf", tmp_path / "state")
    resolved.resolv_conf.parent.mkdir()
    try:
        yield resolved
    finally:
        try:
            pid = int(resolved.pid_file.read_text())
        except (OSError, ValueError):
            pid = 0
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGTERM)


def settings_on_free_port(consul_dns: str = "127.0.0.1#53", **kwargs: Any) -> ForwarderSettings:
    return ForwarderSettings(consul_dns=consul_dns, port=free_ports(1)[0], **kwargs)


ORIGINAL = (
    "# written by hand\n"
    "search corp.example\n"
    "nameserver 192.0.2.1\n"
    "nameserver 192.0.2.2\n"
    "nameserver 192.0.2.3\n"
    "options rotate timeout:2\n"
)


def test_setup_then_undo_restores_a_plain_file_byte_for_byte(paths: DnsPaths) -> None:
    """Setup points the file at dnsmasq; undo gives back the same bytes and mode, and stops
    the dnsmasq it started."""
    paths.resolv_conf.write_text(ORIGINAL)
    paths.resolv_conf.chmod(0o640)
    setup(paths, settings_on_free_port())
    text = paths.resolv_conf.read_text()
    assert MARKER in text
    servers = [line.split()[1] for line in text.splitlines() if line.startswith("nameserver")]
    assert servers == ["127.0.0.1", "192.0.2.1", "192.0.2.2"]  # glibc reads only three
    pid = int(paths.pid_file.read_text())
    assert pid_alive(pid)
    undo(paths)
    assert paths.resolv_conf.read_text() == ORIGINAL
    assert paths.resolv_conf.stat().st_mode & 0o777 == 0o640
    until(lambda: not pid_alive(pid), what="dnsmasq stopped")
    assert not paths.state_dir.exists()


def test_undo_turns_the_file_back_into_the_symlink_it_was(paths: DnsPaths) -> None:
    """A symlinked resolv.conf (systemd-resolved's stub, say) is replaced by a file and
    restored as the same symlink; its target is never written."""
    stub = paths.resolv_conf.parent / "stub-resolv.conf"
    stub.write_text("nameserver 192.0.2.53\n")
    paths.resolv_conf.symlink_to("stub-resolv.conf")
    setup(paths, settings_on_free_port())
    assert not paths.resolv_conf.is_symlink()
    assert "server=192.0.2.53" in paths.dnsmasq_conf.read_text()
    undo(paths)
    assert os.readlink(paths.resolv_conf) == "stub-resolv.conf"
    assert stub.read_text() == "nameserver 192.0.2.53\n"


def test_undo_removes_a_resolver_file_that_did_not_exist(paths: DnsPaths) -> None:
    """Without a resolv.conf before, undo leaves none behind."""
    setup(paths, settings_on_free_port())
    assert paths.resolv_conf.exists()
    undo(paths)
    assert not paths.resolv_conf.exists()


def test_a_second_setup_keeps_backup_file_and_forwarder(paths: DnsPaths) -> None:
    """Running setup again with the same settings changes nothing: same backup, same file,
    same dnsmasq process."""
    paths.resolv_conf.write_text(ORIGINAL)
    settings = settings_on_free_port()
    setup(paths, settings)
    first = (paths.resolv_conf.read_bytes(), paths.backup.read_bytes(), paths.pid_file.read_text())
    actions = setup(paths, settings)
    again = (paths.resolv_conf.read_bytes(), paths.backup.read_bytes(), paths.pid_file.read_text())
    assert again == first
    assert any("already running" in a for a in actions)
    undo(paths)
    assert paths.resolv_conf.read_text() == ORIGINAL


def test_changed_settings_restart_the_forwarder_but_keep_the_first_backup(
    paths: DnsPaths,
) -> None:
    """A new cache size rewrites dnsmasq's config and restarts it; the backup stays the
    file from before the first setup."""
    paths.resolv_conf.write_text(ORIGINAL)
    settings = settings_on_free_port()
    setup(paths, settings)
    old_pid = int(paths.pid_file.read_text())
    setup(
        paths, ForwarderSettings(consul_dns=settings.consul_dns, port=settings.port, cache_size=0)
    )
    assert "cache-size=0" in paths.dnsmasq_conf.read_text()
    assert int(paths.pid_file.read_text()) != old_pid
    assert paths.backup.read_text() == ORIGINAL


def test_undo_refuses_when_something_else_rewrote_the_file(paths: DnsPaths) -> None:
    """A resolv.conf rewritten since (DHCP, an admin) is not overwritten by undo."""
    paths.resolv_conf.write_text(ORIGINAL)
    setup(paths, settings_on_free_port())
    paths.resolv_conf.write_text("nameserver 198.51.100.1\n")
    with pytest.raises(DnsSetupError, match="changed by something else"):
        undo(paths)
    assert paths.resolv_conf.read_text() == "nameserver 198.51.100.1\n"


def test_setup_refuses_to_listen_where_the_resolver_already_is(paths: DnsPaths) -> None:
    """A resolver already on 127.0.0.1:53 is reported, before anything is changed."""
    paths.resolv_conf.write_text("nameserver 127.0.0.1\n")
    with pytest.raises(DnsSetupError, match="another --listen"):
        setup(paths, ForwarderSettings())
    assert not paths.state_dir.exists()


def test_resolver_file_keeps_search_and_options_but_not_rotate() -> None:
    """search and options survive; rotate goes, or half the sd lookups would hit a fallback."""
    text = render_resolv_conf(ORIGINAL, ForwarderSettings(), ["192.0.2.1", "192.0.2.2"])
    assert "search corp.example" in text.splitlines()
    assert "options timeout:2" in text.splitlines()
    assert "rotate" not in text


def test_forwarder_answers_sd_names_from_consul(paths: DnsPaths, consul: ConsulAgent) -> None:
    """dnsmasq, as set up, answers an sd name with what Consul's DNS says."""
    request = urllib_put(
        f"{consul.url}/v1/agent/service/register",
        b'{"Name": "fwd-probe", "ID": "fwd-probe", "Address": "127.0.0.9", "Port": 1}',
    )
    assert request == 200
    settings = settings_on_free_port(consul_dns=f"127.0.0.1#{consul.dns_port}")
    setup(paths, settings)
    query = dns.message.make_query("fwd-probe.service.sd", dns.rdatatype.A)
    answer = dns.query.udp(query, "127.0.0.1", port=settings.port, timeout=5)
    assert [r.address for rrset in answer.answer for r in rrset] == ["127.0.0.9"]
    missing = dns.query.udp(
        dns.message.make_query("no-such.service.sd", dns.rdatatype.A),
        "127.0.0.1",
        port=settings.port,
        timeout=5,
    )
    assert missing.rcode() == dns.rcode.NXDOMAIN


def urllib_put(url: str, body: bytes) -> int:
    request = urllib.request.Request(url, data=body, method="PUT")
    with urllib.request.urlopen(request, timeout=5) as response:
        return int(response.status)


# -- the host's resolver, inside a private namespace -------------------------------------------
def inv_dns(sandbox: Sandbox, state_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`inv dns` as a user runs it, on the sandbox's /etc/resolv.conf."""
    return sandbox.run(
        [str(VENV_BIN / "inv"), "dns", "--resolv-conf", "/etc/resolv.conf",
         "--state-dir", str(state_dir), "--consul-dns", f"127.0.0.1#{CONSUL_DNS_PORT}", *extra],
    )  # fmt: skip


SANDBOX_RESOLV = "# the sandbox's own resolver file\nsearch example.test\nnameserver 192.0.2.53\n"


@pytest.fixture(scope="module")
def host_resolver() -> bytes:
    return HOST_RESOLV.read_bytes()


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory, host_resolver: bytes) -> Iterator[Sandbox]:
    """A namespace with the dev agent's config (consul/dev.hcl) and `inv dns` done."""
    workdir = tmp_path_factory.mktemp("dns-sandbox")
    box = Sandbox(workdir).start(SANDBOX_RESOLV)
    try:
        box.start_consul()
        result = inv_dns(box, workdir / "state")
        assert result.returncode == 0, result.stderr
        yield box
    finally:
        box.stop()


def register_redis(sandbox: Sandbox, name: str, address: str, port: int) -> ManagedProcess:
    """redis-server run by dcy-register inside the sandbox, with a 1s TCP check."""
    env = {**os.environ, "CONSUL_HTTP_ADDR": f"127.0.0.1:{CONSUL_HTTP_PORT}"}
    process = sandbox.spawn(
        [str(VENV_BIN / "dcy-register"), "--name", name, "--port", str(port),
         "--address", address, "--check", "tcp", "--interval", "1s", "--",
         "redis-server", "--bind", address, "--port", str(port), "--save", "",
         "--appendonly", "no"],
        f"{name}-register",
        env=env,
    )  # fmt: skip
    return process


@pytest.fixture(scope="module")
def redis(sandbox: Sandbox) -> str:
    """A real redis on 127.0.0.2:6379 (not the node's 127.0.0.1), registered by dcy-register."""
    register_redis(sandbox, "redis", "127.0.0.2", 6379)
    until(lambda: health(sandbox, "redis") == ["passing"], what="redis passing")
    return "redis"


def health(sandbox: Sandbox, name: str) -> list[str]:
    entries = sandbox.http_json(f"{sandbox.consul_url}/v1/health/checks/{name}") or []
    return [entry["Status"] for entry in entries]


def getent(sandbox: Sandbox, name: str) -> subprocess.CompletedProcess[str]:
    return sandbox.run(["getent", "hosts", name])


def test_inv_dns_points_the_resolver_at_dnsmasq_and_leaves_the_host_alone(
    sandbox: Sandbox, host_resolver: bytes
) -> None:
    """Inside, /etc/resolv.conf asks dnsmasq first and keeps the old nameserver as fallback;
    the machine's own /etc/resolv.conf is byte for byte what it was."""
    inside = sandbox.run(["cat", "/etc/resolv.conf"]).stdout
    assert MARKER in inside
    assert inside.index("nameserver 127.0.0.1") < inside.index("nameserver 192.0.2.53")
    assert "search example.test" in inside
    assert HOST_RESOLV.read_bytes() == host_resolver


def test_getent_resolves_a_service_registered_with_dcy_register(
    sandbox: Sandbox, redis: str
) -> None:
    """`getent hosts redis.service.sd` (glibc, nsswitch, resolv.conf) returns the address
    dcy-register announced."""
    result = until(
        lambda: (r := getent(sandbox, f"{redis}.service.sd")).returncode == 0 and r,
        what="getent answer",
    )
    assert result.stdout.split() == ["127.0.0.2", "redis.service.sd"]


def test_redis_cli_reaches_redis_by_its_service_name(sandbox: Sandbox, redis: str) -> None:
    """A program that knows nothing of Consul (redis-cli) connects by service name."""
    result = sandbox.run(["redis-cli", "-h", f"{redis}.service.sd", "-p", "6379", "ping"])
    assert result.stdout.strip() == "PONG", result.stderr


def test_a_critical_instance_disappears_from_dns(sandbox: Sandbox) -> None:
    """When redis stops listening on its port, its TCP check goes critical and the name stops
    resolving once the check interval and the DNS TTL have passed; it is still registered."""
    register_redis(sandbox, "cache", "127.0.0.3", 6380)
    until(lambda: health(sandbox, "cache") == ["passing"], what="cache passing")
    until(lambda: getent(sandbox, "cache.service.sd").returncode == 0, what="cache resolves")
    moved = sandbox.run(["redis-cli", "-h", "127.0.0.3", "-p", "6380", "config", "set", "port",
                         "6390"])  # fmt: skip
    assert moved.stdout.strip() == "OK", moved.stderr
    until(lambda: health(sandbox, "cache") == ["critical"], what="cache critical")
    gone = until(
        lambda: getent(sandbox, "cache.service.sd").returncode == 2, timeout=60, what="NXDOMAIN"
    )
    assert gone
    assert health(sandbox, "cache") == ["critical"]  # not deregistered: hidden from DNS


def test_inv_dns_a_second_time_changes_nothing(sandbox: Sandbox) -> None:
    """Idempotent: the same resolver file and the same dnsmasq process after a second run."""
    state = sandbox.workdir / "state"
    before = (sandbox.resolv_conf.read_bytes(), (state / "dnsmasq.pid").read_text())
    result = inv_dns(sandbox, state)
    assert result.returncode == 0, result.stderr
    assert "already running" in result.stdout
    assert (sandbox.resolv_conf.read_bytes(), (state / "dnsmasq.pid").read_text()) == before


@pytest.fixture
def bare_sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    box = Sandbox(tmp_path / "sandbox").start(SANDBOX_RESOLV)
    try:
        yield box
    finally:
        box.stop()


def test_inv_dns_undo_restores_the_resolver_exactly(bare_sandbox: Sandbox) -> None:
    """`inv dns --undo` puts back the very bytes and mode of /etc/resolv.conf and stops
    dnsmasq."""
    bare_sandbox.resolv_conf.chmod(0o640)
    state = bare_sandbox.workdir / "state"
    assert inv_dns(bare_sandbox, state).returncode == 0
    pid = int((state / "dnsmasq.pid").read_text())
    assert MARKER in bare_sandbox.resolv_conf.read_text()
    result = inv_dns(bare_sandbox, state, "--undo")
    assert result.returncode == 0, result.stderr
    assert bare_sandbox.resolv_conf.read_text() == SANDBOX_RESOLV
    assert bare_sandbox.resolv_conf.stat().st_mode & 0o777 == 0o640
    until(lambda: not pid_alive(pid), what="dnsmasq stopped")
    assert not state.exists()


def test_inv_dns_refuses_a_read_only_resolver_file_and_changes_nothing(
    bare_sandbox: Sandbox,
) -> None:
    """With /etc/resolv.conf read-only, `inv dns` exits 1 with a clear reason, starts no
    dnsmasq and writes no state."""
    remount = bare_sandbox.run(["mount", "-o", "remount,ro,bind", "/etc/resolv.conf"])
    assert remount.returncode == 0, remount.stderr
    state = bare_sandbox.workdir / "state"
    result = inv_dns(bare_sandbox, state)
    assert result.returncode == 1
    assert "cannot write /etc/resolv.conf (read-only file system); nothing was changed" in (
        result.stderr
    )
    assert not state.exists()
    assert bare_sandbox.resolv_conf.read_text() == SANDBOX_RESOLV
