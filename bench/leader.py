"""Leader take-over: seconds from the holder's end to the other contender leading.

Two contender processes (``tests/integration/_contender.py``, each ``dcy.leadership``) on
this benchmark's own agent, lock-delay 1s:

* ``bound``: each registers itself with a 2s TTL check and binds its session to it (session
  TTL 60s, so only the check can end a dead holder's session in time); the holder is killed
  with SIGKILL.
* ``ttl_only`` (the baseline, measured in the same run): sessions tied to ``serfHealth`` only,
  TTL 10s (Consul's least); SIGKILL, so the session ends 2 x TTL after its last renewal.
* ``graceful``: the holder gets SIGTERM and releases the lock before leaving.

The clock starts when the signal is sent and stops when the other process has written that
it leads (it writes the line right after its lock acquisition returns).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import os
import signal
import statistics
import subprocess
import tempfile
import time

from bench._common import consul_agent, emit, note, parse_args, rounded
from tests.harness import ConsulAgent, until

ROOT = Path(__file__).resolve().parents[1]
LOCK_DELAY = 1.0
CHECK_TTL = 2.0
SCENARIOS = {
    "bound": (("--ttl", "60", "--check-ttl", f"{CHECK_TTL:g}"), signal.SIGKILL),
    "ttl_only": (("--ttl", "10"), signal.SIGKILL),
    "graceful": (("--ttl", "10"), signal.SIGTERM),
}


def _leads(events: Path) -> bool:
    return events.exists() and "\nleader " in "\n" + events.read_text()


def _contender(
    agent: ConsulAgent, workdir: Path, name: str, number: int, options: tuple[str, ...]
) -> tuple[subprocess.Popen[bytes], Path]:
    events = workdir / f"{name}-{number}.events"
    with (workdir / f"{name}-{number}.log").open("wb") as log:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "tests.integration._contender"),
                *(agent.http_addr, name, str(events)),
                *("--lock-delay", f"{LOCK_DELAY:g}", *options),
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return process, events


def take_over(agent: ConsulAgent, workdir: Path, scenario: str, round_: int) -> float:
    options, how = SCENARIOS[scenario]
    name = f"bench-{scenario}-{round_}"
    holder, holder_events = _contender(agent, workdir, name, 0, options)
    processes = [holder]
    try:
        until(lambda: _leads(holder_events), timeout=60, interval=0.005, what="the first leader")
        other, other_events = _contender(agent, workdir, name, 1, options)
        processes.append(other)
        # The other one waits once its session exists.
        until(
            lambda: sum(name in s["Name"] for s in agent.api("/v1/session/list")) >= 2,
            timeout=60,
            interval=0.005,
            what="the second contender's session",
        )
        if _leads(other_events):
            raise RuntimeError("both contenders lead")
        started = time.monotonic()
        holder.send_signal(how)
        until(lambda: _leads(other_events), timeout=120, interval=0.005, what="the take-over")
        return time.monotonic() - started
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(10)


def main() -> None:
    args = parse_args(__doc__ or "")
    rounds = 1 if args.quick else 3
    took: dict[str, list[float]] = {scenario: [] for scenario in SCENARIOS}
    with consul_agent() as agent, tempfile.TemporaryDirectory(prefix="dcy-bench-") as tmp:
        for round_ in range(rounds):
            for scenario in SCENARIOS:
                seconds = take_over(agent, Path(tmp), scenario, round_)
                took[scenario].append(seconds)
                note(f"round {round_ + 1}/{rounds} {scenario}: {seconds:.2f}s")
    median = {scenario: statistics.median(values) for scenario, values in took.items()}
    emit(
        {
            "bench": "leader",
            "rounds": rounds,
            "lock_delay_s": LOCK_DELAY,
            "check_ttl_s": CHECK_TTL,
            "bound_takeover_s": rounded(median["bound"]),
            "ttl_only_takeover_s": rounded(median["ttl_only"]),
            "graceful_handover_s": rounded(median["graceful"]),
            "bound_vs_ttl_only": rounded(median["bound"] / median["ttl_only"]),
            "bound_max_s": rounded(max(took["bound"])),
        }
    )


if __name__ == "__main__":
    main()
