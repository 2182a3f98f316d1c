"""Linux network namespaces for the local cluster: a fabric and one namespace per host.

The fabric namespace holds one bridge with a gateway address on every subnet the hosts use and
forwards between them (``ip_forward`` is set inside the fabric only). Each host namespace gets
``lo``, an ``eth0`` whose other end is a port of the bridge, its address and a default route
via its subnet's gateway. Every link is created inside a namespace (``ip -n NS link add ...
peer ... netns FABRIC``), so the machine's own namespace never sees an interface, a route or
an address of the cluster, and no packet can leave the fabric.

Everything runs ``ip`` with an argument list (never a shell); names come from the inventory,
which allows only ``[a-z0-9-]``.
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

BRIDGE = "br0"
HOST_LINK = "eth0"
PREFIX_BITS = 24  # each host's subnet: its address's /24, gateway at .1


class NetnsError(RuntimeError):
    """An ``ip`` command failed; the message has its output."""


@dataclass(frozen=True, slots=True)
class HostLink:
    namespace: str
    address: str  # inventory address
    port: str  # the bridge port in the fabric that is this host's cable

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{self.address}/{PREFIX_BITS}", strict=False)

    @property
    def gateway(self) -> str:
        return gateway_of(self.network)


def gateway_of(network: ipaddress.IPv4Network) -> str:
    return str(network.network_address + 1)


def subnet_problem(address: str) -> str | None:
    """Why ``address`` cannot be a host on the fabric, or None."""
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        return f"{address} is not an IPv4 address (the local cluster runs IPv4 only)"
    network = ipaddress.IPv4Network(f"{ip}/{PREFIX_BITS}", strict=False)
    if ip in (network.network_address, network.broadcast_address):
        return f"{address} is the network or broadcast address of {network}"
    if str(ip) == gateway_of(network):
        return f"{address} is the fabric's gateway of {network}"
    if ip.is_loopback or ip.is_multicast or ip.is_unspecified:
        return f"{address} cannot be a host address"
    return None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and result.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {result.stderr.strip() or result.stdout.strip()}")
    return result


def namespaces() -> list[str]:
    """Every named namespace (``ip netns list`` lines are ``NAME`` or ``NAME (id: N)``)."""
    return [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()]


def pids(namespace: str) -> list[int]:
    result = ip("netns", "pids", namespace, check=False)
    return [int(word) for word in result.stdout.split() if word.isdigit()]


def create_fabric(namespace: str, networks: Sequence[ipaddress.IPv4Network]) -> None:
    ip("netns", "add", namespace)
    ip("-n", namespace, "link", "set", "lo", "up")
    ip("-n", namespace, "link", "add", BRIDGE, "type", "bridge")
    for network in networks:
        ip("-n", namespace, "addr", "add", f"{gateway_of(network)}/{PREFIX_BITS}", "dev", BRIDGE)
    ip("-n", namespace, "link", "set", BRIDGE, "up")
    # ip_forward is per namespace: routing between the subnets happens here and only here.
    ip("netns", "exec", namespace, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")


def create_host(fabric: str, link: HostLink) -> None:
    ns = link.namespace
    ip("netns", "add", ns)
    ip("-n", ns, "link", "set", "lo", "up")
    ip("-n", ns, "link", "add", HOST_LINK, "type", "veth", "peer", "name", link.port,
       "netns", fabric)  # fmt: skip
    ip("-n", fabric, "link", "set", link.port, "master", BRIDGE)
    ip("-n", fabric, "link", "set", link.port, "up")
    ip("-n", ns, "addr", "add", f"{link.address}/{PREFIX_BITS}", "dev", HOST_LINK)
    connect(link)


def connect(link: HostLink) -> None:
    """The host's cable plugged in: link up and the default route back (a link going down
    takes its routes with it)."""
    ip("-n", link.namespace, "link", "set", HOST_LINK, "up")
    ip("-n", link.namespace, "route", "replace", "default", "via", link.gateway)


def disconnect(link: HostLink) -> None:
    """The host's cable pulled, from inside the host: nothing reaches it, it reaches nothing."""
    ip("-n", link.namespace, "link", "set", HOST_LINK, "down")


def delete(namespace: str) -> None:
    """Remove ``namespace`` (its links go with it); nothing when it is already gone."""
    result = ip("netns", "delete", namespace, check=False)
    if result.returncode != 0 and namespace in namespaces():
        raise NetnsError(f"ip netns delete {namespace}: {result.stderr.strip()}")
