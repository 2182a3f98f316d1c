"""What every benchmark shares: its own Consul agent, the command line, statistics, and the
one JSON line of figures that ends its output.

Benchmarks report figures and ratios measured in the same run, never verdicts: a machine
that is twice as slow should move both sides of a ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from tests.harness import ConsulAgent


def parse_args(description: str, flags: Mapping[str, str] | None = None) -> argparse.Namespace:
    """``--quick``, and the benchmark's own on/off ``flags`` (name → help)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="a short run with fewer samples (smoke tests)"
    )
    for name, text in (flags or {}).items():
        parser.add_argument(name, action="store_true", help=text)
    return parser.parse_args()


@contextlib.contextmanager
def consul_agent(hcl: Sequence[str] = (), *, https: bool = False) -> Iterator[ConsulAgent]:
    """A dev agent on free ports in a temporary folder, stopped (only it) on exit; with
    ``https``, an HTTPS listener beside the HTTP one (its ``tls`` block is the caller's)."""
    with tempfile.TemporaryDirectory(prefix="dcy-bench-") as workdir:
        agent = ConsulAgent(Path(workdir), hcl=list(hcl), https=https)
        agent.start()
        try:
            yield agent
        finally:
            agent.stop()


@contextlib.asynccontextmanager
async def agent_session(agent: ConsulAgent) -> AsyncIterator[aiohttp.ClientSession]:
    """A kept-alive HTTP session to the agent itself (never through dcy or a proxy)."""
    async with aiohttp.ClientSession(
        base_url=agent.url, connector=aiohttp.TCPConnector(limit=0)
    ) as session:
        yield session


async def put(session: aiohttp.ClientSession, path: str, body: Any = None) -> None:
    """PUT to the agent's API and fail loudly: a benchmark must not measure a refusal."""
    data = None if body is None else json.dumps(body)
    async with session.put(path, data=data) as response:
        text = await response.text()
        if response.status != 200:
            raise RuntimeError(f"PUT {path} answered {response.status}: {text}")


async def register(
    session: aiohttp.ClientSession,
    name: str,
    service_id: str,
    port: int,
    *,
    ttl_check: bool = False,
) -> None:
    """Register an instance with the agent; with a TTL check that starts passing."""
    definition: dict[str, Any] = {"Name": name, "ID": service_id, "Port": port}
    if ttl_check:
        definition["Check"] = {
            "CheckID": ttl_check_id(service_id),
            "Name": "bench ttl",
            "TTL": "10m",
            "Status": "passing",
        }
    await put(session, "/v1/agent/service/register", definition)


def ttl_check_id(service_id: str) -> str:
    return f"ttl:{service_id}"


def percentile(samples: Sequence[float], pct: float) -> float:
    """The nearest-rank percentile (``pct`` in 0..100) of a non-empty sample."""
    if not samples:
        raise ValueError("percentile of no samples")
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No collector pauses inside a timed loop: they belong to no single call."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def rounded(value: float, digits: int = 3) -> float:
    return float(f"{value:.{digits}g}") if abs(value) < 1 else round(value, digits)


def emit(figures: Mapping[str, Any]) -> None:
    """Print the figures as the last line of output: one JSON object whose "bench" key names
    the benchmark (each script spells it out, so the line's shape is visible where it is
    made)."""
    if not isinstance(figures.get("bench"), str):
        raise ValueError('figures need a "bench" name')
    sys.stdout.flush()
    print(json.dumps(dict(figures)), flush=True)


def note(message: str) -> None:
    """Progress for a person watching; on stderr so stdout ends with the JSON line."""
    print(message, file=sys.stderr, flush=True)
