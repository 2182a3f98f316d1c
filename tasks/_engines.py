"""Which container tools this machine has: an engine that can build images, a compose CLI.

A docker CLI alone proves nothing (it is often installed without an engine, or with the
engine stopped): an engine counts only when ``docker info`` / ``podman info`` succeeds.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

ENGINES = ("docker", "podman")
PROBE_TIMEOUT = 20.0


@dataclass(frozen=True, slots=True)
class Probe:
    """What one engine's probe found: usable, or why not."""

    engine: str
    usable: bool
    reason: str  # why not; empty when usable


def probe_engine(engine: str) -> Probe:
    path = shutil.which(engine)
    if path is None:
        return Probe(engine, False, "not installed")
    try:
        result = subprocess.run(
            [path, "info"], capture_output=True, text=True, timeout=PROBE_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        return Probe(engine, False, f"`{engine} info` did not answer in {PROBE_TIMEOUT:g}s")
    except OSError as exc:
        return Probe(engine, False, f"cannot run {path}: {exc}")
    if result.returncode != 0:
        detail = _last_line(result.stderr) or _last_line(result.stdout) or "no output"
        return Probe(
            engine,
            False,
            f"CLI found but `{engine} info` failed (exit {result.returncode}: {detail}); "
            "no engine is running or reachable",
        )
    return Probe(engine, True, "")


def find_build_engine(engines: Sequence[str] = ENGINES) -> tuple[str | None, list[Probe]]:
    """The first engine that can build, and every probe made to find it."""
    probes = []
    for engine in engines:
        probe = probe_engine(engine)
        probes.append(probe)
        if probe.usable:
            return engine, probes
    return None, probes


def compose_cli(prefer: str = "docker compose") -> list[str] | None:
    """argv prefix of a compose CLI: ``docker compose`` (the v2 plugin) or ``docker-compose``
    (v1, Debian's package), ``prefer`` first; None when neither runs."""
    candidates = ["docker compose", "docker-compose"]
    candidates.sort(key=lambda c: c != prefer)
    for candidate in candidates:
        argv = candidate.split()
        if shutil.which(argv[0]) is None:
            continue
        try:
            ok = (
                subprocess.run(
                    [*argv, "version"], capture_output=True, timeout=PROBE_TIMEOUT, check=False
                ).returncode
                == 0
            )
        except (subprocess.TimeoutExpired, OSError):
            ok = False
        if ok:
            return argv
    return None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
