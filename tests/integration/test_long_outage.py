"""R1: the HTTP system under load rides out a 60-second stop of its Consul agent, with every
program on its production defaults (back-off, probe, timeouts): the one long test of the
suite, in a file of its own so that pytest-xdist (--dist loadfile) runs it beside the rest.

The agent is a dev agent restarted on the same ports: it comes back with an empty catalog, so
every service really has to register again.
"""

from __future__ import annotations

import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ManagedProcess, free_ports, template_health
from tests.system import System, running_system, wait

pytestmark = pytest.mark.integration

OUTAGE = 60.0
DCY_TEMPLATE = str(Path(sys.executable).with_name("dcy-template"))
# The agent's own service: there again, unchanged, the moment the agent is back, so the
# template's output is the same before, during and after the outage.
CONSUL_TEMPLATE = "{% for i in service('consul') %}{{ i.Address }}:{{ i.Port }}\n{% endfor %}"


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    with running_system(tmp_path, with_nsq=False) as running:
        yield running


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def app_cycles(port: int) -> dict[str, float]:
    """The app's own accounting: ``app_cycles_total`` by outcome, from its /metrics."""
    _, body = get(f"http://127.0.0.1:{port}/metrics")
    found = re.findall(r'^app_cycles_total\{outcome="(\w+)"\} (\S+)$', body.decode(), re.M)
    return {"ok": 0.0, "failed": 0.0} | {outcome: float(n) for outcome, n in found}


def file_state(path: Path) -> tuple[int, int, bytes]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns, path.read_bytes()


def test_sixty_second_agent_stop_under_load(system: System, tmp_path: Path) -> None:
    """Consul stopped for 60 s under load: no app cycle fails while it is down (peers come
    from the cache), the template's file is untouched (same inode, mtime and content, never
    emptied); after the agent's return every service is registered and passing within 5 s
    and the template re-renders from fresh data within 1 s."""
    consul = system.consul
    assert consul is not None
    # Production defaults everywhere; --check-interval 1 undoes the harness's 0.5 (Consul's
    # check period, not a back-off) so the services run exactly as deployed.
    prod = ("--check-interval", "1")
    services = [system.start("worker", *prod), system.start("worker", *prod)]
    services.append(system.start("sensor", *prod))
    app = system.start("app", "--interval", "0.05", *prod)  # 20 cycles a second: the load
    services.append(app)
    for name, count in (("worker", 2), ("sensor", 1), ("app", 1)):
        system.wait_passing(name, count)
    (app_entry,) = consul.api("/v1/health/service/app")
    app_port = int(app_entry["Service"]["Port"])
    wait(lambda: app_cycles(app_port)["ok"] >= 20, what="the app cycling")

    src, out = tmp_path / "consul.j2", tmp_path / "out" / "consul.txt"
    src.write_text(CONSUL_TEMPLATE)
    (status_port,) = free_ports(1)
    renderer = ManagedProcess(
        [DCY_TEMPLATE, "-template", f"{src}:{out}", "-status-addr", f"127.0.0.1:{status_port}"],
        tmp_path / "dcy-template.log",
        env={**os.environ, "CONSUL_HTTP_ADDR": consul.http_addr},
    )
    renderer.spawn()
    try:
        wait(lambda: out.exists() and template_health(status_port)[0] == 200, what="rendered")
        before = file_state(out)
        assert before[2].strip(), "the template rendered nothing to begin with"
        renders_before = template_health(status_port)[1]["templates"][0]["renders"]
        cycles_before = app_cycles(app_port)
        ports = dict(consul.ports)

        consul.stop()
        stopped = time.monotonic()
        stale_reported = False
        while time.monotonic() - stopped < OUTAGE:
            cycles = app_cycles(app_port)
            assert cycles["failed"] == cycles_before["failed"], (
                f"{cycles['failed'] - cycles_before['failed']:.0f} app cycles failed "
                f"{time.monotonic() - stopped:.1f}s into the outage\n{app.proc.log_tail(20)}"
            )
            assert file_state(out) == before, "the template's file changed during the outage"
            status, body = template_health(status_port)
            stale_reported = stale_reported or (status == 503 and body["stale_seconds"] > 0)
            assert renderer.running and all(s.proc.running for s in services)
            time.sleep(0.5)
        during = app_cycles(app_port)
        assert during["ok"] > cycles_before["ok"], "no cycle ran from the cache"
        assert stale_reported, "dcy-template never reported its data stale"

        spawned = time.monotonic()
        consul.start()  # returns once the agent has elected itself and lists its node
        back = time.monotonic()
        assert consul.ports == ports  # the same agent address for every client
        passing_at = rendered_at = None
        while passing_at is None or rendered_at is None:
            now = time.monotonic() - back
            assert now < 30, f"passing after {passing_at}s, rendered after {rendered_at}s"
            if passing_at is None and all(
                system.passing(name) >= count
                for name, count in (("worker", 2), ("sensor", 1), ("app", 1))
            ):
                passing_at = now
            status, body = template_health(status_port)
            renders = body["templates"][0]["renders"]
            if rendered_at is None and status == 200 and renders > renders_before:
                rendered_at = now
            time.sleep(0.02)
        print(
            f"\nR1: agent ready {back - spawned:.2f}s after its start; every service passing "
            f"{passing_at:.2f}s and the template re-rendered {rendered_at:.2f}s after that; "
            f"{during['ok'] - cycles_before['ok']:.0f} cycles ok, 0 failed during the outage"
        )
        assert passing_at <= 5.0, f"services passing only {passing_at:.2f}s after the return"
        assert rendered_at <= 1.0, f"template re-rendered only {rendered_at:.2f}s after"
        assert file_state(out) == before  # same data, so not even rewritten
        ok = app_cycles(app_port)["ok"]
        wait(lambda: app_cycles(app_port)["ok"] >= ok + 20, what="the app cycling again")
        print(f"R1: {app_cycles(app_port)['failed'] - during['failed']:.0f} cycles failed after")
    finally:
        renderer.stop()
