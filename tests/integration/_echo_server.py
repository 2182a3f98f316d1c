"""A tiny aiohttp server run as its own process, so a test can kill it (SIGKILL) mid-request.

    python tests/integration/_echo_server.py --id a --port-file /tmp/a.port [--journal F]

It registers nothing: tests register it in Consul. It binds a free port itself and writes
that port to ``--port-file`` (atomically) once it accepts connections. Endpoints:

    GET  /health       200 "ok" (for Consul's HTTP check)
    GET  /ping         200, the server id as text (the cheapest answer, for benchmarks)
    *    /whoami       200 {"id", "method", "body"}; ``--fail-status N`` answers N instead
    *    /slow         waits until POST /release, then answers like /whoami
    POST /release      lets every waiting /slow request answer
    *    /hold         reads the body, appends "<id> <method>" to ``--journal``, never answers
    GET  /stats        {"id", "counts": {path: requests}, "waiting": slow requests waiting}
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections import Counter
from pathlib import Path

from aiohttp import web


class _Waiters:
    """Slow requests waiting for a release."""

    def __init__(self) -> None:
        self.count = 0
        self.release = asyncio.Event()


def build_app(server_id: str, journal: Path | None, fail_status: int | None) -> web.Application:
    counts: Counter[str] = Counter()
    waiters = _Waiters()

    async def answer(request: web.Request, status: int = 200) -> web.Response:
        body = await request.text()
        payload = {"id": server_id, "method": request.method, "body": body}
        return web.json_response(payload, status=status)

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def ping(_: web.Request) -> web.Response:
        return web.Response(text=server_id)

    async def whoami(request: web.Request) -> web.Response:
        counts["/whoami"] += 1
        return await answer(request, fail_status or 200)

    async def slow(request: web.Request) -> web.Response:
        counts["/slow"] += 1
        waiters.count += 1
        try:
            await waiters.release.wait()
        finally:
            waiters.count -= 1
        return await answer(request)

    async def release(_: web.Request) -> web.Response:
        event, waiters.release = waiters.release, asyncio.Event()
        event.set()
        return web.Response(text="released")

    async def hold(request: web.Request) -> web.Response:
        counts["/hold"] += 1
        await request.read()
        if journal is not None:
            with journal.open("a") as out:
                out.write(f"{server_id} {request.method}\n")
                out.flush()
                os.fsync(out.fileno())
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(
            {"id": server_id, "counts": dict(counts), "waiting": waiters.count}
        )

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/ping", ping)
    app.router.add_route("*", "/whoami", whoami)
    app.router.add_route("*", "/slow", slow)
    app.router.add_post("/release", release)
    app.router.add_route("*", "/hold", hold)
    app.router.add_get("/stats", stats)
    return app


async def serve(args: argparse.Namespace) -> None:
    app = build_app(args.id, args.journal, args.fail_status)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    port = runner.addresses[0][1]
    partial = args.port_file.with_suffix(".partial")
    partial.write_text(str(port))
    partial.replace(args.port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--id", required=True)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--journal", type=Path)
    parser.add_argument("--fail-status", type=int)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
