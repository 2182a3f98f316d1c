"""What `inv infra.up --local` would start, checked without starting it: the agent
configuration is the compose files' own, every service talks to its own host's agent, and a
bad inventory or a user without root is refused before anything exists."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks._cluster import CONSUL_HTTP, ClusterError, make_plan, require_root, up
from tasks._infra_render import DATACENTERS, INVENTORY
from tasks._inventory import InventoryError, load_inventory, parse_inventory
from tests.cluster import ONE_DC, inventory_text


def _inventory(datacenters: dict[str, Any]) -> Any:
    return parse_inventory(yaml.safe_load(inventory_text(datacenters, "nsq")), "inv.yml")


def test_agents_run_the_configuration_the_compose_files_pass(tmp_path: Path) -> None:
    """Each host's Consul process gets exactly the -hcl text its committed compose file has;
    only the data directory is given apart, under the cluster's folder."""
    inventory = load_inventory(INVENTORY)
    plan = make_plan(inventory, tmp_path)
    for host in inventory.hosts:
        compose = yaml.safe_load(
            (DATACENTERS / host.datacenter / host.name / "docker-compose.yml").read_text()
        )
        command = compose["services"]["consul"]["command"]
        argv = plan.process(host.datacenter, host.name, "consul").argv
        assert argv[1:3] == ("agent", "-hcl")
        assert argv[3].strip() == command[command.index("-hcl") + 1].strip()
        assert argv[4:] == (
            "-data-dir",
            str(tmp_path / host.datacenter / host.name / "consul-data"),
        )


def test_services_register_with_their_own_hosts_agent(tmp_path: Path) -> None:
    """sensor, worker and app: the local agent on its usual port inside the namespace, the
    host's inventory address advertised, the inventory's port and the chosen mode."""
    plan = make_plan(load_inventory(INVENTORY), tmp_path, mode="http")
    services = [p for p in plan.processes if p.name.split("-")[0] in ("sensor", "worker", "app")]
    assert len(services) == 17  # 3 sensors, 10 workers, 4 apps: what the inventory lists
    for proc in services:
        env = dict(proc.env)
        host = plan.inventory.host(proc.dc, proc.host)
        assert env["CONSUL_HTTP_ADDR"] == f"127.0.0.1:{CONSUL_HTTP}"  # inside its namespace
        assert env["SVC_ADVERTISE"] == host.address
        assert env["SVC_MODE"] == "http"
    assert dict(plan.process("dc1", "h1", "worker-2").env)["SVC_PORT"] == "9012"
    assert plan.link("dc2", "h3").namespace == f"{plan.prefix}-dc2-h3"
    assert plan.link("dc2", "h3").gateway == "10.2.0.1"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["dc1"]["c1"].update(consul="server"), "has 4 Consul server(s)"),
        (lambda d: d["dc1"]["c2"].update(address="10.1.0.21"), "has the address 10.1.0.21"),
        (lambda d: d["dc1"]["c1"]["run"].update(redis=1), "cannot run 'redis'"),
        (lambda d: d["dc1"]["c1"].update(address="10.1.0.1"), "the fabric's gateway"),
        (lambda d: d["dc1"]["c1"].update(address="fd00::5"), "IPv4 only"),
    ],
)
def test_a_bad_inventory_is_refused_before_anything_starts(
    tmp_path: Path, change: Any, message: str
) -> None:
    """An even number of servers, a duplicate address, an unknown service or an address the
    fabric cannot give: refused with the reason, nothing created (not even the folder)."""
    datacenters = copy.deepcopy(ONE_DC)
    change(datacenters)
    with pytest.raises(InventoryError, match=message.replace("(", r"\(").replace(")", r"\)")):
        up(_inventory(datacenters), tmp_path / "cluster", euid=0)
    assert not (tmp_path / "cluster").exists()


def test_without_root_the_cluster_is_refused_with_exit_status_2(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match="needs root") as caught:
        up(_inventory(ONE_DC), tmp_path / "cluster", euid=1000)
    assert caught.value.code == 2
    assert not (tmp_path / "cluster").exists()
    require_root(0)  # root passes
