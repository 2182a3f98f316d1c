"""The benchmarks still run: each one, in its short form, ends with its line of figures.

The speed figures (and the goals they are compared with) belong to bench/README.md, never to
a test. The figures that count wrong answers are different: a benchmark that lost or
duplicated work measured a broken system, so those must be zero even in the short form.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FIGURES = {
    "cluster": (
        "new_leader_p50_s",
        "new_leader_max_s",
        "fresh_watch_p50_s",
        "fresh_watch_max_s",
        "empty_lookups",
        "failed_cycles",
        "readings_lost",
        "readings_duplicated",
    ),
    "resolve": ("pick_us", "pick_nowait_us", "http_query_us", "dns_query_us", "pick_over_http"),
    "propagation": ("changes", "p50_ms", "p99_ms", "max_ms", "raw_longpoll_p99_ms"),
    "consul_load": (
        "services",
        "requests_per_change",
        "idle_requests_per_query_per_min",
        "expected_idle_per_query_per_min",
        "max_connections",
    ),
    "http_by_name": (
        "by_name_rps",
        "raw_rps",
        "ratio_vs_raw",
        "requests_ratio",
        "requests_timeout_ratio",
        "httpx_ratio",
        "httpx_async_ratio",
    ),
    "leader": (
        "bound_takeover_s",
        "ttl_only_takeover_s",
        "graceful_handover_s",
        "bound_vs_ttl_only",
    ),
    "system_dns": ("libc_cached_p50_us", "libc_uncached_p50_us", "direct_p50_us"),
    "scale_cpu": (
        "cpu_ms_per_change_10",
        "cpu_ms_per_change_1000",
        "requests_per_change_1000",
        "sweeps_1000",
        "cpu_ratio_1000_to_10",
    ),
    "import_cost": ("aiohttp_ms", "dcy_ms", "floor_ms", "dcy_vs_aiohttp"),
    "pipeline": (
        "nsq_1_worker_per_s",
        "nsq_2_workers_per_s",
        "nsq_p99_ms",
        "http_per_s",
        "lost",
        "duplicated",
    ),
    "ctmpl": (
        "corpus_render_ratio",
        "propagation_p50_ratio",
        "propagation_p99_ratio",
        "corpus_templates",
        "budget_attribution_floor_ms",
    ),
    "template": (
        "propagation_p50_ratio",
        "propagation_p99_ratio",
        "first_render_ratio",
        "requests_per_change_ratio",
        "max_connections_ratio",
        "case1_floor_p50_ratio",
        "case2_propagation_p50_ratio",
    ),
    "scale": (
        "services_large",
        "max_connections",
        "probe_refusals",
        "first_render_ms",
        "first_render_ratio",
        "propagation_p50_ratio",
        "propagation_p99_ratio",
        "requests_per_change",
        "cpu_large_vs_small",
        "ct_max_connections",
        "goals_met",
    ),
}

# Figures that count mistakes, per benchmark: each must be exactly 0.
MUST_BE_ZERO = {
    "pipeline": ("lost", "duplicated"),
    "cluster": ("empty_lookups", "readings_lost", "readings_duplicated"),
}

# Benchmarks that report a figure they could not measure as null, say why in "notes" (a list
# of strings) and report their goals as booleans in "goals": scale's watcher may be refused by
# the agent and never render (what the benchmark is there to show).
MAY_BE_NULL = {"scale"}
STRUCTURED: dict[str, dict[str, type]] = {
    "scale": {"goals": dict, "notes": list, "transport": str, "dcy_syntax": str},
    "scale_cpu": {"transport": str},
}


@pytest.mark.parametrize("bench", sorted(FIGURES))
def test_benchmark_quick_run_ends_with_its_figures(bench: str) -> None:
    """`python bench/<name>.py --quick` exits 0 and its last line is its JSON figures."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{bench}.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["bench"] == bench
    for name in FIGURES[bench]:
        assert name in figures, f"{bench} did not report {name}: {figures}"
    structured = STRUCTURED.get(bench, {})
    for name, kind in structured.items():
        assert isinstance(figures.get(name), kind), f"{bench}: {name} is not a {kind.__name__}"
    assert all(isinstance(v, bool) for v in figures.get("goals", {}).values()), figures
    assert all(isinstance(v, str) for v in figures.get("notes", [])), figures
    numbers = {k: v for k, v in figures.items() if k != "bench" and k not in structured}
    allowed: tuple[type, ...] = (int, float, type(None)) if bench in MAY_BE_NULL else (int, float)
    assert numbers and all(
        isinstance(v, allowed) and not isinstance(v, bool) for v in numbers.values()
    ), figures
    unmeasured = [k for k, v in numbers.items() if v is None]
    assert not unmeasured or figures.get("notes"), f"{bench}: {unmeasured} null, no notes"
    mistakes = {name: figures[name] for name in MUST_BE_ZERO.get(bench, ())}
    assert not any(mistakes.values()), f"{bench} measured a broken run: {mistakes}"


def test_every_benchmark_is_smoke_tested() -> None:
    """Each bench/<name>.py (but the shared _modules) has its entry above."""
    scripts = {p.stem for p in (ROOT / "bench").glob("*.py") if not p.stem.startswith("_")}
    assert scripts == set(FIGURES)
    assert set(MUST_BE_ZERO) <= set(FIGURES)
    assert set(MAY_BE_NULL) | set(STRUCTURED) <= set(FIGURES)
    assert all(set(names) <= set(FIGURES[bench]) for bench, names in MUST_BE_ZERO.items())
