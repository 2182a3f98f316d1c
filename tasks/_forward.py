"""Loopback forwarder of the local cluster: ``python _forward.py FD HOST:PORT``.

Started inside a host's namespace (``ip netns exec``) with FD a listening socket that the
parent created in the machine's own namespace: a socket stays in the namespace it was created
in, so this process accepts connections from the machine's loopback and connects to
HOST:PORT inside the host, without any link between the two networks. Standard library only.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.close()


async def serve(listener: socket.socket, host: str, port: int) -> None:
    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, target_writer), pipe(target_reader, writer))

    server = await asyncio.start_server(forward, sock=listener)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: _forward.py FD HOST:PORT", file=sys.stderr)
        return 2
    host, _, port = argv[2].rpartition(":")
    listener = socket.socket(fileno=int(argv[1]))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(listener, host, int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
