"""datacenters/: the inventory, the rendered per-host compose files (no drift), and the
offline checks of `inv infra.check` (real docker-compose and Consul binaries)."""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks._infra_check import (
    Agent,
    check_all,
    compose_config,
    consul_binary,
    consul_validate_findings,
    cross_host_findings,
    load_configs,
)
from tasks._infra_render import (
    CONSUL_HOST_PORTS,
    DATACENTERS,
    INVENTORY,
    Pins,
    drift,
    nsq_services,
    read_pins,
    render_all,
    rendered_on_disk,
    write_rendered,
)
from tasks._inventory import Host, Inventory, InventoryError, load_inventory, parse_inventory

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ["docker-compose"]


@pytest.fixture(scope="module")
def inventory() -> Inventory:
    return load_inventory(INVENTORY)


@pytest.fixture(scope="module")
def pins() -> Pins:
    return read_pins()


@pytest.fixture(scope="module")
def committed_configs(inventory: Inventory) -> dict[Host, dict[str, Any]]:
    """docker-compose's normalized view of every committed host file (read once)."""
    configs, findings = load_configs(COMPOSE, inventory)
    assert findings == []
    return configs


def _host(configs: dict[Host, dict[str, Any]], dc: str, name: str) -> Host:
    return next(h for h in configs if (h.datacenter, h.name) == (dc, name))


def _small_inventory(roles: list[str], extra_dc: bool = False) -> dict[str, Any]:
    hosts = {
        f"h{i + 1}": {
            "address": f"10.9.0.{i + 1}",
            "ssh": f"h{i + 1}",
            "consul": role,
            "run": {"worker": 1},
        }
        for i, role in enumerate(roles)
    }
    dcs: dict[str, Any] = {"east": hosts}
    if extra_dc:
        dcs["west"] = {
            f"w{i}": {"address": f"10.8.0.{i}", "ssh": f"w{i}", "consul": "server"}
            for i in (1, 2, 3)
        }
    return {"registry": "r.example/dcy", "mode": "http", "datacenters": dcs}


# --- the inventory ---------------------------------------------------------------------------


def test_example_inventory_has_two_datacenters_of_three_hosts(inventory: Inventory) -> None:
    """The example: dc1 and dc2, three hosts each, every host a Consul server reached by SSH."""
    assert [dc.name for dc in inventory.datacenters] == ["dc1", "dc2"]
    assert [[h.name for h in dc.hosts] for dc in inventory.datacenters] == [["h1", "h2", "h3"]] * 2
    assert inventory.host("dc1", "h1").docker_host == "ssh://deploy@h1.dc1.example.net"
    assert all(len(dc.servers) == 3 for dc in inventory.datacenters)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(mode="fast"), "mode 'fast' is not one of"),
        (lambda d: d["datacenters"]["east"]["h1"].update(address="h1.local"), "not an IP"),
        (lambda d: d["datacenters"]["east"]["h2"].update(address="10.9.0.1"), "has the address"),
        (lambda d: d["datacenters"]["east"]["h1"]["run"].update(redis=1), "cannot run 'redis'"),
        (lambda d: d["datacenters"]["east"]["h1"]["run"].update(nginx=2), "at most one per host"),
        (lambda d: d["datacenters"]["east"]["h1"].update(consul="leader"), "server or client"),
        (lambda d: d["datacenters"]["east"]["h1"].update(ssh="a b"), "[user@]host[:port]"),
        (lambda d: d["datacenters"].update(templates={}), "reserved"),
        (lambda d: d.update(extra=1), "unknown key(s) extra"),
    ],
)
def test_inventory_mistakes_are_reported_with_where(change: Any, message: str) -> None:
    """Each malformed entry raises InventoryError naming the entry and the problem."""
    data = _small_inventory(["server"] * 3)
    change(data)
    with pytest.raises(InventoryError) as caught:
        parse_inventory(data, "inv.yml")
    assert message in str(caught.value) and "inv.yml" in str(caught.value)


def test_unknown_datacenter_or_host_names_the_known_ones(inventory: Inventory) -> None:
    """Looking up a host that is not there says which ones are."""
    with pytest.raises(
        InventoryError, match=r"no host 'h9' in datacenter 'dc1' \(known: h1, h2, h3\)"
    ):
        inventory.host("dc1", "h9")
    with pytest.raises(InventoryError, match=r"known: dc1, dc2"):
        inventory.host("dc7", "h1")


# --- rendering and drift -----------------------------------------------------------------------


def test_committed_host_files_are_what_the_inventory_renders(
    inventory: Inventory, pins: Pins, tmp_path: Path
) -> None:
    """Re-rendering into a temporary folder gives exactly the committed files: no drift."""
    write_rendered(render_all(inventory, pins), tmp_path)
    assert rendered_on_disk(tmp_path) == rendered_on_disk(DATACENTERS)
    assert drift(render_all(inventory, pins)) == []
    assert len(rendered_on_disk(DATACENTERS)) == 6


