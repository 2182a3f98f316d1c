"""`inv infra.up --local`: the inventory on this machine, one network namespace per host, and
`inv infra.down --local` leaving nothing behind (CI runs as root)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import _netns
from tasks._cluster import State, down, running, up
from tasks._inventory import load_inventory
from tests.cluster import ONE_DC, app_results, inventory_text, leftovers
from tests.harness import until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def machine_network() -> tuple[str, str]:
    """The machine's own addresses and routes."""
    addresses = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True)
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True, check=True)
    return addresses.stdout, routes.stdout


def test_up_runs_every_host_in_its_namespace_and_down_leaves_nothing(tmp_path: Path) -> None:
    """Each host is a namespace with its inventory address; every service registers with its
    own host's agent under its host's address; the readings flow; the machine's network is
    untouched; `down` ends every process and namespace, and a second `down` finds nothing."""
    path = tmp_path / "inventory.yml"
    path.write_text(inventory_text(ONE_DC, "nsq"))
    root = tmp_path / "cluster"
    prefix = f"dcyt{secrets.token_hex(3)}"
    network_before = machine_network()
    cluster = up(load_inventory(path), root, prefix=prefix, say=lambda line: None)
    try:
        for host in cluster.plan.inventory.hosts:
            ns = cluster.plan.link("dc1", host.name).namespace
            shown = _netns.ip("-n", ns, "-o", "addr", "show", "dev", "eth0").stdout
            assert f"inet {host.address}/24" in shown
        assert machine_network() == network_before
        # The fabric routes between the cluster's subnets and nowhere else.
        fabric = cluster.plan.fabric
        assert _netns.ip("-n", fabric, "route", "get", "10.1.0.21", check=False).returncode == 0
        for outside in ("1.1.1.1", "192.168.1.1", "172.17.0.1"):
            refused = _netns.ip("-n", fabric, "route", "get", outside, check=False)
            assert refused.returncode != 0 and "unreachable" in refused.stderr, refused
        members = cluster.api("dc1", "c1", "/v1/agent/members")
        assert sorted((m["Name"], m["Addr"], m["Status"]) for m in members) == sorted(
            (h.name, h.address, 1) for h in cluster.plan.inventory.hosts
        )
        for service in ("sensor", "worker", "app", "nsqd"):
            for entry in cluster.api("dc1", "s2", f"/v1/catalog/service/{service}"):
                assert entry["ServiceAddress"] == entry["Address"], entry  # its own host's
        until(lambda: len(app_results(cluster)) >= 3, timeout=30, what="results at the app")
        pids = list(cluster.state.pids.values())
    finally:
        assert down(root, say=lambda line: None)
    assert leftovers(prefix) == []
    assert not [pid for pid in pids if running(pid)]
    assert not (root / "state.json").exists()
    assert (root / "dc1" / "c1" / "worker.log").read_text()  # the logs are kept
    assert not down(root, say=lambda line: None)  # idempotent
    assert machine_network() == network_before


def test_down_after_a_crashed_up_removes_what_it_had_made(tmp_path: Path) -> None:
    """`up` killed after creating namespaces and starting agents (SIGKILL: no cleanup of its
    own): `down` finds them by the state file's prefix and removes them."""
    path = tmp_path / "inventory.yml"
    path.write_text(inventory_text(ONE_DC, "http"))
    root = tmp_path / "cluster"
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from tasks._cluster import up\n"
        "from tasks._inventory import load_inventory\n"
        f"up(load_inventory(Path({str(path)!r})), Path({str(root)!r}), timeout=600)\n"
    )
    crashing = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        state = until(lambda: State.load(root), timeout=30, what="the state file")
        until(lambda: len(state_pids(root)) >= 5, timeout=30, what="agents started")
    finally:
        crashing.kill()
        crashing.wait()
    pids = state_pids(root)
    assert leftovers(state.prefix)  # namespaces were made
    assert down(root, say=lambda line: None)
    assert leftovers(state.prefix) == []
    assert not [pid for pid in pids if running(pid)]


def state_pids(root: Path) -> list[int]:
    state = State.load(root)
    return list(state.pids.values()) if state else []


def test_the_task_refuses_a_bad_inventory_with_the_reason(tmp_path: Path) -> None:
    """The command line: an even server count is refused with the reason and exit status 1,
    before any namespace exists."""
    bad = dict(ONE_DC)
    bad["dc1"] = {**ONE_DC["dc1"], "c1": {**ONE_DC["dc1"]["c1"], "consul": "server"}}
    path = tmp_path / "inventory.yml"
    path.write_text(inventory_text(bad, "nsq"))
    before = set(_netns.namespaces())
    result = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "inv"), "infra.up", "--local", "--inventory", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result
    assert "datacenter 'dc1' has 4 Consul server(s)" in result.stderr
    assert not {ns for ns in set(_netns.namespaces()) - before if ns.startswith("dcy")} - {
        ns
        for ns in _netns.namespaces()
        if ns.startswith("dcyt")  # other tests' clusters
    }


@pytest.mark.parametrize("task", ["infra.up", "infra.down"])
def test_the_tasks_refuse_a_user_without_root_with_exit_status_2(task: str) -> None:
    """Run as nobody (setpriv): a clear message, exit status 2, nothing started."""
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         str(ROOT / ".venv" / "bin" / "inv"), task, "--local"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "HOME": "/nonexistent"},  # invoke reads ~/.invoke.yaml
    )  # fmt: skip
    assert result.returncode == 2, result
    assert f"{task}: the local cluster needs root" in result.stderr
