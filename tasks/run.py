"""Tasks: build, up, test, check."""

from __future__ import annotations

import sys
from pathlib import Path

from invoke import Context, task

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


@task
def build(c: Context, force: bool = False) -> None:
    """Build Consul, NSQ and consul-template (cached per version) and install the project."""
    with c.cd(str(ROOT)):
        c.run(f"{PY} -m pip install -q -e '.[dev]'")
        c.run(f"{PY} tools/build.py{' --force' if force else ''}")


@task
def up(c: Context) -> None:
    """Run the whole system in the foreground with honcho; Ctrl-C stops everything."""
    (ROOT / ".data" / "nsqd").mkdir(parents=True, exist_ok=True)
    print(
        "\n  Consul UI   http://127.0.0.1:8500/ui/\n"
        "  Consul DNS  dig @127.0.0.1 -p 8600 nsqd.service.sd SRV\n"
        "  nsqadmin    http://127.0.0.1:4171/\n",
        flush=True,
    )
    with c.cd(str(ROOT)):
        c.run(f"{PY} -m honcho -f Procfile start", pty=False)


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
