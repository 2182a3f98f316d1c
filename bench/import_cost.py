"""What ``import dcy`` costs a program, against what ``import aiohttp`` (its one heavy
dependency) costs, measured in the same run with ``python -X importtime``.

Each sample is a fresh interpreter importing one thing; the figure is the cumulative import
time of that top-level module, as ``-X importtime`` reports it, alternating dcy and aiohttp
so that a busy machine slows both. Bytecode is compiled first (as ``pip install`` does), in a
private cache folder, so no sample pays for compiling dcy's sources. Also reported: the
floor of any client of Consul's HTTP API on aiohttp (aiohttp plus orjson), and a whole
``python -c 'import dcy'`` process in wall-clock time.

    .venv/bin/python bench/import_cost.py [--quick]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import emit, note, parse_args, rounded

ROOT = Path(__file__).resolve().parents[1]


def import_time_us(module: str, env: dict[str, str]) -> int:
    """The cumulative -X importtime figure of ``module`` in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
    )
    top = module.split(",")[-1].strip()
    for line in reversed(result.stderr.splitlines()):
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 3 and parts[2] == top:
            return int(parts[1])
    raise RuntimeError(f"no import time for {top!r} in:\n{result.stderr[-2000:]}")


def wall_ms(code: str, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True)
    return (time.perf_counter() - started) * 1000


def main() -> None:
    args = parse_args(__doc__ or "")
    rounds = 5 if args.quick else 25
    with tempfile.TemporaryDirectory(prefix="dcy-bench-pyc-") as cache:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = cache
        # Compile once (every module dcy imports), as an installed package would be.
        subprocess.run([sys.executable, "-c", "import dcy, aiohttp, orjson"], env=env, check=True)
        samples: dict[str, list[float]] = {"aiohttp": [], "dcy": [], "floor": []}
        walls: dict[str, list[float]] = {"python": [], "dcy": []}
        for n in range(rounds):
            note(f"round {n + 1}/{rounds}")
            samples["aiohttp"].append(import_time_us("aiohttp", env))
            samples["dcy"].append(import_time_us("dcy", env))
            # The least any aiohttp client of Consul could import: aiohttp and a JSON codec.
            samples["floor"].append(import_time_us("aiohttp", env) + import_time_us("orjson", env))
            walls["python"].append(wall_ms("pass", env))
            walls["dcy"].append(wall_ms("import dcy", env))
    aiohttp_ms = statistics.median(samples["aiohttp"]) / 1000
    dcy_ms = statistics.median(samples["dcy"]) / 1000
    floor_ms = statistics.median(samples["floor"]) / 1000
    emit(
        {
            "bench": "import_cost",
            "rounds": rounds,
            "aiohttp_ms": rounded(aiohttp_ms),
            "dcy_ms": rounded(dcy_ms),
            "floor_ms": rounded(floor_ms),
            "dcy_vs_aiohttp": rounded(dcy_ms / aiohttp_ms),
            "dcy_vs_floor": rounded(dcy_ms / floor_ms),
            "python_startup_ms": rounded(statistics.median(walls["python"])),
            "python_import_dcy_ms": rounded(statistics.median(walls["dcy"])),
        }
    )


if __name__ == "__main__":
    main()
