"""The Consul agent configuration of the compose files, loaded by a real agent: the NSQ daemons
end up in the catalog exactly as the Procfile's dcy-register lines register them."""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dcy._register_cli._args import parse_plan
from tasks._infra_check import consul_agents
from tasks._infra_render import read_pins, render_all
from tasks._inventory import load_inventory
from tests.harness import (
    ConsulAgent,
    ManagedProcess,
    free_ports,
    http_json,
    start_on_free_ports,
)
from tools.build import require_binary

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _procfile_registrations() -> dict[str, Any]:
    plans = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        argv = shlex.split(command) if not line.startswith("#") else []
        # A line may wait for something first (`until ...; done; dcy-register ...`).
        starts = [i for i, word in enumerate(argv) if Path(word).name == "dcy-register"]
        if starts:
            plan, _ = parse_plan(argv[starts[0] + 1 :])
            plans[name] = plan.services[0]
    return plans


def _first_output(agent_url: str, check_id: str, timeout: float = 30.0) -> str:
    """The output of the check's first run, which names the URL Consul requested (the API
    shows no definition for checks from agent configuration)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        output = str(http_json(f"{agent_url}/v1/agent/checks")[check_id]["Output"])
        if output:
            return output
        time.sleep(0.1)
    pytest.fail(f"check {check_id} did not run within {timeout:g}s")


def _names_url(output: str, url: str) -> bool:
    """Consul's check output names the URL as `HTTP GET URL: ...` or `Get "URL": ...`."""
    return re.search(rf'(GET |"){re.escape(url)}("|:)', output) is not None


def _services_only(hcl: str) -> str:
    """The `services` blocks of an agent configuration (the rest binds host addresses)."""
    start = hcl.index("services {")
    return hcl[start:]


@pytest.fixture
def compose_agent(tmp_path: Path) -> Iterator[str]:
    """Consul run with docker-compose.yml's exact agent arguments (dev.hcl from the checkout,
    the -data-dir the official image adds) and free ports instead of the dev system's."""
    command = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["consul"][
        "command"
    ]
    args = [a.replace("/consul/dev.hcl", str(ROOT / "consul" / "dev.hcl")) for a in command]
    names = ("http", "dns", "serf-lan", "serf-wan", "server", "grpc", "grpc-tls")

    def launch(chosen: list[int]) -> ManagedProcess:
        argv = [str(require_binary("consul")), *args, f"-data-dir={tmp_path / 'data'}"]
        argv += [f"-{name}-port={port}" for name, port in zip(names, chosen, strict=True)]
        proc = ManagedProcess(argv, tmp_path / "consul.log")
        proc.spawn()
        return proc

    def leader(chosen: list[int]) -> Any:
        return http_json(f"http://127.0.0.1:{chosen[0]}/v1/status/leader")

    proc, ports = start_on_free_ports(len(names), launch, leader, "compose agent", timeout=60)
    try:
        yield f"http://127.0.0.1:{ports[0]}"
    finally:
        proc.stop()


def test_compose_agent_serves_other_containers_and_registers_the_nsq_daemons(
    compose_agent: str,
) -> None:
    """The agent docker-compose.yml starts is dev.hcl's (datacenter dev, domain sd, UI) with its
    HTTP API on every interface (flags override the file's loopback), and lists nsqd,
    nsqlookupd and nsqadmin with the Procfile's IDs, ports, tags and meta, each with one HTTP
    /ping check every 2s on the daemon's compose service name."""
    config = http_json(f"{compose_agent}/v1/agent/self")["DebugConfig"]
    assert config["ClientAddrs"] == ["0.0.0.0"]
    assert (config["Datacenter"], config["DNSDomain"]) == ("dev", "sd")
    assert config["UIConfig"]["Enabled"] is True
    services = http_json(f"{compose_agent}/v1/agent/services")
    checks = http_json(f"{compose_agent}/v1/agent/checks")
    registrations = _procfile_registrations()
    assert set(registrations) == {"nsqd", "nsqlookupd", "nsqadmin"}
    for name, plan in registrations.items():
        service = services[plan.service_id]
        assert (service["Service"], service["Address"], service["Port"]) == (name, name, plan.port)
        assert tuple(service["Tags"]) == plan.tags
        assert service["Meta"] == dict(plan.meta)
        (check,) = [c for c in checks.values() if c["ServiceID"] == plan.service_id]
        assert (check["Type"], check["Interval"], check["Timeout"]) == ("http", "2s", "2s")
        url = plan.check.url.replace("127.0.0.1", name)
        assert _names_url(_first_output(compose_agent, check["CheckID"]), url)


def test_rendered_host_agent_registers_its_own_nsq_daemons(
    consul_factory: Callable[..., ConsulAgent],
) -> None:
    """The services of dc1/h1's rendered agent name the host's address (10.1.0.11); loaded by
    a real agent — with that address moved to loopback, because a test must never make the
    agent's checks reach a private-range address — they are its nsqd, nsqlookupd and nsqadmin,
    checked on that address."""
    inventory, pins = load_inventory(ROOT / "datacenters" / "inventory.yml"), read_pins()
    files = render_all(inventory, pins)
    config = yaml.safe_load(files[Path("dc1", "h1", "docker-compose.yml")])
    (agent_config,) = consul_agents(config, pins.consul)
    services_hcl = _services_only(agent_config.hcl)
    assert services_hcl.count("10.1.0.11") >= 6  # three addresses, three check URLs
    # The daemons' ports move too (to free ones): the agent's checks must not knock on the
    # ports a running dev system owns.
    rendered_ports = (4150, 4151, 4161, 4171)
    moved = dict(zip(rendered_ports, free_ports(len(rendered_ports)), strict=True))
    loaded = services_hcl.replace("10.1.0.11", LOOPBACK_HOST)
    for port in rendered_ports:
        assert re.search(rf"\b{port}\b", loaded), port
        loaded = re.sub(rf"\b{port}\b", str(moved[port]), loaded)
    agent = consul_factory(hcl=[loaded])
    services = agent.api("/v1/agent/services")
    assert {s["Service"]: (s["Address"], s["Port"]) for s in services.values()} == {
        "nsqd": (LOOPBACK_HOST, moved[4150]),
        "nsqlookupd": (LOOPBACK_HOST, moved[4161]),
        "nsqadmin": (LOOPBACK_HOST, moved[4171]),
    }
    for check_id, http_port in (
        ("nsqd-ping", moved[4151]),
        ("nsqlookupd-ping", moved[4161]),
        ("nsqadmin-ping", moved[4171]),
    ):
        url = f"http://{LOOPBACK_HOST}:{http_port}/ping"
        assert _names_url(_first_output(agent.url, check_id), url)


# Stands in for the inventory's host address: on loopback nothing answers, and nothing
# leaves the machine.
LOOPBACK_HOST = "127.0.0.11"
