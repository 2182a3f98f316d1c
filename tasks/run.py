"""Tasks: build, up, test, check, bench."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
# The modes svc accepts (svc/_runtime.py MODES), repeated so `inv` needs nothing imported.
MODES = ("http", "nsq", "push")


@task
def build(c: Context, force: bool = False) -> None:
    """Build Consul, NSQ and consul-template (cached per version) and install dcy and svc."""
    with c.cd(str(ROOT)):
        c.run(f"{PY} -m pip install -q -e '.[dev]' -e ./svc")
        c.run(f"{PY} tools/build.py{' --force' if force else ''}")


@task(help={"mode": "http (app orchestrates, default), nsq (messaging) or push (coupled)"})
def up(c: Context, mode: str = "http") -> None:
    """Run the whole system in the foreground with honcho; Ctrl-C stops everything."""
    if mode not in MODES:
        raise Exit(f"inv up: invalid --mode {mode!r}: choose from {', '.join(MODES)}", code=2)
    (ROOT / ".data" / "nsqd").mkdir(parents=True, exist_ok=True)
    print(
        "\n  Consul UI   http://127.0.0.1:8500/ui/\n"
        "  Consul DNS  dig @127.0.0.1 -p 8600 nsqd.service.sd SRV\n"
        "  nsqadmin    http://127.0.0.1:4171/\n"
        f"  services    sensor :9001, worker :9002 + one on a free port, app :9000 ({mode} mode)\n",
        flush=True,
    )
    # honcho replaces this process rather than running under c.run: invoke forwards an
    # interrupt as "\x03" on the child's stdin, which only a terminal turns into SIGINT, so a
    # SIGINT or SIGTERM sent to `scripts/up`'s pid would stop nothing. The Procfile passes
    # SVC_MODE on as --mode (svc reads it as the default too).
    os.chdir(ROOT)
    os.execve(PY, [PY, "-m", "honcho", "-f", "Procfile", "start"], {**os.environ, "SVC_MODE": mode})


@task
def check(c: Context) -> None:
    """Lint and type-check: ruff, then mypy."""
    with c.cd(str(ROOT)):
        c.run(f"{PY} -m ruff check .")
        c.run(f"{PY} -m mypy")


@task(help={"args": 'extra pytest arguments, e.g. "-k dns -x"'})
def test(c: Context, args: str = "") -> None:
    """Lint and type-check (ruff, mypy strict over dcy, svc and the tests), then run every
    test (unit and integration, real agents) in parallel."""
    check(c)
    with c.cd(str(ROOT)):
        c.run(f"{PY} -m pytest -n auto --dist loadfile -q {args}", pty=False)


@task(help={"quick": "short runs (what the smoke test uses)", "only": "one benchmark by name"})
def bench(c: Context, quick: bool = False, only: str = "") -> None:
    """Run every benchmark in bench/ (each alone, one after the other) and collect the JSON
    line each prints last into .data/bench.jsonl."""
    import json

    scripts = sorted(p for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_"))
    if only:
        scripts = [p for p in scripts if p.stem == only]
        if not scripts:
            raise SystemExit(f"no benchmark named {only!r}")
    out = ROOT / ".data" / "bench.jsonl"
    out.parent.mkdir(exist_ok=True)
    lines = []
    for script in scripts:
        print(f"== {script.stem}", flush=True)
        result = c.run(f"{PY} {script}{' --quick' if quick else ''}", warn=True, hide="stdout")
        last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
        try:
            figures = json.loads(last)
        except json.JSONDecodeError:
            figures = {"bench": script.stem, "error": f"exit {result.exited}, no JSON line"}
        print(json.dumps(figures), flush=True)
        lines.append(json.dumps(figures))
    out.write_text("\n".join(lines) + "\n")
    print(f"figures written to {out}")
