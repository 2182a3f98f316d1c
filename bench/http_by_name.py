"""Requests per second through dcy's HTTP client by service name, against raw aiohttp.

Same run, same worker process, same concurrency: ``CONCURRENCY`` tasks each send GET /ping
in a loop over one kept-alive session.

* ``raw_rps``: a plain ``aiohttp.ClientSession`` to the worker's fixed URL
  (``http://127.0.0.1:PORT/ping``);
* ``by_name_rps``: ``dcy.http_client()`` with ``http://bench-http/ping``: route lookup,
  resolution from the watch cache, round-robin choice, retry bookkeeping, URL rewrite.

The two alternate (raw, by name, by name, raw: drift on the machine hits both alike), each
run a fixed number of requests; the figures are totals over both runs of each.
``ratio_vs_raw`` = by_name_rps / raw_rps: 1.0 means the by-name layer costs nothing.

With the worker on the other core, requests/s are often bound by the worker, which hides the
client's own cost; ``*_client_cpu_us`` (this process's CPU time per request) shows it.

The same comparison for the other clients by name, each against itself to the fixed URL:
``requests_*`` (a ``requests.Session`` with ``dcy.RequestsAdapter`` mounted, vs a plain
session) and ``httpx_*`` (``httpx.Client`` with ``dcy.HttpxTransport``, vs a plain client),
both on a ``dcy.SyncDcy`` from CONCURRENCY threads; ``httpx_async_*`` (``httpx.AsyncClient``
with ``dcy.AsyncHttpxTransport``) from CONCURRENCY tasks. Each ``*_ratio`` is by name / raw.

requests is run twice: as called without ``timeout=`` (``requests_*``: the plain session's
sockets then block for ever, while the adapter bounds each try by what is left of its budget,
so its sockets carry a timeout, which costs CPython a poll() before every read), and with
``timeout=REQUESTS_TIMEOUT`` on both sides (``requests_timeout_*``: the form production code
uses, where the comparison is the by-name layer alone). httpx has a default timeout on both
sides.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncio
import itertools
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from functools import partial

import aiohttp
import httpx
import requests

import dcy
from bench._common import consul_agent, emit, gc_paused, note, parse_args, rounded
from tests.harness import ConsulAgent, ManagedProcess

SERVICE = "bench-http"
CONCURRENCY = 16
Getter = Callable[..., requests.Response | httpx.Response]
REQUESTS_TIMEOUT = 10.0  # seconds, both sides of the requests_timeout row
SERVER_SCRIPT = Path(__file__).resolve().parents[1] / "tests" / "integration" / "_echo_server.py"

Get = Callable[[], Awaitable[None]]


def start_worker(workdir: Path) -> tuple[ManagedProcess, int]:
    """The echo server as its own process; returns it and the port it bound."""
    port_file = workdir / "worker.port"
    worker = ManagedProcess(
        [sys.executable, str(SERVER_SCRIPT), "--id", "w1", "--port-file", str(port_file)],
        workdir / "worker.log",
    )
    worker.spawn()
    deadline = time.monotonic() + 30
    while not port_file.exists():
        if not worker.running or time.monotonic() > deadline:
            worker.stop()
            raise RuntimeError(f"worker did not start:\n{worker.log_tail()}")
        time.sleep(0.05)
    return worker, int(port_file.read_text())


async def run_requests(get: Get, total: int) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) for ``total`` requests sent by CONCURRENCY
    tasks."""
    left = total

    async def loop() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await get()

    with gc_paused():
        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(loop() for _ in range(CONCURRENCY)))
        return time.perf_counter() - start, time.process_time() - cpu


def getter(client: aiohttp.ClientSession | dcy.HttpClient, url: str) -> Get:
    async def get() -> None:
        async with client.get(url) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"GET {url} answered {response.status}")

    return get


Figures = dict[str, float | int]
# The other clients' rows alternate in more, shorter runs: at ~1,000 requests/s a run takes
# seconds, and load from elsewhere on the machine comes and goes on that scale.
ORDER = ("raw", "by_name", "by_name", "raw") * 2


