"""``-status-addr``: /health (JSON; 200 while every template is rendered and its data fresh,
503 otherwise, with the reason) and /metrics (prometheus text)."""

from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dcy.template._metrics import RendererMetrics
from dcy.template._runner import Renderer

log = logging.getLogger("dcy.template")


def health_report(renderer: Renderer) -> tuple[int, dict[str, Any]]:
    templates = []
    problems = []
    now = time.monotonic()
    for state in renderer.states:
        entry: dict[str, Any] = {
            "template": state.spec.name,
            "destination": str(state.spec.destination),
            "rendered": state.rendered,
            "renders": state.renders,
            "writes": state.writes,
        }
        if state.last_error:
            entry["error"] = state.last_error
            problems.append(state.last_error)
        if state.waiting_since is not None:
            entry["waiting_seconds"] = round(now - state.waiting_since, 3)
            problems.append(f"{state.spec.name} waits for data")
        templates.append(entry)
    stale = renderer.stale_seconds()
    if stale:
        problems.append(f"Consul unreachable: data is {stale:.1f}s old")
    body = {
        "status": "ok" if not problems else "degraded",
        "problems": problems,
        "stale_seconds": round(stale, 3),
        "templates": templates,
    }
    return (200 if not problems else 503), body


async def start_status_server(
    renderer: Renderer, metrics: RendererMetrics, address: str
) -> web.AppRunner:
    """Serve /health and /metrics; imported (with aiohttp's server and prometheus-client)
    only by a run with -status-addr."""
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"invalid -status-addr {address!r}: use host:port")

    async def health(_: web.Request) -> web.Response:
        status, body = health_report(renderer)
        return web.json_response(body, status=status)

    async def serve_metrics(_: web.Request) -> web.Response:
        payload = generate_latest(metrics.registry)
        return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", serve_metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host or "127.0.0.1", int(port)).start()
    # Port 0 asks the system for a free port: the log line is how a supervisor (or a test)
    # learns which one, with no race between choosing a port and binding it.
    for bound in runner.addresses:
        log.info("status: /health and /metrics on http://%s:%d", *bound[:2])
    return runner
