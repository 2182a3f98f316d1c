"""``inv infra.check``: every rendered compose file is valid, and the hosts fit together.

Per file: the compose CLI's own validation (``docker-compose config``: what ``config -q``
checks, plus the normalized file the cross-host checks read) and ``consul validate`` of the
agent configuration with the pinned Consul binary. Across files, the facts the inventory
implies: each datacenter has an odd number of Consul servers (at least 3) that all expect that
many and join each other, servers WAN-join every other datacenter, every host has a local
Consul agent its containers use, services advertise their own host's address, and no port is
bound twice on one host. All offline: nothing here talks to an engine or a host.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tasks._infra_render import COMPOSE_FILE, DATACENTERS, ROOT, Pins
from tasks._inventory import Host, Inventory

HOST_PORTS_LABEL = "dcy.host-ports"
# What the compose files need to interpolate: the image tag is given at deploy time.
CHECK_ENV = {"DCY_TAG": "infra-check"}


@dataclass(frozen=True, slots=True)
class Finding:
    where: str  # "dc1/h2", "dc1" or a file
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


@dataclass(frozen=True, slots=True)
class Agent:
    """The Consul agent a host's compose file runs, as its -hcl configuration says."""

    service: str
    hcl: str
    config: Mapping[str, Any]

    @property
    def server(self) -> bool:
        return self.config.get("server") is True

    def strings(self, key: str) -> list[str]:
        value = self.config.get(key, [])
        return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def compose_config(compose: Sequence[str], path: Path) -> tuple[dict[str, Any] | None, str]:
    """(normalized config, "") when the compose CLI accepts ``path``; (None, its error) else."""
    result = subprocess.run(
        [*compose, "--file", str(path), "config"],
        capture_output=True,
        text=True,
        env={**os.environ, **CHECK_ENV},
        cwd=path.parent,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        return None, (result.stderr.strip() or result.stdout.strip() or "rejected").splitlines()[-1]
    return yaml.safe_load(result.stdout), ""


def load_configs(
    compose: Sequence[str], inventory: Inventory, root: Path = DATACENTERS
) -> tuple[dict[Host, dict[str, Any]], list[Finding]]:
    """Every host's normalized compose file (the CLI validates them two at a time)."""
    hosts = inventory.hosts
    paths = [root / h.datacenter / h.name / COMPOSE_FILE for h in hosts]
    findings = [
        Finding(f"{h.datacenter}/{h.name}", f"{p} is missing: run `inv infra.render`")
        for h, p in zip(hosts, paths, strict=True)
        if not p.is_file()
    ]
    present = [(h, p) for h, p in zip(hosts, paths, strict=True) if p.is_file()]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda hp: compose_config(compose, hp[1]), present))
    configs = {}
    for (host, path), (config, error) in zip(present, results, strict=True):
        if config is None:
            findings.append(Finding(str(path), f"compose rejects it: {error}"))
        else:
            configs[host] = config
    return configs, findings


def parse_agent_hcl(text: str) -> dict[str, Any]:
    import hcl2
    from hcl2 import SerializationOptions

    options = SerializationOptions(
        strip_string_quotes=True, explicit_blocks=False, with_comments=False
    )
    parsed: dict[str, Any] = hcl2.loads(text, serialization_options=options)
    return parsed


def consul_agents(config: Mapping[str, Any], consul_image: str) -> list[Agent]:
    """The Consul agents a normalized compose config runs (`consul agent ... -hcl TEXT`)."""
    agents = []
    for name, service in (config.get("services") or {}).items():
        command = service.get("command") or []
        if service.get("image") != consul_image or not command or command[0] != "agent":
            continue
        hcl = "\n".join(command[i + 1] for i, arg in enumerate(command[:-1]) if arg == "-hcl")
        try:
            parsed = parse_agent_hcl(hcl)
        except Exception:  # lark raises many unrelated types for a syntax error
            parsed = {}
        agents.append(Agent(name, hcl, parsed))
    return agents


def published_ports(service: Mapping[str, Any]) -> list[str]:
    """``PORT/PROTO`` of every port a service binds on its host: ``ports`` in the short form
    (docker-compose 1.x config) or the long form (docker compose v2), plus host-network
    ports declared in the HOST_PORTS_LABEL label."""
    bound = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            if entry.get("published") not in (None, ""):
                bound.append(f"{entry['published']}/{entry.get('protocol') or 'tcp'}")
            continue
        spec, _, proto = str(entry).partition("/")
        parts = spec.rsplit(":", 2)
        if len(parts) >= 2 and parts[-2]:
            bound.append(f"{parts[-2]}/{proto or 'tcp'}")
    labels = service.get("labels") or {}
    if isinstance(labels, list):  # the list form "key=value"
        labels = dict(str(item).partition("=")[::2] for item in labels)
    bound += str(labels.get(HOST_PORTS_LABEL, "")).split()
    return bound


def cross_host_findings(
    inventory: Inventory, configs: Mapping[Host, Mapping[str, Any]], pins: Pins
) -> list[Finding]:
    findings: list[Finding] = []
    agents: dict[Host, Agent] = {}
    for host, config in configs.items():
        where = f"{host.datacenter}/{host.name}"
        found = consul_agents(config, pins.consul)
        if len(found) != 1:
            findings.append(Finding(where, f"{len(found)} local Consul agents; needs exactly 1"))
            continue
        agents[host] = found[0]
        findings += _agent_findings(where, host, found[0])
        findings += _port_findings(where, config)
        findings += _service_findings(where, host, config)
    for dc in inventory.datacenters:
        findings += _datacenter_findings(inventory, dc.name, agents)
    return findings


