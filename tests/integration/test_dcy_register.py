"""dcy-register against real agents: the console script as a user runs it, real children."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ConsulAgent, until

pytestmark = pytest.mark.integration

REGISTER = str(Path(sys.executable).parent / "dcy-register")
PY = sys.executable

# A child that records each signal it gets (one line each) and obeys the test's instructions.
SIGNAL_RECORDER = """
import signal, sys, time
log = open(sys.argv[1], "a", buffering=1)
def record(sig, _frame):
    log.write(signal.Signals(sig).name + "\\n")
    if sig == signal.SIGTERM:
        sys.exit(3)
for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
    signal.signal(sig, record)
signal.signal(signal.SIGINT, signal.SIG_DFL)
log.write("ready\\n")
while True:
    time.sleep(0.05)
"""

# A check command that writes its argv to a file and exits with the code in another file.
ARGV_RECORDER = """
import json, pathlib, sys
out, code_file = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
out.write_text(json.dumps(sys.argv[3:]))
print("check says", code_file.read_text().strip())
sys.exit(int(code_file.read_text()))
"""


class Runner:
    """Starts dcy-register processes against one agent; ends those still running."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], agent_addr: str, **env: str) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"dcy-register-{len(self.started)}.log").open("ab")
        process = subprocess.Popen(
            [REGISTER, *args],
            env={**os.environ, "CONSUL_HTTP_ADDR": agent_addr, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.started.append(process)
        return process

    def log(self, index: int = -1) -> str:
        position = index if index >= 0 else len(self.started) + index
        return (self.workdir / f"dcy-register-{position}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[Runner]:
    started = Runner(tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


def services(agent: ConsulAgent) -> dict[str, Any]:
    return agent.api("/v1/agent/services") or {}


def check_status(agent: ConsulAgent, service_id: str) -> str | None:
    check = (agent.api("/v1/agent/checks") or {}).get(f"service:{service_id}")
    return check["Status"] if check else None


def test_exit_code_of_the_child_is_passed_through(
    consul: ConsulAgent, runner: Runner, unique_name: str
) -> None:
    """The child's own exit code is dcy-register's exit code."""
    process = runner.start(
        ["--name", unique_name, "--port", "7001", "--check", "ttl", "--",
         PY, "-c", "import sys; sys.exit(7)"],
        consul.http_addr,
    )  # fmt: skip
    assert process.wait(30) == 7, runner.log()


def test_death_by_signal_exits_128_plus_the_signal(
    consul: ConsulAgent, runner: Runner, unique_name: str
) -> None:
    """A child killed by signal N makes dcy-register exit 128+N, as a shell reports it."""
    process = runner.start(
        ["--name", unique_name, "--port", "7002", "--check", "ttl", "--",
         PY, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
        consul.http_addr,
    )  # fmt: skip
    assert process.wait(30) == 128 + signal.SIGKILL, runner.log()


def test_signals_reach_the_child_exactly_once_each(
    consul: ConsulAgent, runner: Runner, unique_name: str, tmp_path: Path
) -> None:
    """HUP, USR1, USR2 and TERM sent to dcy-register each reach the child once, in order, and
    the child's exit code after TERM comes back."""
    received = tmp_path / "signals.txt"
    process = runner.start(
        ["--name", unique_name, "--port", "7003", "--check", "ttl", "--",
         PY, "-c", SIGNAL_RECORDER, str(received)],
        consul.http_addr,
    )  # fmt: skip
    until(lambda: received.exists() and "ready" in received.read_text(), what="child ready")
    sent = [signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2]
    for number, sig in enumerate(sent, 2):
        process.send_signal(sig)
        until(partial(_lines_are, received, number), what=f"{sig.name} seen")
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 3, runner.log()
    assert received.read_text().split() == ["ready", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGTERM"]


def test_sigint_kills_a_child_with_default_handling_and_exit_is_130(
    consul: ConsulAgent, runner: Runner, unique_name: str, tmp_path: Path
) -> None:
    """SIGINT is forwarded; a child that dies of it makes dcy-register exit 130."""
    received = tmp_path / "signals.txt"
    process = runner.start(
        ["--name", unique_name, "--port", "7004", "--check", "ttl", "--",
         PY, "-c", SIGNAL_RECORDER, str(received)],
        consul.http_addr,
    )  # fmt: skip
    until(lambda: received.exists() and "ready" in received.read_text(), what="child ready")
    process.send_signal(signal.SIGINT)
    assert process.wait(30) == 128 + signal.SIGINT, runner.log()


def test_service_is_deregistered_when_the_child_exits(
    consul: ConsulAgent, runner: Runner, unique_name: str, tmp_path: Path
) -> None:
    """Registered with a passing check while the child lives; gone from the agent by the time
    dcy-register has exited after the child's own exit."""
    go = tmp_path / "go"
    child = f"import os, time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.05)"
    process = runner.start(
        ["--name", unique_name, "--id", unique_name, "--port", "7005", "--check", "ttl",
         "--tags", "a,b", "--tag", "c", "--meta", "owner=tests", "--", PY, "-c", child],
        consul.http_addr,
    )  # fmt: skip
    until(lambda: check_status(consul, unique_name) == "passing", what="registered, passing")
    entry = services(consul)[unique_name]
    assert (entry["Service"], entry["Port"]) == (unique_name, 7005)
    assert entry["Tags"] == ["c", "a", "b"]
    assert entry["Meta"] == {"owner": "tests"}
    go.touch()
    assert process.wait(30) == 0, runner.log()
    assert unique_name not in services(consul)


def test_reregisters_after_the_agent_restarts(
    consul_factory: Callable[..., ConsulAgent], runner: Runner, unique_name: str
) -> None:
    """A restarted dev agent forgot the service; dcy-register registers it again by itself."""
    agent = consul_factory()
    process = runner.start(
        ["--name", unique_name, "--id", unique_name, "--port", "7006", "--check", "ttl", "--",
         PY, "-c", "import time; time.sleep(600)"],
        agent.http_addr,
    )  # fmt: skip
    until(lambda: check_status(agent, unique_name) == "passing", what="first registration")
    agent.restart()
    until(
        lambda: check_status(agent, unique_name) == "passing",
        timeout=60,
        what="registration after the restart",
    )
    # The line is logged once the PUT returned, a moment after the agent shows the check.
    until(lambda: "re-registered" in runner.log(), what="the re-registration logged")
    assert process.poll() is None


def test_child_starts_before_consul_answers_and_is_registered_later(
    tmp_path: Path, runner: Runner, unique_name: str
) -> None:
    """With no agent answering the child runs at once; the service appears once an agent
    starts on the configured address."""
    # The HTTP port dcy-register is told stays the agent's even if another port of its clashes;
    # held (bound, not listening: connections are refused, as with no agent) until then.
    agent = ConsulAgent(tmp_path / "late-agent", kept_ports=frozenset({"http"}))
    agent.choose_ports()
    holder = socket.socket()
    holder.bind(("127.0.0.1", agent.ports["http"]))
    started = tmp_path / "child-started"
    child = f"import pathlib, time; pathlib.Path({str(started)!r}).touch(); time.sleep(600)"
    process = runner.start(
        ["--name", unique_name, "--id", unique_name, "--port", "7007", "--check", "ttl", "--",
         PY, "-c", child],
        agent.http_addr,
    )  # fmt: skip
    try:
        until(started.exists, what="child started without Consul")
        until(lambda: "waiting for Consul" in runner.log(), what="a line saying it waits")
        holder.close()
        agent.start()
        until(lambda: check_status(agent, unique_name) == "passing", what="late registration")
        assert process.poll() is None
    finally:
        holder.close()
        agent.stop()


HCL_CONFIG = """
service {
  name = "NAME-a"
  id   = "NAME-a"
  port = 7101
  tags = ["first"]
  meta = { "role" = "a" }
  check {
    ttl = "10s"
  }
}
service {
  name = "NAME-b"
  id   = "NAME-b"
  port = 7102
  check {
    args     = ["true"]
    interval = "1s"
  }
}
"""

YAML_CONFIG = """
services:
  - name: NAME-a
    id: NAME-a
    port: 7101
    tags: [first]
    meta: {role: a}
    check: {ttl: 10s}
  - name: NAME-b
    id: NAME-b
    port: 7102
    check: {args: ["true"], interval: 1s}
"""


@pytest.mark.parametrize(("suffix", "template"), [(".hcl", HCL_CONFIG), (".yaml", YAML_CONFIG)])
def test_config_file_registers_every_service_it_names(
    consul: ConsulAgent,
    runner: Runner,
    unique_name: str,
    tmp_path: Path,
    suffix: str,
    template: str,
) -> None:
    """Both services of a --config file are registered for one child, and both leave with it."""
    config = tmp_path / f"services{suffix}"
    config.write_text(template.replace("NAME", unique_name))
    process = runner.start(
        ["--config", str(config), "--", PY, "-c", "import time; time.sleep(600)"],
        consul.http_addr,
    )
    a, b = f"{unique_name}-a", f"{unique_name}-b"
    until(
        lambda: check_status(consul, a) == "passing" and check_status(consul, b) == "passing",
        what="both services passing",
    )
    registered = services(consul)
    assert (registered[a]["Port"], registered[a]["Tags"], registered[a]["Meta"]) == (
        7101,
        ["first"],
        {"role": "a"},
    )
    assert registered[b]["Port"] == 7102
    process.terminate()
    assert process.wait(30) == 128 + signal.SIGTERM, runner.log()
    assert not {a, b} & set(services(consul))


# Each case: its arguments and what the message must say. Every name holds NAME (the test's
# unique name), so the final check would see the service had anything reached Consul.
BAD_INPUTS = {
    "invalid name": (["--name", "NAME with spaces", "--port", "7201"], "invalid service name"),
    "port out of range": (["--name", "NAME", "--port", "70000"], "invalid port 70000"),
    "unknown check": (["--name", "NAME", "--port", "7201", "--check", "icmp"], "'icmp'"),
    "meta without =": (["--name", "NAME", "--port", "7201", "--meta", "novalue"], "KEY=VALUE"),
    "bad interval": (["--name", "NAME", "--port", "7201", "--interval", "soon"],
                     "invalid --interval 'soon'"),
    "http path on tcp check": (["--name", "NAME", "--port", "7201", "--check", "tcp",
                                "--http-path", "/x"], "HTTP path only fits an http check"),
    "config with unknown key": (["--config", "CONFIG"], "unknown key(s) ['colour']"),
    "both a pid and a command": (["--name", "NAME", "--port", "7201", "--pid", "1"],
                                 "not both"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_and_registers_and_runs_nothing(
    consul: ConsulAgent, runner: Runner, unique_name: str, tmp_path: Path, case: str
) -> None:
    """Bad input is reported on stderr with exit code 2; the child never runs and Consul never
    hears of the service."""
    config = tmp_path / "bad.hcl"
    config.write_text(f'service {{\n  name = "{unique_name}"\n  port = 1\n  colour = "red"\n}}\n')
    words, message = BAD_INPUTS[case]
    args = [a.replace("NAME", unique_name).replace("CONFIG", str(config)) for a in words]
    ran = tmp_path / "ran"
    process = runner.start([*args, "--", "touch", str(ran)], consul.http_addr)
    assert process.wait(30) == 2
    assert runner.log().startswith("dcy-register: ")
    assert message in runner.log().splitlines()[0]
    assert not ran.exists()
    assert not any(unique_name in s["Service"] for s in services(consul).values())


def test_check_command_runs_without_a_shell_and_maps_exit_codes(
    consul: ConsulAgent, runner: Runner, unique_name: str, tmp_path: Path
) -> None:
    """The check command gets its words literally (no $ expansion, no ; or >) and its exit
    code sets the check: 0 passing, 1 warning, 2 critical."""
    script, seen, code = tmp_path / "check.py", tmp_path / "argv.json", tmp_path / "code"
    script.write_text(ARGV_RECORDER)
    code.write_text("0")
    command = f"{PY} {script} {seen} {code} '$HOME' 'a;b' '>redirected' \"two words\""
    runner.start(
        ["--name", unique_name, "--id", unique_name, "--port", "7301",
         "--check-cmd", command, "--interval", "0.2s", "--",
         PY, "-c", "import time; time.sleep(600)"],
        consul.http_addr,
    )  # fmt: skip
    until(lambda: check_status(consul, unique_name) == "passing", what="passing on exit 0")
    assert seen.read_text() == '["$HOME", "a;b", ">redirected", "two words"]'
    assert not (tmp_path / "redirected").exists()
    for exit_code, status in (("1", "warning"), ("2", "critical"), ("0", "passing")):
        code.write_text(exit_code)
        until(partial(_status_is, consul, unique_name, status), what=f"{status} check")
    output = consul.api("/v1/agent/checks")[f"service:{unique_name}"]["Output"]
    assert "check says 0" in output


def test_attached_pid_is_watched_and_its_service_leaves_when_it_exits(
    consul: ConsulAgent, runner: Runner, unique_name: str
) -> None:
    """--pid registers a process dcy-register did not start and deregisters when it ends."""
    watched = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        process = runner.start(
            ["--name", unique_name, "--id", unique_name, "--port", "7401", "--check", "ttl",
             "--pid", str(watched.pid)],
            consul.http_addr,
        )  # fmt: skip
        until(lambda: check_status(consul, unique_name) == "passing", what="registered")
        watched.terminate()
        watched.wait(10)
        assert process.wait(30) == 0, runner.log()
        assert unique_name not in services(consul)
    finally:
        if watched.poll() is None:
            watched.kill()
            watched.wait(5)


def _lines_are(path: Path, count: int) -> bool:
    return len(path.read_text().split()) == count


def _status_is(agent: ConsulAgent, service_id: str, status: str) -> bool:
    return check_status(agent, service_id) == status
