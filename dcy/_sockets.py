"""How many TCP connections this process holds to an address, as the kernel sees them.

Read from ``/proc`` (Linux): the sockets among the process's file descriptors, matched with
the kernel's table of TCP connections by their inode. Counted this way, the number includes
connections the HTTP client pools as idle and those it is still closing: what the agent sees.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
import urllib.parse
from pathlib import Path

_ESTABLISHED = "01"


@functools.lru_cache(maxsize=16)
def _targets(base_url: str) -> frozenset[tuple[str, int]]:
    """The addresses (as /proc prints them: hex, host byte order) and port of a URL."""
    parts = urllib.parse.urlsplit(base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    found: set[tuple[str, int]] = set()
    try:
        infos = socket.getaddrinfo(parts.hostname or "localhost", port, type=socket.SOCK_STREAM)
    except OSError:
        return frozenset()
    for family, _, _, _, sockaddr in infos:
        packed = ipaddress.ip_address(sockaddr[0]).packed
        if family == socket.AF_INET:
            found.add((packed[::-1].hex().upper(), port))
            # An IPv4 peer of an IPv6 socket appears as ::ffff:a.b.c.d.
            mapped = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + packed).packed
            found.add((_proc_ipv6(mapped), port))
        else:
            found.add((_proc_ipv6(packed), port))
    return frozenset(found)


def _proc_ipv6(packed: bytes) -> str:
    # /proc/net/tcp6 prints each 32-bit word in host (little-endian) order.
    return "".join(packed[i : i + 4][::-1].hex().upper() for i in range(0, 16, 4))


def count_connections(base_url: str, pid: int | None = None) -> int | None:
    """Established TCP connections of process ``pid`` (this one by default) to the host and
    port of ``base_url``; None when /proc cannot tell."""
    proc = Path("/proc") / (str(pid) if pid is not None else "self")
    targets = _targets(base_url)
    try:
        inodes = set()
        for fd in os.scandir(proc / "fd"):
            try:
                target = os.readlink(fd.path)
            except OSError:
                continue  # closed meanwhile
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        count = 0
        for table in ("tcp", "tcp6"):
            path = proc / "net" / table
            if not path.exists():
                continue
            for line in path.read_text().splitlines()[1:]:
                fields = line.split()
                remote_host, _, remote_port = fields[2].partition(":")
                if (
                    fields[3] == _ESTABLISHED
                    and fields[9] in inodes
                    and (remote_host, int(remote_port, 16)) in targets
                ):
                    count += 1
        return count
    except OSError:
        return None