def _datacenter_findings(
    inventory: Inventory, dc: str, agents: Mapping[Host, Agent]
) -> list[Finding]:
    """Server count, bootstrap_expect, LAN joins within ``dc``, WAN joins to the others."""
    servers_of = {
        other.name: {
            h.address for h, a in agents.items() if h.datacenter == other.name and a.server
        }
        for other in inventory.datacenters
    }
    servers = servers_of[dc]
    findings = []
    if len(servers) < 3 or len(servers) % 2 == 0:
        findings.append(
            Finding(dc, f"{len(servers)} Consul servers; needs an odd number, at least 3")
        )
    for host, agent in agents.items():
        if host.datacenter != dc:
            continue
        where = f"{host.datacenter}/{host.name}"
        if agent.server and agent.config.get("bootstrap_expect") != len(servers):
            findings.append(
                Finding(where, f"bootstrap_expect is not {len(servers)}, the datacenter's servers")
            )
        join, peers = set(agent.strings("retry_join")), servers - {host.address}
        if not join or not join <= peers:
            findings.append(
                Finding(
                    where,
                    f"retry_join {sorted(join)} is not among the other servers of {dc} "
                    f"{sorted(peers)}",
                )
            )
        wan = set(agent.strings("retry_join_wan"))
        for other, addresses in servers_of.items():
            if agent.server and other != dc and not wan & addresses:
                findings.append(Finding(where, f"no retry_join_wan to {other}"))
    return findings


def _agent_findings(where: str, host: Host, agent: Agent) -> list[Finding]:
    if not agent.config:
        return [Finding(where, f"the -hcl of service {agent.service} is not valid HCL")]
    expected = {
        "datacenter": host.datacenter,
        "node_name": host.name,
        "bind_addr": host.address,
        "server": host.consul == "server",
    }
    return [
        Finding(where, f"Consul agent {key} is {agent.config.get(key)!r}, expected {value!r}")
        for key, value in expected.items()
        if agent.config.get(key) != value
    ]


def _port_findings(where: str, config: Mapping[str, Any]) -> list[Finding]:
    owners: dict[str, list[str]] = defaultdict(list)
    for name, service in (config.get("services") or {}).items():
        replicas = (service.get("deploy") or {}).get("replicas", 1) or 1
        for port in published_ports(service):
            owners[port] += [name] * int(replicas)
    return [
        Finding(where, f"port {port} is bound twice on the host: by {', '.join(names)}")
        for port, names in sorted(owners.items())
        if len(names) > 1
    ]


def _service_findings(where: str, host: Host, config: Mapping[str, Any]) -> list[Finding]:
    """Containers that use Consul reach this host's agent; services register this host."""
    findings = []
    for name, service in (config.get("services") or {}).items():
        env = service.get("environment") or {}
        if env.get("CONSUL_HTTP_ADDR", "").startswith("consul:"):
            hosts = service.get("extra_hosts") or []
            entries = (
                hosts.items()
                if isinstance(hosts, dict)
                else (str(item).split(":", 1) for item in hosts)
            )
            target = {k: str(v) for k, v in entries}.get("consul")
            if target != host.address:
                findings.append(
                    Finding(where, f"{name}: `consul` is {target!r}, not this host's agent")
                )
        if "SVC_PORT" in env and env.get("SVC_ADVERTISE") != host.address:
            findings.append(
                Finding(
                    where,
                    f"{name}: SVC_ADVERTISE {env.get('SVC_ADVERTISE')!r} is not "
                    f"this host's address {host.address}",
                )
            )
    return findings


def consul_binary() -> Path:
    """The pinned Consul binary; FileNotFoundError says how to build it."""
    return pinned_binary("consul")


def pinned_binary(program: str) -> Path:
    """A pinned binary (consul, nsqd, ...) from tools/build.py, loaded by path: invoke does
    not put the repository root on sys.path. FileNotFoundError says how to build it."""
    name = "dcy_tools_build"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "build.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while being defined
        spec.loader.exec_module(module)
    path: Path = module.require_binary(program)
    return path


def consul_validate_findings(consul: Path, agents: Iterable[tuple[str, Agent]]) -> list[Finding]:
    """`consul validate` of each agent's configuration, with the data_dir the official
    image's entrypoint passes as a flag."""
    findings = []
    with tempfile.TemporaryDirectory(prefix="dcy-consul-validate-") as tmp:
        for index, (where, agent) in enumerate(agents):
            folder = Path(tmp, str(index))
            folder.mkdir()
            (folder / "agent.hcl").write_text(agent.hcl)
            (folder / "image.hcl").write_text('data_dir = "/consul/data"\n')
            result = subprocess.run(
                [str(consul), "validate", str(folder)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if result.returncode != 0:
                detail = " ".join((result.stderr or result.stdout).split())
                findings.append(Finding(where, f"consul validate: {detail}"))
    return findings


def check_all(
    inventory: Inventory,
    pins: Pins,
    compose: Sequence[str],
    consul: Path,
    root: Path = DATACENTERS,
) -> tuple[list[Finding], int]:
    """Every finding, and how many compose files the compose CLI accepted."""
    configs, findings = load_configs(compose, inventory, root)
    findings += cross_host_findings(inventory, configs, pins)
    agents = [
        (f"{host.datacenter}/{host.name}", agent)
        for host, config in configs.items()
        for agent in consul_agents(config, pins.consul)
    ]
    findings += consul_validate_findings(consul, agents)
    return findings, len(configs)
