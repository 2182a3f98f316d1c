"""Driving dcy's programs (dcy-template, dcy-register, dcy-alert, the services) from tests:
the environment they find Consul through, bounded waits on what they do, and the check that a
program gives up at once, non-zero, on an error that no retry can cure."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from tests.harness import ConsulAgent

BIN = Path(sys.executable).parent
# Bounds a failure only: each wait returns as soon as what it waits for happens.
WAIT = 30.0


def program(name: str) -> str:
    """The path of an installed console script (``dcy-alert``, ``dcy-sensor``, ...)."""
    return str(BIN / name)


def consul_env(**variables: str) -> dict[str, str]:
    """This process's environment without any CONSUL_* variable, plus ``variables``: a
    program finds exactly the agent and credentials a test gives it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    return env | variables


def passing(agent: ConsulAgent, name: str) -> bool:
    """Whether ``name`` is registered with checks that all pass."""
    checks = agent.api(f"/v1/health/checks/{name}") or []
    return bool(checks) and all(c["Status"] == "passing" for c in checks)


def wait_for(predicate: Callable[[], Any], proc: subprocess.Popen[str], what: str) -> None:
    """Poll ``predicate`` while ``proc`` runs; fail with its stderr if it exits first."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what}: exited {proc.returncode}: {proc.communicate()[1]}")
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {WAIT:g}s")


def wait_for_stderr(proc: subprocess.Popen[str], text: str) -> str:
    """Read ``proc``'s stderr until a line holds ``text``; what was read."""
    assert proc.stderr is not None
    seen: list[str] = []
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise AssertionError(f"exited before {text!r}: {''.join(seen)}")
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"no {text!r} within {WAIT:g}s: {''.join(seen)}")


def start(
    argv: list[str], env: dict[str, str], stdout: int | IO[Any] = subprocess.DEVNULL
) -> subprocess.Popen[str]:
    """A program with stderr to read (:func:`wait_for_stderr`); stdout dropped unless given."""
    return subprocess.Popen(argv, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen[str], timeout: float = WAIT) -> str:
    """SIGTERM, wait for the exit; the rest of stderr."""
    proc.terminate()
    return proc.communicate(timeout=timeout)[1] or ""


def fails_fast(argv: list[str], env: dict[str, str], limit: float, *needles: str) -> str:
    """Run a program that must give up: non-zero within ``limit`` seconds, stderr naming
    every one of ``needles``; the stderr."""
    started = time.monotonic()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=limit)
    assert done.returncode != 0, done.stderr
    assert time.monotonic() - started < limit
    for needle in needles:
        assert needle in done.stderr, (needle, done.stderr)
    return done.stderr


def ended_within(proc: subprocess.Popen[str], limit: float, *needles: str) -> str:
    """``proc`` (started earlier) ends non-zero within ``limit`` seconds, its stderr naming
    every one of ``needles``; the stderr."""
    try:
        _, stderr = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate(timeout=10)
        raise AssertionError(f"still running after {limit:g}s: {stderr}") from None
    assert proc.returncode != 0, stderr
    for needle in needles:
        assert needle in stderr, (needle, stderr)
    return str(stderr)
