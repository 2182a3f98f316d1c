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
    "resolve": ("pick_us", "pick_nowait_us", "http_query_us", "dns_query_us", "pick_over_http"),
    "propagation": ("changes", "p50_ms", "p99_ms", "max_ms", "raw_longpoll_p99_ms"),
    "consul_load": (
        "services",
        "requests_per_change",
        "idle_requests_per_query_per_min",
        "expected_idle_per_query_per_min",
        "max_connections",
    ),
    "http_by_name": ("by_name_rps", "raw_rps", "ratio_vs_raw"),
    "leader": (
        "bound_takeover_s",
        "ttl_only_takeover_s",
        "graceful_handover_s",
        "bound_vs_ttl_only",
    ),
    "system_dns": ("libc_cached_p50_us", "libc_uncached_p50_us", "direct_p50_us"),
    "import_cost": ("aiohttp_ms", "dcy_ms", "floor_ms", "dcy_vs_aiohttp"),
    "pipeline": (
        "nsq_1_worker_per_s",
        "nsq_2_workers_per_s",
        "nsq_p99_ms",
        "http_per_s",
        "lost",
        "duplicated",
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
}

# Figures that count mistakes, per benchmark: each must be exactly 0.
MUST_BE_ZERO = {"pipeline": ("lost", "duplicated")}


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
    numbers = {k: v for k, v in figures.items() if k != "bench"}
    assert numbers and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in numbers.values()
    ), figures
    mistakes = {name: figures[name] for name in MUST_BE_ZERO.get(bench, ())}
    assert not any(mistakes.values()), f"{bench} measured a broken run: {mistakes}"


def test_every_benchmark_is_smoke_tested() -> None:
    """Each bench/<name>.py (but the shared _modules) has its entry above."""
    scripts = {p.stem for p in (ROOT / "bench").glob("*.py") if not p.stem.startswith("_")}
    assert scripts == set(FIGURES)
    assert set(MUST_BE_ZERO) <= set(FIGURES)
    assert all(set(names) <= set(FIGURES[bench]) for bench, names in MUST_BE_ZERO.items())