def test_drift_names_changed_missing_and_stale_files(
    inventory: Inventory, pins: Pins, tmp_path: Path
) -> None:
    """A hand edit, a deleted file and a host no longer in the inventory are each reported, and
    rendering again repairs all three."""
    files = render_all(inventory, pins)
    write_rendered(files, tmp_path)
    edited = tmp_path / "dc1" / "h1" / "docker-compose.yml"
    edited.write_text(edited.read_text().replace("9001", "9005"))
    (tmp_path / "dc2" / "h3" / "docker-compose.yml").unlink()
    stale = tmp_path / "dc1" / "h9" / "docker-compose.yml"
    stale.parent.mkdir()
    stale.write_text("services: {}\n")
    assert drift(files, tmp_path) == [
        "dc2/h3/docker-compose.yml: missing",
        "dc1/h9/docker-compose.yml: not in the inventory",
        "dc1/h1/docker-compose.yml: differs from what the inventory renders",
    ]
    changes = write_rendered(files, tmp_path)
    assert len(changes) == 3 and not stale.parent.exists()
    assert drift(files, tmp_path) == [] and write_rendered(files, tmp_path) == []


def test_host_files_run_what_the_inventory_says(
    committed_configs: dict[Host, dict[str, Any]], pins: Pins
) -> None:
    """Each host runs its agent, an nsqd that knows its own datacenter's lookupds, and the
    inventory's services, with further instances 10 ports up; images are the pinned ones."""
    h1 = _host(committed_configs, "dc1", "h1")
    services = committed_configs[h1]["services"]
    assert set(services) == {"consul", "nsqd", "nsqlookupd", "nsqadmin", "sensor", "worker-1",
                             "worker-2", "renderer", "nginx"}  # fmt: skip
    assert services["consul"]["image"] == pins.consul and services["nsqd"]["image"] == pins.nsq
    assert services["nginx"]["image"] == pins.nginx
    assert [services[w]["environment"]["SVC_PORT"] for w in ("worker-1", "worker-2")] == [
        "9002", "9012",
    ]  # fmt: skip
    assert services["sensor"]["image"] == "registry.example.net/dcy/sensor:infra-check"
    assert services["sensor"]["environment"]["SVC_MODE"] == "nsq"
    lookupds = [a for a in services["nsqd"]["command"] if a.startswith("--lookupd-tcp-address")]
    # The lookupds' TCP port as the renderer registers nsqlookupd (no dev port spelled here).
    lookupd = next(s for s in nsq_services(h1) if s.name == "nsqlookupd")
    tcp_port = dict(lookupd.meta)["tcp_port"]
    assert lookupds == [
        f"--lookupd-tcp-address=10.1.0.11:{tcp_port}",
        f"--lookupd-tcp-address=10.1.0.12:{tcp_port}",
    ]


def test_services_need_an_image_tag_to_run() -> None:
    """Without DCY_TAG, compose refuses a host file and says what to set."""
    path = DATACENTERS / "dc1" / "h1" / "docker-compose.yml"
    env = {k: v for k, v in os.environ.items() if k != "DCY_TAG"}
    result = subprocess.run(
        [*COMPOSE, "--file", str(path), "config", "-q"], env=env, capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    assert result.returncode != 0 and "set DCY_TAG to the image tag to run" in result.stderr


# --- checks --------------------------------------------------------------------------------------


def test_infra_check_passes_on_the_committed_tree() -> None:
    """`inv infra.check` validates all six files with docker-compose and consul and exits 0."""
    result = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "inv"), "infra.check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 compose files valid (docker-compose), Consul configs valid" in result.stdout
    assert "dc1: 3 servers / 3 hosts, dc2: 3 servers / 3 hosts" in result.stdout


def test_committed_tree_has_no_cross_host_findings(
    inventory: Inventory, committed_configs: dict[Host, dict[str, Any]], pins: Pins
) -> None:
    """The example passes every cross-host rule."""
    assert cross_host_findings(inventory, committed_configs, pins) == []


def test_a_port_bound_twice_on_a_host_is_reported(
    inventory: Inventory, committed_configs: dict[Host, dict[str, Any]], pins: Pins
) -> None:
    """Publishing one of the agent's host ports from another container of the same host is a
    finding."""
    configs = copy.deepcopy(committed_configs)
    h1 = _host(configs, "dc1", "h1")
    taken = CONSUL_HOST_PORTS["client"][-1]  # bound by every agent, server or client
    number, protocol = taken.split("/")
    configs[h1]["services"]["sensor"]["ports"].append(f"10.1.0.11:{number}:{number}/{protocol}")
    assert [str(f) for f in cross_host_findings(inventory, configs, pins)] == [
        f"dc1/h1: port {taken} is bound twice on the host: by consul, sensor"
    ]


