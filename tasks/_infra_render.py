"""Render ``datacenters/<dc>/<host>/docker-compose.yml`` from the inventory (``inv infra.render``).

The rendered files are committed, so a deploy runs exactly what was reviewed; :func:`drift`
tells whether they still match what the inventory and templates render. Image tags come from
the ``x-images`` section of the top-level docker-compose.yml, the one place they are pinned.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml

from tasks._inventory import PORT_STRIDE, SERVICE_PORTS, Datacenter, Host, Inventory

ROOT = Path(__file__).resolve().parent.parent
DATACENTERS = ROOT / "datacenters"
INVENTORY = DATACENTERS / "inventory.yml"
TEMPLATES = DATACENTERS / "templates"
TOP_COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_FILE = "docker-compose.yml"

# Ports a Consul agent binds on the host network (server RPC 8300 and WAN gossip 8302 only on
# servers): https://developer.hashicorp.com/consul/docs/install/ports
CONSUL_HOST_PORTS: Mapping[str, tuple[str, ...]] = {
    "server": (
        "8300/tcp", "8301/tcp", "8301/udp", "8302/tcp", "8302/udp",
        "8500/tcp", "8600/tcp", "8600/udp",
    ),
    "client": ("8301/tcp", "8301/udp", "8500/tcp", "8600/tcp", "8600/udp"),
}  # fmt: skip


class RenderError(RuntimeError):
    """The inventory, the templates or the pinned images cannot be rendered."""


@dataclass(frozen=True, slots=True)
class Pins:
    """What the top-level docker-compose.yml pins for every compose file."""

    consul: str
    nsq: str
    nginx: str
    nginx_watch: str  # the nginx service's reload script, compose-escaped (`$$`)


@dataclass(frozen=True, slots=True)
class NsqService:
    """An NSQ daemon as the local Consul agent registers it (the Procfile's dcy-register)."""

    name: str
    port: int
    check_port: int
    tags: tuple[str, ...]
    meta: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class ServiceInstance:
    name: str  # the compose service name
    kind: str  # sensor, worker or app: the image
    port: int


def read_pins(compose: Path = TOP_COMPOSE) -> Pins:
    try:
        data = yaml.safe_load(compose.read_text())
        images = data["x-images"]
        return Pins(
            consul=str(images["consul"]),
            nsq=str(images["nsq"]),
            nginx=str(images["nginx"]),
            nginx_watch=str(data["x-nginx-watch"]),
        )
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise RenderError(f"{compose}: no x-images/x-nginx-watch to render with: {exc}") from exc


def service_instances(host: Host) -> tuple[ServiceInstance, ...]:
    """sensor, worker and app containers of ``host``: ``worker`` alone, or ``worker-1``, ..."""
    instances = []
    for kind, base in sorted(SERVICE_PORTS.items(), key=lambda item: item[1]):
        count = host.count(kind)
        for i in range(count):
            name = kind if count == 1 else f"{kind}-{i + 1}"
            instances.append(ServiceInstance(name, kind, base + PORT_STRIDE * i))
    return tuple(instances)


def nsq_services(host: Host) -> tuple[NsqService, ...]:
    services = [NsqService("nsqd", 4150, 4151, ("tcp",), (("http_port", "4151"),))]
    if host.count("nsqlookupd"):
        services.append(NsqService("nsqlookupd", 4161, 4161, ("http",), (("tcp_port", "4160"),)))
    if host.count("nsqadmin"):
        services.append(NsqService("nsqadmin", 4171, 4171, ("http", "ui"), ()))
    return tuple(services)


def consul_joins(inventory: Inventory, dc: Datacenter, host: Host) -> tuple[list[str], list[str]]:
    """(retry_join, retry_join_wan) of ``host``'s agent: the other servers of its datacenter;
    for a server also every server of the other datacenters."""
    join = [s.address for s in dc.servers if s is not host]
    if host.consul != "server":
        return join, []
    wan = [s.address for other in inventory.datacenters if other is not dc for s in other.servers]
    return join, wan


def template_environment(templates: Path = TEMPLATES) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # YAML and HCL, not HTML; every value was validated by the inventory
    )