def run_blocking(get: Callable[[], None], total: int) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) for ``total`` requests sent by CONCURRENCY
    threads."""
    taken = itertools.count()  # next() is atomic: the threads share one count

    def loop() -> None:
        while next(taken) < total:
            get()

    threads = [threading.Thread(target=loop) for _ in range(CONCURRENCY)]
    with gc_paused():
        start, cpu = time.perf_counter(), time.process_time()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.perf_counter() - start, time.process_time() - cpu


def compared(prefix: str, seconds: dict[str, float], cpu: dict[str, float], n: int) -> Figures:
    """The figures of one client: by name vs raw, ``n`` requests of each."""
    raw_rps, by_name_rps = n / seconds["raw"], n / seconds["by_name"]
    return {
        f"{prefix}_requests_each": n,
        f"{prefix}_raw_rps": round(raw_rps),
        f"{prefix}_by_name_rps": round(by_name_rps),
        f"{prefix}_by_name_client_cpu_us": rounded(cpu["by_name"] / n * 1e6, 1),
        f"{prefix}_raw_client_cpu_us": rounded(cpu["raw"] / n * 1e6, 1),
        f"{prefix}_ratio": rounded(by_name_rps / raw_rps),
    }


def blocking_getter(
    get: Callable[..., requests.Response | httpx.Response], url: str
) -> Callable[[], None]:
    def once() -> None:
        response = get(url)
        if response.status_code != 200:
            raise RuntimeError(f"GET {url} answered {response.status_code}")

    return once


def run_sync_clients(agent: ConsulAgent, port: int, quick: bool) -> Figures:
    """The requests adapter and the httpx transport, by name vs the fixed URL."""
    per_run = 250 if quick else 3_000
    raw_url, named_url = f"http://127.0.0.1:{port}/ping", f"http://{SERVICE}/ping"
    figures: Figures = {}
    with dcy.SyncDcy(agent.http_addr) as client:
        client.register(SERVICE, port, check=dcy.TtlCheck(ttl=600))
        for _ in range(200):
            if client.instances(SERVICE):
                break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"{SERVICE} never became resolvable")
        plain, named = requests.Session(), requests.Session()
        plain.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=CONCURRENCY))
        options = {"pool_maxsize": CONCURRENCY}
        named.mount("http://", dcy.RequestsAdapter(client, adapter_options=options))
        limits = httpx.Limits(max_keepalive_connections=CONCURRENCY)
        transport = dcy.HttpxTransport(client, transport_options={"limits": limits})
        with (
            plain,
            named,
            httpx.Client(limits=limits) as httpx_plain,
            httpx.Client(transport=transport) as httpx_named,
        ):
            clients: dict[str, tuple[Getter, Getter]] = {
                "requests": (plain.get, named.get),
                "requests_timeout": (
                    partial(plain.get, timeout=REQUESTS_TIMEOUT),
                    partial(named.get, timeout=REQUESTS_TIMEOUT),
                ),
                "httpx": (httpx_plain.get, httpx_named.get),
            }
            for prefix, (raw_get, named_get) in clients.items():
                raw = blocking_getter(raw_get, raw_url)
                by_name = blocking_getter(named_get, named_url)
                run_blocking(raw, 300)
                run_blocking(by_name, 300)  # warm: connections open, the name resolved
                seconds = {"raw": 0.0, "by_name": 0.0}
                cpu = {"raw": 0.0, "by_name": 0.0}
                for kind in ORDER:
                    note(f"{prefix} {kind}: {per_run} requests, {CONCURRENCY} threads")
                    taken, used = run_blocking(raw if kind == "raw" else by_name, per_run)
                    note(f"  {per_run / taken:,.0f} requests/s")
                    seconds[kind] += taken
                    cpu[kind] += used
                figures |= compared(prefix, seconds, cpu, 4 * per_run)
    return figures


async def run_httpx_async(client: dcy.Dcy, port: int, per_run: int) -> Figures:
    """httpx.AsyncClient with the async transport, by name vs the fixed URL."""
    limits = httpx.Limits(max_keepalive_connections=CONCURRENCY)
    transport = dcy.AsyncHttpxTransport(client, transport_options={"limits": limits})
    async with (
        httpx.AsyncClient(limits=limits) as plain,
        httpx.AsyncClient(transport=transport) as named,
    ):

        def getter_of(http: httpx.AsyncClient, url: str) -> Get:
            async def get() -> None:
                response = await http.get(url)
                if response.status_code != 200:
                    raise RuntimeError(f"GET {url} answered {response.status_code}")

            return get

        raw = getter_of(plain, f"http://127.0.0.1:{port}/ping")
        by_name = getter_of(named, f"http://{SERVICE}/ping")
        await run_requests(raw, 500)
        await run_requests(by_name, 500)
        seconds = {"raw": 0.0, "by_name": 0.0}
        cpu = {"raw": 0.0, "by_name": 0.0}
        for kind in ORDER:
            note(f"httpx_async {kind}: {per_run} requests, {CONCURRENCY} concurrent")
            taken, used = await run_requests(raw if kind == "raw" else by_name, per_run)
            note(f"  {per_run / taken:,.0f} requests/s")
            seconds[kind] += taken
            cpu[kind] += used
    return compared("httpx_async", seconds, cpu, 4 * per_run)


async def run(agent: ConsulAgent, port: int, quick: bool) -> dict[str, float | int]:
    per_run = 4_000 if quick else 25_000
    async with dcy.Dcy(agent.http_addr) as client:
        await client.register(SERVICE, port, check=dcy.TtlCheck(ttl=600))
        for _ in range(200):
            if await client.instances(SERVICE):
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError(f"{SERVICE} never became resolvable")
        async with aiohttp.ClientSession() as session, client.http_client() as by_name:
            raw = getter(session, f"http://127.0.0.1:{port}/ping")
            named = getter(by_name, f"http://{SERVICE}/ping")
            await run_requests(raw, 1_000)
            await run_requests(named, 1_000)  # warm: connections open, the name resolved
            seconds = {"raw": 0.0, "by_name": 0.0}
            cpu = {"raw": 0.0, "by_name": 0.0}
            for kind in ("raw", "by_name", "by_name", "raw"):
                note(f"{kind}: {per_run} requests, {CONCURRENCY} concurrent")
                taken, used = await run_requests(raw if kind == "raw" else named, per_run)
                note(f"  {per_run / taken:,.0f} requests/s, {used / per_run * 1e6:.0f} µs CPU each")
                seconds[kind] += taken
                cpu[kind] += used
        httpx_async = await run_httpx_async(client, port, 250 if quick else 3_000)
    raw_rps = 2 * per_run / seconds["raw"]
    by_name_rps = 2 * per_run / seconds["by_name"]
    return {
        "requests_each": 2 * per_run,
        "concurrency": CONCURRENCY,
        "raw_client_cpu_us": rounded(cpu["raw"] / (2 * per_run) * 1e6, 1),
        "by_name_client_cpu_us": rounded(cpu["by_name"] / (2 * per_run) * 1e6, 1),
        "by_name_rps": round(by_name_rps),
        "raw_rps": round(raw_rps),
        "ratio_vs_raw": rounded(by_name_rps / raw_rps),
        **httpx_async,
    }


def main() -> None:
    args = parse_args(__doc__ or "")
    with consul_agent() as agent, tempfile.TemporaryDirectory(prefix="dcy-bench-http-") as tmp:
        worker, port = start_worker(Path(tmp))
        try:
            figures = asyncio.run(run(agent, port, args.quick))
            figures |= run_sync_clients(agent, port, args.quick)
        finally:
            worker.stop()
    ratios = {key: value for key, value in figures.items() if "ratio" in key}
    note(
        "ratios by name vs raw (goal >= 0.9 each): "
        + ", ".join(f"{k}={v}" for k, v in ratios.items())
    )
    emit({"bench": "http_by_name", **figures})


if __name__ == "__main__":
    main()
