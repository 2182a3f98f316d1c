"""sensor, worker and app end to end over HTTP, found only through Consul."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.system import ServiceProcess, System, running_system, wait

pytestmark = pytest.mark.integration


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    with running_system(tmp_path, with_nsq=False) as running:
        yield running


def port_of(system: System, service: ServiceProcess) -> int:
    assert system.consul is not None
    for entry in system.consul.api(f"/v1/health/service/{service.name}") or []:
        if entry["Service"]["Meta"].get("pid") == str(service.pid):
            return int(entry["Service"]["Port"])
    raise AssertionError(f"{service.name} pid {service.pid} is not registered")


def post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_orchestration_logs_results_from_both_workers(system: System) -> None:
    """The app asks a sensor, sends the reading to a worker and logs one line per reading;
    round-robin uses both workers; every service is passing with tags and meta."""
    system.start("worker")
    system.start("worker")
    system.start("sensor")
    app = system.start("app", "--interval", "0.2")
    for name, count in (("worker", 2), ("sensor", 1), ("app", 1)):
        system.wait_passing(name, count)
    results = wait(lambda: len(System.results(app)) >= 10 and System.results(app), what="results")
    for line in results:
        assert [v * v for v in line["values"]] == line["result"]
        assert line["latency_ms"] >= 0 and line["id"].startswith("sensor-")
    assert len({line["id"] for line in results}) == len(results)
    assert len({line["worker"] for line in results}) == 2
    assert system.consul is not None
    (entry,) = system.consul.api("/v1/health/service/app")
    assert entry["Service"]["Tags"] == ["mode-http", "version-0.1.0"]
    assert entry["Service"]["Meta"]["mode"] == "http"
    check = next(c for c in entry["Checks"] if c["ServiceID"])
    assert check["Name"] == "app HTTP /health" and check["Notes"]


def test_malformed_readings_get_400_and_go_nowhere(system: System) -> None:
    """A worker refuses malformed readings with a reason; a good one is squared."""
    worker = system.start("worker")
    system.wait_passing("worker", 1)
    url = f"http://127.0.0.1:{port_of(system, worker)}/"
    for body, reason in (
        (b"not json", "not JSON"),
        (b"[1,2,3]", "JSON object"),
        (b'{"id": "x", "ts": 1, "values": [1, 2]}', "3 integers"),
        (b'{"id": "", "ts": 1, "values": [1, 2, 3]}', "id"),
        (b'{"id": "x", "ts": "now", "values": [1, 2, 3]}', "ts"),
    ):
        status, answer = post(url, body)
        assert status == 400 and reason in answer["error"], (body, answer)
    status, answer = post(url, b'{"id": "r1", "ts": 1.5, "values": [2, 3, 4]}')
    assert status == 200 and answer["squares"] == [4, 9, 16] and answer["id"] == "r1"
    with urllib.request.urlopen(f"http://127.0.0.1:{port_of(system, worker)}/metrics") as resp:
        metrics = resp.read().decode()
    assert (
        "worker_rejected_total 5.0" in metrics
        and 'worker_processed_total{via="http"} 1.0' in metrics
    )
    # Its start-up heap is frozen, out of the collector's reach (full collections over it
    # held readings for ~40 ms).
    (frozen,) = [line for line in metrics.splitlines() if line.startswith("svc_gc_frozen_objects ")]
    assert float(frozen.split()[1]) > 10_000


@pytest.mark.parametrize(
    "args",
    [
        ("--mode", "carrier-pigeon"),
        ("--port", "70000"),
        ("--no-such-flag",),
        ("--msg-timeout", "0.5"),
        ("--msg-timeout", "soon"),
    ],
)
def test_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    """Unknown modes and flags are usage errors: exit 2 with a message, nothing started."""
    result = subprocess.run(
        [sys.executable, "-m", "svc.worker", *args], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_killed_worker_costs_at_most_one_cycle(system: System) -> None:
    """SIGKILL one of two workers while the app runs: at most one cycle fails, results go on
    through the other worker."""
    first = system.start("worker")
    system.start("worker")
    system.start("sensor")
    app = system.start("app", "--interval", "0.1")
    system.wait_passing("worker", 2)
    wait(lambda: len(System.results(app)) >= 10, what="steady results")
    failures_before = app.log().count("cycle failed")
    logged_before = len(System.results(app))
    first.proc.kill()
    wait(lambda: len(System.results(app)) >= logged_before + 30, what="results after the kill")
    assert app.log().count("cycle failed") - failures_before <= 1
    survivors = {line["worker"] for line in System.results(app)[logged_before + 5 :]}
    assert len(survivors) == 1


def test_sigterm_deregisters_and_exits_zero(system: System) -> None:
    """SIGTERM: the instance leaves Consul first, then the process exits 0."""
    worker = system.start("worker")
    system.wait_passing("worker", 1)
    assert worker.proc.process is not None
    worker.proc.process.send_signal(signal.SIGTERM)
    assert worker.proc.process.wait(15) == 0
    assert system.consul is not None
    assert system.consul.api("/v1/health/service/worker") == []


def test_consul_restart_services_reregister_and_pipeline_continues(system: System) -> None:
    """A restarted (empty) dev agent: every service registers again, results keep coming."""
    system.start("worker")
    system.start("sensor")
    app = system.start("app", "--interval", "0.2")
    system.wait_passing("app", 1)
    wait(lambda: len(System.results(app)) >= 3, what="results before the restart")
    assert system.consul is not None
    system.consul.restart()
    for name in ("worker", "sensor", "app"):
        system.wait_passing(name, 1, timeout=45)
    logged = len(System.results(app))
    wait(lambda: len(System.results(app)) >= logged + 5, timeout=45, what="results after")


def test_push_mode_results_reach_the_app(system: System) -> None:
    """Push mode: sensor → worker → app without the app asking; each reading logged once."""
    app = system.start("app", "--mode", "push")
    system.start("worker", "--mode", "push")
    system.wait_passing("app", 1)
    system.wait_passing("worker", 1)
    system.start("sensor", "--mode", "push", "--rate", "20")
    results = wait(lambda: len(System.results(app)) >= 20 and System.results(app), what="pushes")
    assert len({line["id"] for line in results}) == len(results)
    assert all([v * v for v in line["values"]] == line["result"] for line in results)


def _leader_and_standby(system: System, *app_args: str) -> tuple[ServiceProcess, ServiceProcess]:
    """A worker, a sensor and two apps in HTTP mode: the first leading, the second waiting."""
    system.start("worker")
    system.start("sensor")
    first = system.start("app", "--interval", "0.2", *app_args)
    wait(lambda: System.results(first), what="first app leading")
    second = system.start("app", "--interval", "0.2", *app_args)
    system.wait_passing("app", 2)
    return first, second


def test_standby_app_takes_over_when_the_leader_dies(system: System) -> None:
    """Two apps: only the leader orchestrates; killed with SIGKILL, the other takes over once
    Consul's check of the dead leader fails (its session is bound to that check). With a 60s
    session TTL, expiry (2 x TTL) could not have done it before the wait gives up."""
    first, second = _leader_and_standby(system, "--leader-ttl", "60")
    # Five more cycles of the leader: time enough for a standby that also orchestrated to log.
    led = len(System.results(first))
    wait(lambda: len(System.results(first)) >= led + 5, what="the leader's next cycles")
    assert System.results(second) == []
    first.proc.kill()
    wait(lambda: System.results(second), timeout=60, what="take-over")
    assert "leading: http mode" in second.log()


def test_stopped_leader_hands_over_without_lock_delay(system: System) -> None:
    """SIGTERM to the leading app: it steps down before leaving Consul, so the lock is
    released rather than invalidated with its instance's check, and the standby leads at
    once. The 30s lock-delay would outlast the wait if the release came second."""
    first, second = _leader_and_standby(system, "--lock-delay", "30")
    assert first.proc.process is not None
    first.proc.process.send_signal(signal.SIGTERM)
    wait(lambda: System.results(second), timeout=20, what="hand-over")
    assert first.proc.process.wait(20) == 0
    assert "stepped down as leader of app" in first.log()