def agent_context(inventory: Inventory, dc: Datacenter, host: Host) -> dict[str, Any]:
    """What consul-agent.hcl.j2 renders ``host``'s agent from."""
    join, join_wan = consul_joins(inventory, dc, host)
    return {
        "inventory": inventory,
        "dc": dc,
        "host": host,
        "join": join,
        "join_wan": join_wan,
        "nsq": nsq_services(host),
    }


def render_agent(
    inventory: Inventory, dc: Datacenter, host: Host, templates: Path = TEMPLATES
) -> str:
    """``host``'s Consul agent configuration: what its compose file passes as ``-hcl``, and
    what the local cluster (``inv infra.up --local``) runs in the host's namespace."""
    try:
        agent = template_environment(templates).get_template("consul-agent.hcl.j2")
        return agent.render(agent_context(inventory, dc, host))
    except jinja2.TemplateError as exc:
        raise RenderError(f"{templates}: {exc}") from exc


def render_all(inventory: Inventory, pins: Pins, templates: Path = TEMPLATES) -> dict[Path, str]:
    """Every host's compose file, by path relative to ``datacenters/``."""
    env = template_environment(templates)
    try:
        compose = env.get_template("docker-compose.yml.j2")
        agent = env.get_template("consul-agent.hcl.j2")
        files: dict[Path, str] = {}
        for dc in inventory.datacenters:
            for host in dc.hosts:
                context = agent_context(inventory, dc, host)
                context["consul_hcl"] = agent.render(context)
                context.update(
                    images=pins,
                    nginx_watch=pins.nginx_watch,
                    consul_host_ports=CONSUL_HOST_PORTS[host.consul],
                    lookupds=dc.addresses_of("nsqlookupd"),
                    services=service_instances(host),
                )
                files[Path(dc.name, host.name, COMPOSE_FILE)] = compose.render(context)
    except jinja2.TemplateError as exc:
        raise RenderError(f"{templates}: {exc}") from exc
    return files


def rendered_on_disk(root: Path = DATACENTERS) -> dict[Path, str]:
    """The compose files under ``root/<dc>/<host>/`` now."""
    return {
        path.relative_to(root): path.read_text()
        for path in sorted(root.glob(f"*/*/{COMPOSE_FILE}"))
    }


def drift(expected: Mapping[Path, str], root: Path = DATACENTERS) -> list[str]:
    """How the files under ``root`` differ from ``expected``; empty when they match."""
    actual = rendered_on_disk(root)
    problems = [f"{p}: missing" for p in sorted(expected.keys() - actual.keys())]
    problems += [f"{p}: not in the inventory" for p in sorted(actual.keys() - expected.keys())]
    problems += [
        f"{p}: differs from what the inventory renders"
        for p in sorted(expected.keys() & actual.keys())
        if expected[p] != actual[p]
    ]
    return problems


def write_rendered(files: Mapping[Path, str], root: Path = DATACENTERS) -> list[str]:
    """Write ``files`` under ``root`` and remove host files no longer in the inventory;
    return what changed (nothing when everything was current)."""
    changes = []
    for relative, text in sorted(files.items()):
        path = root / relative
        if path.is_file() and path.read_text() == text:
            continue
        changes.append(f"{'updated' if path.exists() else 'created'} {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.tmp")
        temp.write_text(text)
        temp.replace(path)
    for relative in sorted(rendered_on_disk(root).keys() - files.keys()):
        path = root / relative
        path.unlink()
        changes.append(f"removed {path}")
        for folder in (path.parent, path.parent.parent):
            if folder != root and not any(folder.iterdir()):
                folder.rmdir()
    return changes
