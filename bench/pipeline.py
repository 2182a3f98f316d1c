"""The whole pipeline end to end: readings per second through sensor → worker(s) → app, and
how long one reading takes from the sensor to the app's log.

Everything runs as real processes on free ports (``tests.system.System``: Consul, nsqd,
nsqlookupd and ``python -m svc.<name>``), the app's stdout being the only source of results.

* NSQ throughput, 1 then 2 workers: a sensor publishes ``--burst N`` readings at once
  (``--rate 0``); the time runs from nsqd counting the first message on ``sensor_values`` to
  the app logging the N-th distinct reading. ``lost`` is readings never logged, ``duplicated``
  readings logged more than once (the app deduplicates, so any is a bug); NSQ's own
  redeliveries (requeues and timeouts on channels ``worker`` and ``app``) are reported apart.
* NSQ latency: a sensor at the default rate (1 reading/s) for ``LATENCY_SECONDS``; p99 of the
  app's ``latency_ms`` (sensor timestamp to the app's log line). The same at 50/s is reported
  too (``nsq_p99_ms_50_per_s``; consumers ask nsqd for unbuffered delivery, see
  svc/_nsq_reader.py, without which nsqd's flush timer added up to 25ms per hop at that
  rate). The first reading of each run is left out (it includes the sensor's first lookup of
  nsqd and connection).
* HTTP: the app orchestrating back to back (``--interval 0``) against a sensor and two
  workers; readings per second over ``HTTP_SECONDS``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench._common import emit, note, parse_args, percentile, rounded
from tests.harness import until
from tests.system import ServiceProcess, System

BURST_FULL, BURST_QUICK = 50_000, 5_000
LATENCY_SECONDS_FULL, LATENCY_SECONDS_QUICK = 20.0, 5.0
FAST_RATE, FAST_SECONDS_FULL, FAST_SECONDS_QUICK = 50.0, 10.0, 3.0
HTTP_SECONDS_FULL, HTTP_SECONDS_QUICK = 10.0, 3.0
# A burst that makes no progress for this long is over: what is missing by then is lost.
STALL_SECONDS = 15.0


@dataclass
class ResultTail:
    """Reads an app's log as it grows: result lines grouped by the sensor process that made
    the reading (an id is ``<sensor prefix>-<counter>``)."""

    path: Path
    offset: int = 0
    partial: bytes = b""
    counts: dict[str, Counter[str]] = field(default_factory=dict)
    latencies: dict[str, list[float]] = field(default_factory=dict)

    def poll(self) -> int:
        """Read what was written since the last poll; the number of distinct ids so far."""
        try:
            with self.path.open("rb") as log:
                log.seek(self.offset)
                chunk = log.read()
        except FileNotFoundError:
            return 0
        self.offset += len(chunk)
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            if not line.startswith(b"{"):
                continue
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                continue
            prefix = str(result["id"]).rsplit("-", 1)[0]
            self.counts.setdefault(prefix, Counter())[result["id"]] += 1
            self.latencies.setdefault(prefix, []).append(float(result["latency_ms"]))
        return self.distinct()

    def distinct(self) -> int:
        return sum(len(ids) for ids in self.counts.values())

    def new_prefix(self, known: set[str]) -> str | None:
        """The sensor whose readings appeared since ``known`` was taken, if any yet."""
        self.poll()
        fresh = [p for p in self.counts if p not in known]
        return fresh[0] if fresh else None


def nsqd_stats(system: System) -> dict[str, Any]:
    assert system.nsq is not None
    url = f"http://{system.nsq.nsqd_http}/stats?format=json"
    with urllib.request.urlopen(url, timeout=5) as response:
        stats: dict[str, Any] = json.loads(response.read())
    return stats


def topic_stats(system: System, topic: str) -> dict[str, Any]:
    for entry in nsqd_stats(system).get("topics", []):
        if entry["topic_name"] == topic:
            return dict(entry)
    return {}


def channel_clients(system: System, topic: str, channel: str) -> int:
    for entry in topic_stats(system, topic).get("channels", []):
        if entry["channel_name"] == channel:
            return len(entry.get("clients", []))
    return 0


def redeliveries(system: System) -> int:
    total = 0
    for entry in nsqd_stats(system).get("topics", []):
        for chan in entry.get("channels", []):
            total += int(chan.get("requeue_count", 0)) + int(chan.get("timeout_count", 0))
    return total


def start_nsq_worker(system: System, count: int) -> None:
    system.start("worker", "--mode", "nsq")
    system.wait_passing("worker", count)
    until(
        lambda: channel_clients(system, "sensor_values", "worker") >= count,
        timeout=60,
        what=f"{count} workers consuming",
    )


def burst(system: System, tail: ResultTail, readings: int) -> tuple[float, int, int]:
    """Publish ``readings`` at once; (readings/s end to end, lost, duplicated)."""
    known = set(tail.counts)
    before = int(topic_stats(system, "sensor_values").get("message_count", 0))
    sensor = system.start("sensor", "--mode", "nsq", "--rate", "0", "--burst", str(readings))
    until(
        lambda: int(topic_stats(system, "sensor_values").get("message_count", 0)) > before,
        timeout=60,
        what="the first published reading",
    )
    started = time.monotonic()
    finished = started
    logged, progress_at = 0, started
    while logged < readings and time.monotonic() - progress_at < STALL_SECONDS:
        time.sleep(0.01)
        prefix = tail.new_prefix(known)
        count = len(tail.counts[prefix]) if prefix else 0
        if count > logged:
            logged, progress_at = count, time.monotonic()
            finished = progress_at
    time.sleep(0.5)  # late duplicates, if any, still count
    stop(sensor)
    prefix = tail.new_prefix(known)
    ids = tail.counts[prefix] if prefix else Counter()
    duplicated = sum(1 for n in ids.values() if n > 1)
    return logged / max(finished - started, 1e-9), readings - len(ids), duplicated


def steady(system: System, tail: ResultTail, rate: float, seconds: float) -> list[float]:
    """Run a sensor at ``rate`` readings/s for ``seconds``; the latencies the app logged,
    but for the first reading's, which also paid for the sensor's first lookup of nsqd and
    its first connection (a start-up cost, not the pipeline's)."""
    known = set(tail.counts)
    sensor = system.start("sensor", "--mode", "nsq", "--rate", str(rate))
    until(lambda: tail.new_prefix(known) is not None, timeout=60, what="a first result")
    time.sleep(seconds)
    stop(sensor)
    time.sleep(0.5)
    tail.poll()
    prefix = tail.new_prefix(known)
    assert prefix is not None
    return tail.latencies[prefix][1:]


def stop(service: ServiceProcess) -> None:
    service.proc.stop()


def run_nsq(
    workdir: Path, readings: int, latency_seconds: float, fast_seconds: float
) -> dict[str, Any]:
    system = System(workdir / "nsq").start_infrastructure()
    try:
        app = system.start("app", "--mode", "nsq")
        system.wait_passing("app", 1)
        until(
            lambda: channel_clients(system, "worker_result", "app") >= 1,
            timeout=60,
            what="app consuming",
        )
        tail = ResultTail(app.proc.log_path)
        start_nsq_worker(system, 1)
        note(f"nsq, 1 worker: burst of {readings}")
        one_per_s, lost_1, dup_1 = burst(system, tail, readings)
        note(f"  {one_per_s:,.0f} readings/s, lost {lost_1}, duplicated {dup_1}")
        start_nsq_worker(system, 2)
        note(f"nsq, 2 workers: burst of {readings}")
        two_per_s, lost_2, dup_2 = burst(system, tail, readings)
        note(f"  {two_per_s:,.0f} readings/s, lost {lost_2}, duplicated {dup_2}")
        note(f"nsq latency: 1 reading/s (the default rate) for {latency_seconds:.0f}s")
        slow = steady(system, tail, 1.0, latency_seconds)
        note(f"  {len(slow)} readings, p50 {percentile(slow, 50)} ms, p99 {percentile(slow, 99)}")
        note(f"nsq latency: {FAST_RATE:.0f} readings/s for {fast_seconds:.0f}s")
        fast = steady(system, tail, FAST_RATE, fast_seconds)
        note(f"  {len(fast)} readings, p50 {percentile(fast, 50)} ms, p99 {percentile(fast, 99)}")
        return {
            "nsq_1_worker_per_s": round(one_per_s),
            "nsq_2_workers_per_s": round(two_per_s),
            "nsq_p50_ms": rounded(percentile(slow, 50)),
            "nsq_p99_ms": rounded(percentile(slow, 99)),
            "nsq_p99_ms_50_per_s": rounded(percentile(fast, 99)),
            "nsq_redeliveries": redeliveries(system),
            "lost": lost_1 + lost_2,
            "duplicated": dup_1 + dup_2,
        }
    finally:
        system.stop()


def run_http(workdir: Path, seconds: float) -> dict[str, Any]:
    system = System(workdir / "http").start_infrastructure(with_nsq=False)
    try:
        system.start("sensor", "--mode", "http")
        system.start("worker", "--mode", "http")
        system.start("worker", "--mode", "http")
        system.wait_passing("sensor", 1)
        system.wait_passing("worker", 2)
        app = system.start("app", "--mode", "http", "--interval", "0")
        tail = ResultTail(app.proc.log_path)
        until(lambda: tail.poll() > 0, timeout=60, what="the app's first result")
        time.sleep(1.0)  # past the first connections
        first, started = tail.poll(), time.monotonic()
        time.sleep(seconds)
        per_s = (tail.poll() - first) / (time.monotonic() - started)
        latencies = [ms for values in tail.latencies.values() for ms in values]
        note(f"http, interval 0: {per_s:,.0f} readings/s, p99 {percentile(latencies, 99)} ms")
        return {"http_per_s": round(per_s), "http_p99_ms": rounded(percentile(latencies, 99))}
    finally:
        system.stop()


def main() -> None:
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "pipeline")
    readings = BURST_QUICK if args.quick else BURST_FULL
    latency_seconds = LATENCY_SECONDS_QUICK if args.quick else LATENCY_SECONDS_FULL
    fast_seconds = FAST_SECONDS_QUICK if args.quick else FAST_SECONDS_FULL
    http_seconds = HTTP_SECONDS_QUICK if args.quick else HTTP_SECONDS_FULL
    with tempfile.TemporaryDirectory(prefix="dcy-bench-pipeline-") as workdir:
        figures = run_nsq(Path(workdir), readings, latency_seconds, fast_seconds)
        figures.update(run_http(Path(workdir), http_seconds))
    figures["readings"] = readings
    emit({"bench": "pipeline", **figures})


if __name__ == "__main__":
    main()
