"""datacenters/inventory.yml as typed records: datacenters → hosts → what runs on each.

:func:`load_inventory` checks everything one file can get wrong on its own (names, addresses,
kinds, counts) and says where; facts that need the rendered files too (server counts, ports)
are checked by :mod:`tasks._infra_check`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

ConsulRole = Literal["server", "client"]
MODES = ("http", "nsq", "push")  # svc/_runtime.py MODES

# What `run` may name. Services (our images, SVC_* settings) get a port per instance: the base
# port of the dev system, plus PORT_STRIDE for each further instance on the same host.
SERVICE_PORTS: Mapping[str, int] = {"app": 9000, "sensor": 9001, "worker": 9002}
PORT_STRIDE = 10
# One per host at most: each binds fixed, well-known ports.
SINGLE_KINDS = ("nsqlookupd", "nsqadmin", "nginx")
KINDS = (*SINGLE_KINDS, *SERVICE_PORTS)

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
_SSH = re.compile(r"^(?:[A-Za-z0-9._-]+@)?[A-Za-z0-9.-]+(?::[0-9]{1,5})?$")
_RESERVED_DIRS = ("templates",)  # folders of datacenters/ that are not datacenters


class InventoryError(ValueError):
    """The inventory is malformed; the message names the file and the entry."""


@dataclass(frozen=True, slots=True)
class Host:
    name: str
    datacenter: str
    address: str
    ssh: str
    consul: ConsulRole
    run: tuple[tuple[str, int], ...]  # (kind, count) in KINDS order

    @property
    def docker_host(self) -> str:
        """The DOCKER_HOST that reaches this host's engine."""
        return f"ssh://{self.ssh}"

    def count(self, kind: str) -> int:
        return dict(self.run).get(kind, 0)


@dataclass(frozen=True, slots=True)
class Datacenter:
    name: str
    hosts: tuple[Host, ...]

    @property
    def servers(self) -> tuple[Host, ...]:
        return tuple(h for h in self.hosts if h.consul == "server")

    def addresses_of(self, kind: str) -> tuple[str, ...]:
        return tuple(h.address for h in self.hosts if h.count(kind))


@dataclass(frozen=True, slots=True)
class Inventory:
    registry: str
    mode: str
    datacenters: tuple[Datacenter, ...]

    @property
    def primary(self) -> str:
        return self.datacenters[0].name

    @property
    def hosts(self) -> tuple[Host, ...]:
        return tuple(h for dc in self.datacenters for h in dc.hosts)

    def datacenter(self, name: str) -> Datacenter:
        for dc in self.datacenters:
            if dc.name == name:
                return dc
        known = ", ".join(dc.name for dc in self.datacenters)
        raise InventoryError(f"no datacenter {name!r} in the inventory (known: {known})")

    def host(self, datacenter: str, name: str) -> Host:
        dc = self.datacenter(datacenter)
        for host in dc.hosts:
            if host.name == name:
                return host
        known = ", ".join(h.name for h in dc.hosts)
        raise InventoryError(f"no host {name!r} in datacenter {datacenter!r} (known: {known})")


def load_inventory(path: Path) -> Inventory:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InventoryError(f"{path}: cannot read the inventory: {exc}") from exc
    return parse_inventory(data, str(path))


def parse_inventory(data: Any, source: str = "inventory") -> Inventory:
    top = _mapping(data, source)
    _only_keys(top, {"registry", "mode", "datacenters"}, source)
    registry = _text(top.get("registry"), f"{source}: registry")
    mode = top.get("mode", "http")
    if mode not in MODES:
        raise InventoryError(f"{source}: mode {mode!r} is not one of {', '.join(MODES)}")
    dcs = _mapping(top.get("datacenters"), f"{source}: datacenters")
    if not dcs:
        raise InventoryError(f"{source}: datacenters is empty")
    datacenters = tuple(_datacenter(name, hosts, source) for name, hosts in dcs.items())
    seen: dict[str, str] = {}
    for host in (h for dc in datacenters for h in dc.hosts):
        where = f"{host.datacenter}/{host.name}"
        if host.address in seen:
            raise InventoryError(
                f"{source}: {where} has the address {host.address} of {seen[host.address]}"
            )
        seen[host.address] = where
    return Inventory(registry=registry, mode=mode, datacenters=datacenters)


def _datacenter(name: Any, hosts: Any, source: str) -> Datacenter:
    where = f"{source}: datacenter {name!r}"
    _name(name, where)
    if name in _RESERVED_DIRS:
        raise InventoryError(f"{where}: the name is reserved (datacenters/{name}/ is not a DC)")
    entries = _mapping(hosts, where)
    if not entries:
        raise InventoryError(f"{where} has no hosts")
    return Datacenter(
        name=name,
        hosts=tuple(_host(name, host, entry, source) for host, entry in entries.items()),
    )


def _host(datacenter: str, name: Any, entry: Any, source: str) -> Host:
    where = f"{source}: {datacenter}/{name}"
    _name(name, where)
    fields = _mapping(entry, where)
    _only_keys(fields, {"address", "ssh", "consul", "run"}, where)
    address = _text(fields.get("address"), f"{where}: address")
    try:
        ipaddress.ip_address(address)
    except ValueError as exc:
        raise InventoryError(f"{where}: address {address!r} is not an IP address") from exc
    ssh = _text(fields.get("ssh"), f"{where}: ssh")
    if not _SSH.match(ssh):
        raise InventoryError(f"{where}: ssh {ssh!r} is not [user@]host[:port]")
    role = fields.get("consul")
    if role not in ("server", "client"):
        raise InventoryError(f"{where}: consul must be server or client, not {role!r}")
    run = _mapping(fields.get("run", {}), f"{where}: run")
    for kind, count in run.items():
        if kind not in KINDS:
            raise InventoryError(f"{where}: cannot run {kind!r}; known: {', '.join(KINDS)}")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise InventoryError(f"{where}: {kind}: count {count!r} is not a whole number >= 0")
        if kind in SINGLE_KINDS and count > 1:
            raise InventoryError(f"{where}: {kind}: at most one per host (fixed ports)")
    return Host(
        name=name,
        datacenter=datacenter,
        address=address,
        ssh=ssh,
        consul=role,
        run=tuple((kind, run[kind]) for kind in KINDS if run.get(kind)),
    )


def _mapping(value: Any, where: str) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise InventoryError(f"{where}: expected a mapping, got {value!r}")
    return value


def _only_keys(mapping: Mapping[Any, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(str(k) for k in mapping if k not in allowed)
    if unknown:
        raise InventoryError(f"{where}: unknown key(s) {', '.join(unknown)}")


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InventoryError(f"{where}: expected a non-empty string, got {value!r}")
    return value.strip()


def _name(value: Any, where: str) -> None:
    if not isinstance(value, str) or not _NAME.match(value):
        raise InventoryError(f"{where}: names are lower-case letters, digits and '-'")


def require_quorum(inventory: Inventory, source: str = "inventory") -> None:
    """Every datacenter has an odd number of Consul servers, at least 3: what a datacenter
    needs to elect a leader and survive the loss of one server. (`inv infra.check` checks the
    same in the rendered files; this refuses an inventory before anything is started.)"""
    for dc in inventory.datacenters:
        count = len(dc.servers)
        if count < 3 or count % 2 == 0:
            raise InventoryError(
                f"{source}: datacenter {dc.name!r} has {count} Consul server(s); "
                "it needs an odd number, at least 3"
            )
