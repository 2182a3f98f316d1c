#!/usr/bin/env python3
"""Container entrypoint of the service images: ``dcy-entry PROGRAM [ARGS...]``.

A service registers in Consul the address that others should call it on (``SVC_ADVERTISE``).
Inside a container the listen address is ``0.0.0.0`` and loopback is useless to anyone else,
so unless ``SVC_ADVERTISE`` is set (as the per-host compose files do, with the host's address)
this sets it to the address the container's own hostname resolves to: its address on the
compose network, which differs for each replica and so cannot be written into a compose file.

Then it replaces itself with PROGRAM (``os.execvp``): the service becomes the container's PID 1
and receives ``docker stop``'s SIGTERM directly. Standard library only.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping, MutableMapping, Sequence


def container_address() -> str:
    """The address this container's hostname resolves to (Docker writes it to /etc/hosts)."""
    return socket.gethostbyname(socket.gethostname())


def with_advertise(environ: Mapping[str, str], address: str) -> dict[str, str]:
    """``environ`` with SVC_ADVERTISE set to ``address`` unless it already has a value."""
    updated = dict(environ)
    if not updated.get("SVC_ADVERTISE"):
        updated["SVC_ADVERTISE"] = address
    return updated


def main(argv: Sequence[str], environ: MutableMapping[str, str]) -> int:
    if len(argv) < 2:
        print("usage: dcy-entry PROGRAM [ARGS...]", file=sys.stderr)
        return 2
    if not environ.get("SVC_ADVERTISE"):
        try:
            address = container_address()
        except OSError as exc:
            print(f"dcy-entry: cannot resolve this container's address: {exc}", file=sys.stderr)
            return 1
        environ.update(with_advertise(environ, address))
    try:
        os.execvp(argv[1], list(argv[1:]))
    except OSError as exc:
        print(f"dcy-entry: cannot run {argv[1]!r}: {exc}", file=sys.stderr)
        return 127
    return 0  # not reached: execvp replaced this process


if __name__ == "__main__":
    sys.exit(main(sys.argv, os.environ))
