"""dcy-template as users run it, against real Consul agents: the failure rules first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import (
    ConsulAgent,
    ManagedProcess,
    bound_status_port,
    template_health,
    until,
)

pytestmark = pytest.mark.integration

DCY_TEMPLATE = str(Path(sys.executable).with_name("dcy-template"))
WEB_PORTS = "{% for i in service('web') %}{{ i.Port }} {% endfor %}"


def register(agent: ConsulAgent, service_id: str, port: int, name: str = "web") -> None:
    body = json.dumps({"ID": service_id, "Name": name, "Port": port}).encode()
    request = urllib.request.Request(
        f"{agent.url}/v1/agent/service/register", data=body, method="PUT"
    )
    urllib.request.urlopen(request, timeout=5).close()


def deregister(agent: ConsulAgent, service_id: str) -> None:
    request = urllib.request.Request(
        f"{agent.url}/v1/agent/service/deregister/{service_id}", data=b"", method="PUT"
    )
    urllib.request.urlopen(request, timeout=5).close()


def read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


class Renderer:
    """dcy-template running as a child process, with its log."""

    def __init__(self, tmp_path: Path, agent: ConsulAgent, *args: str) -> None:
        env = dict(os.environ, CONSUL_HTTP_ADDR=agent.http_addr)
        self.proc = ManagedProcess(
            [DCY_TEMPLATE, "-log-level", "debug", *args], tmp_path / "dcy-template.log", env=env
        )
        self.proc.spawn()

    @property
    def alive(self) -> bool:
        return self.proc.running

    def signal(self, sig: int) -> None:
        assert self.proc.process is not None
        self.proc.process.send_signal(sig)

    def wait(self, timeout: float = 10) -> int:
        assert self.proc.process is not None
        return self.proc.process.wait(timeout)

    def log(self) -> str:
        return self.proc.log_path.read_text(errors="replace")


@pytest.fixture
def start_renderer(tmp_path: Path) -> Iterator[Callable[..., Renderer]]:
    started: list[Renderer] = []

    def start(agent: ConsulAgent, *args: str) -> Renderer:
        renderer = Renderer(tmp_path, agent, *args)
        started.append(renderer)
        return renderer

    yield start
    for renderer in started:
        renderer.proc.stop()


def run_cli(*args: str, agent: ConsulAgent | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if agent is not None:
        env["CONSUL_HTTP_ADDR"] = agent.http_addr
    return subprocess.run(
        [DCY_TEMPLATE, *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_once_renders_and_exits_zero(consul: ConsulAgent, unique_name: str, tmp_path: Path) -> None:
    """-once renders every template, runs its command and exits 0."""
    register(consul, f"{unique_name}-1", 7001, name=unique_name)
    src, out, marker = tmp_path / "in.j2", tmp_path / "out" / "file", tmp_path / "ran"
    src.write_text(f"{{% for i in service('{unique_name}') %}}{{{{ i.Port }}}}{{% endfor %}}")
    command = f"{sys.executable} -c \"open('{marker}', 'w').write('yes')\""
    result = run_cli("-template", f"{src}:{out}:{command}", "-once", agent=consul)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == "7001" and marker.read_text() == "yes"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "no templates"),
        (("-template", "only-one-part"), "invalid -template"),
        (("-template", "/nonexistent/in.j2:/tmp/out"), "does not exist"),
        (("-template", "{src}:{out}", "-wait", "soon"), "invalid wait"),
        (("-template", "{src}:{out}", "-kill-signal", "SIGBOGUS"), "unknown signal"),
        (("-template", "{src}:{out}", "-no-such-flag"), "unrecognized arguments"),
        (("-config", "/nonexistent.hcl"), "no such file"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    """Bad flags and configs exit 2 with a message saying what is wrong; nothing is written."""
    src = tmp_path / "in.j2"
    src.write_text("x")
    out = tmp_path / "out"
    filled = [a.format(src=src, out=out) for a in args]
    result = run_cli(*filled)
    assert result.returncode == 2
    assert message in result.stderr
    assert not out.exists()


def test_consul_outage_keeps_files_and_renderer_recovers(
    consul_factory: Callable[..., ConsulAgent],
    tmp_path: Path,
    start_renderer: Callable[..., Renderer],
) -> None:
    """Consul stopped far longer than the retry schedule: the file is untouched, the renderer
    stays up and reports staleness, then re-renders when Consul is back."""
    agent = consul_factory()
    register(agent, "web-1", 7101)
    src, out = tmp_path / "in.j2", tmp_path / "out"
    src.write_text(WEB_PORTS)
    renderer = start_renderer(
        agent,
        "-template",
        f"{src}:{out}",
        "-consul-retry-backoff",
        "20ms",
        "-consul-retry-max-backoff",
        "100ms",
        "-status-addr",
        "127.0.0.1:0",
    )
    status_port = until(lambda: bound_status_port(renderer.log()), what="status server")
    until(lambda: read(out) == "7101 ", what="first render")
    until(lambda: template_health(status_port)[0] == 200, what="healthy")
    written = out.stat().st_mtime_ns
    agent.stop()
    until(lambda: template_health(status_port)[0] == 503, what="stale reported")
    time.sleep(3)  # dozens of failed retries at this schedule (consul-template gives up)
    code, body = template_health(status_port)
    assert code == 503 and body["stale_seconds"] > 2
    assert "Consul unreachable" in " ".join(body["problems"])
    assert renderer.alive and out.read_text() == "7101 " and out.stat().st_mtime_ns == written
    agent.start()  # same ports, empty state: the service is gone until registered again
    register(agent, "web-2", 7102)
    until(lambda: read(out) == "7102 ", what="re-render after recovery")
    until(lambda: template_health(status_port)[0] == 200, what="fresh again")
    assert renderer.alive


def test_template_errors_keep_old_output_and_edits_are_live(
    consul: ConsulAgent,
    unique_name: str,
    tmp_path: Path,
    start_renderer: Callable[..., Renderer],
) -> None:
    """A broken template keeps the old file (error logged with its line); fixing the source
    on disk is picked up without a signal."""
    register(consul, f"{unique_name}-1", 7201, name=unique_name)
    src, out = tmp_path / "in.j2", tmp_path / "out"
    src.write_text(f"ports: {{{{ service('{unique_name}') | length }}}}")
    renderer = start_renderer(consul, "-template", f"{src}:{out}")
    until(lambda: read(out) == "ports: 1", what="first render")
    src.write_text("ok\n{% for x in %}")
    until(lambda: "syntax error" in renderer.log(), what="error logged")
    assert f"{src}:2" in renderer.log() and read(out) == "ports: 1" and renderer.alive
    src.write_text(f"count={{{{ service('{unique_name}') | length }}}}")
    until(lambda: read(out) == "count=1", what="fixed template rendered")


def test_failing_command_does_not_stop_rendering(
    consul: ConsulAgent,
    unique_name: str,
    tmp_path: Path,
    start_renderer: Callable[..., Renderer],
) -> None:
    """A command that fails is logged with its output; later changes still render."""
    register(consul, f"{unique_name}-1", 7301, name=unique_name)
    src, out = tmp_path / "in.j2", tmp_path / "out"
    src.write_text(f"{{% for i in service('{unique_name}') %}}{{{{ i.Port }}}} {{% endfor %}}")
    command = f"{sys.executable} -c \"print('reload refused'); raise SystemExit(4)\""
    renderer = start_renderer(consul, "-template", f"{src}:{out}:{command}")
    until(lambda: "reload refused" in renderer.log(), what="command output logged")
    register(consul, f"{unique_name}-2", 7302, name=unique_name)
    until(lambda: read(out) == "7301 7302 ", what="render after the failure")
    until(lambda: renderer.log().count("exited 4") >= 2, what="second command run")
    assert renderer.alive


def test_sighup_reloads_config_and_sigterm_stops(
    consul: ConsulAgent,
    unique_name: str,
    tmp_path: Path,
    start_renderer: Callable[..., Renderer],
) -> None:
    """SIGHUP re-reads -config (a new template appears); SIGTERM exits 0 and removes the
    pid file."""
    register(consul, f"{unique_name}-1", 7401, name=unique_name)
    src = tmp_path / "in.j2"
    src.write_text(f"{{{{ service('{unique_name}') | length }}}}")
    config_dir = tmp_path / "conf"
    config_dir.mkdir()
    first, second = tmp_path / "first", tmp_path / "second"
    (config_dir / "a.hcl").write_text(
        f'template {{\n source = "{src}"\n destination = "{first}"\n}}\n'
    )
    pid_file = tmp_path / "pid"
    renderer = start_renderer(consul, "-config", str(config_dir), "-pid-file", str(pid_file))
    until(lambda: read(first) == "1", what="first template")
    assert pid_file.read_text().strip() == str(renderer.proc.process.pid)  # type: ignore[union-attr]
    (config_dir / "b.hcl").write_text(
        f'template {{\n source = "{src}"\n destination = "{second}"\n perms = 0600\n}}\n'
    )
    renderer.signal(signal.SIGHUP)
    until(lambda: read(second) == "1", what="template added by reload")
    assert second.stat().st_mode & 0o777 == 0o600
    renderer.signal(signal.SIGTERM)
    assert renderer.wait() == 0
    assert not pid_file.exists()


CHILD = """
import signal, sys, time
log = open(sys.argv[1], "a", buffering=1)
log.write("started\\n")
signal.signal(signal.SIGHUP, lambda *_: log.write("reload\\n"))
def stop(*_):
    log.write("stopped\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while True:
    time.sleep(0.05)
"""


def test_exec_mode_reloads_and_stops_the_child(
    consul: ConsulAgent,
    unique_name: str,
    tmp_path: Path,
    start_renderer: Callable[..., Renderer],
) -> None:
    """-exec starts the child after the first render, sends it the reload signal on each
    change, forwards nothing else, and stops it on SIGTERM."""
    register(consul, f"{unique_name}-1", 7501, name=unique_name)
    src, out, events = tmp_path / "in.j2", tmp_path / "out", tmp_path / "events"
    src.write_text(f"{{% for i in service('{unique_name}') %}}{{{{ i.Port }}}} {{% endfor %}}")
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    renderer = start_renderer(
        consul,
        "-template",
        f"{src}:{out}",
        "-exec",
        f"{sys.executable} {child} {events}",
        "-exec-reload-signal",
        "SIGHUP",
        "-exec-kill-timeout",
        "5s",
    )
    until(lambda: read(events) == "started\n", what="child started")
    assert read(out) == "7501 "
    register(consul, f"{unique_name}-2", 7502, name=unique_name)
    until(lambda: read(events) == "started\nreload\n", what="child reloaded")
    renderer.signal(signal.SIGTERM)
    assert renderer.wait() == 0
    assert read(events) == "started\nreload\nstopped\n"


def test_a_run_imports_only_what_it_uses(consul: ConsulAgent, tmp_path: Path) -> None:
    """Without -config, -status-addr or live reload (-once), no HCL parser, Prometheus,
    aiohttp server or watchdog is imported: start-up is the time to the first file."""
    src, out = tmp_path / "in.j2", tmp_path / "out"
    src.write_text("{% for s in service('consul') %}{{ s.Port }}{% endfor %}")
    env = dict(os.environ, CONSUL_HTTP_ADDR=consul.http_addr)
    done = subprocess.run(
        [sys.executable, "-X", "importtime", DCY_TEMPLATE, "-once", "-template", f"{src}:{out}"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {
        line.split("|")[-1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert {"jinja2", "aiohttp"} <= imported
    assert imported & {"hcl2", "lark", "prometheus_client", "watchdog", "aiohttp.web"} == set()
    assert read(out) == str(consul.ports["server"])  # the consul service is the server RPC


def test_an_edit_before_sources_are_watched_is_not_lost(
    consul: ConsulAgent,
    unique_name: str,
    tmp_path: Path,
    start_renderer: Callable[..., Renderer],
) -> None:
    """Sources are watched only after the first pass (off the way to the first file); a
    source edited before that, while the first pass waits for a key, is still picked up."""
    src, out = tmp_path / "in.j2", tmp_path / "out"
    src.write_text(f"{{{{ key('{unique_name}/missing') }}}}")
    renderer = start_renderer(consul, "-template", f"{src}:{out}")
    until(lambda: "Using selector" in renderer.log(), what="the renderer's loop running")
    time.sleep(0.3)
    assert "watching" not in renderer.log(), "sources watched already: nothing to test"
    src.write_text("edited before the watch")
    until(lambda: read(out) == "edited before the watch", what="the edit rendered")
    assert "watching 1 template source(s)" in renderer.log()
