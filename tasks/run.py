"""Tasks: build, up, test, check."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from invoke import Context, task
from invoke.exceptions import Exit

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
# The modes svc accepts (svc/_runtime.py MODES), repeated so `inv` needs nothing imported.
MODES = ("http", "nsq", "push")


@task
def build(c: Context, force: bool = False) -> None:
    """Build Consul, NSQ and consul-template (cached per version) and install the project."""
    with c.cd(str(ROOT)):
        c.run(f"{PY} -m pip install -q -e '.[dev]'")
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
    """Lint, then run every test (unit and integration, real agents) in parallel."""
    with c.cd(str(ROOT)):
        c.run(f"{PY} -m ruff check .")
        c.run(f"{PY} -m pytest -n auto --dist loadfile -q {args}", pty=False)