def test_a_host_without_an_agent_and_an_even_server_count_are_reported(
    inventory: Inventory, committed_configs: dict[Host, dict[str, Any]], pins: Pins
) -> None:
    """Dropping dc2/h2's agent leaves the host without one and dc2 with two servers; the
    other servers then retry-join an address that is no server."""
    configs = copy.deepcopy(committed_configs)
    del configs[_host(configs, "dc2", "h2")]["services"]["consul"]
    found = [str(f) for f in cross_host_findings(inventory, configs, pins)]
    assert "dc2/h2: 0 local Consul agents; needs exactly 1" in found
    assert "dc2: 2 Consul servers; needs an odd number, at least 3" in found
    assert any(f.startswith("dc2/h1: bootstrap_expect is not 2") for f in found)
    assert any(
        f.startswith("dc2/h1: retry_join ['10.2.0.12', '10.2.0.13'] is not among") for f in found
    )


def test_containers_must_use_and_advertise_their_own_host(
    inventory: Inventory, committed_configs: dict[Host, dict[str, Any]], pins: Pins
) -> None:
    """A service advertising another host's address, or using another host's agent, is found."""
    configs = copy.deepcopy(committed_configs)
    app = configs[_host(configs, "dc1", "h3")]["services"]["app"]
    app["environment"]["SVC_ADVERTISE"] = "10.1.0.11"
    app["extra_hosts"] = ["consul:10.1.0.12"]
    assert sorted(str(f) for f in cross_host_findings(inventory, configs, pins)) == [
        "dc1/h3: app: SVC_ADVERTISE '10.1.0.11' is not this host's address 10.1.0.13",
        "dc1/h3: app: `consul` is '10.1.0.12', not this host's agent",
    ]


def test_a_server_without_a_wan_join_is_reported(
    inventory: Inventory, committed_configs: dict[Host, dict[str, Any]], pins: Pins
) -> None:
    """A server whose retry_join_wan names no server of the other datacenter is found."""
    configs = copy.deepcopy(committed_configs)
    command = configs[_host(configs, "dc1", "h2")]["services"]["consul"]["command"]
    command[-1] = "\n".join(
        line for line in command[-1].splitlines() if not line.startswith("retry_join_wan")
    )
    assert [str(f) for f in cross_host_findings(inventory, configs, pins)] == [
        "dc1/h2: no retry_join_wan to dc2"
    ]


def test_even_server_count_from_the_inventory_fails_the_check(pins: Pins, tmp_path: Path) -> None:
    """Four servers in a datacenter render and validate, but the check reports the count."""
    inventory = parse_inventory(_small_inventory(["server"] * 4))
    write_rendered(render_all(inventory, pins), tmp_path)
    findings, valid = check_all(inventory, pins, COMPOSE, consul_binary(), tmp_path)
    assert valid == 4
    assert [str(f) for f in findings] == ["east: 4 Consul servers; needs an odd number, at least 3"]


def test_client_agents_join_the_servers_and_pass_every_check(pins: Pins, tmp_path: Path) -> None:
    """A client host gets an agent that retry-joins its datacenter's servers, no WAN join and no
    server ports; servers WAN-join the other datacenter; Consul and compose accept all of it."""
    inventory = parse_inventory(_small_inventory(["server"] * 3 + ["client"], extra_dc=True))
    files = render_all(inventory, pins)
    write_rendered(files, tmp_path)
    findings, valid = check_all(inventory, pins, COMPOSE, consul_binary(), tmp_path)
    assert (findings, valid) == ([], 7)
    client = yaml.safe_load(files[Path("east", "h4", "docker-compose.yml")])["services"]["consul"]
    hcl = client["command"][-1]
    assert "server             = false" in hcl and "bootstrap_expect" not in hcl
    assert 'retry_join     = ["10.9.0.1", "10.9.0.2", "10.9.0.3"]' in hcl
    server_only = set(CONSUL_HOST_PORTS["server"]) - set(CONSUL_HOST_PORTS["client"])
    assert "retry_join_wan" not in hcl and server_only
    assert not server_only & set(client["labels"]["dcy.host-ports"].split())
    server = yaml.safe_load(files[Path("east", "h1", "docker-compose.yml")])["services"]["consul"]
    assert 'retry_join_wan = ["10.8.0.1", "10.8.0.2", "10.8.0.3"]' in server["command"][-1]
    assert server_only <= set(server["labels"]["dcy.host-ports"].split())


def test_consul_rejections_are_findings(tmp_path: Path) -> None:
    """An agent configuration the pinned Consul rejects is reported with Consul's reason."""
    agent = Agent("consul", 'datacenter = "dc1"\nbogus_key = 1\n', {})
    (finding,) = consul_validate_findings(consul_binary(), [("dc1/h1", agent)])
    assert finding.where == "dc1/h1" and "invalid config key bogus_key" in finding.problem


def test_compose_rejections_are_findings(tmp_path: Path) -> None:
    """A compose file docker-compose rejects yields None and its error line."""
    path = tmp_path / "docker-compose.yml"
    path.write_text("services:\n  a:\n    image: x\n    ports: 8080\n")
    config, error = compose_config(COMPOSE, path)
    assert config is None and "ports" in error
