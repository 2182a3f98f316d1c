"""``dcy-register``: keep any program registered in Consul while it runs.

For daemons that cannot register themselves (nsqd, redis, nginx): dcy-register starts the
program (or watches a running PID), registers it through :class:`dcy.Dcy` with a real health
check, forwards signals, deregisters when the program ends and exits with the program's code.
Bad input exits 2 before anything starts; ``dcy-register --help`` lists every flag.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from dcy._dcy import Dcy
from dcy._register_cli._args import parse_plan
from dcy._register_cli._plan import Plan, UsageError
from dcy._register_cli._supervise import Supervisor

USAGE_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    try:
        plan, log_level = parse_plan(sys.argv[1:] if argv is None else argv)
        dcy = _client(plan)
    except UsageError as exc:
        print(f"dcy-register: {exc}\n(dcy-register --help lists every flag)", file=sys.stderr)
        return USAGE_ERROR
    logging.basicConfig(
        level=log_level.upper(), format="dcy-register: %(levelname)s %(message)s", force=True
    )
    return asyncio.run(Supervisor(plan, dcy).run())


def _client(plan: Plan) -> Dcy:
    try:
        return plan.consul.client()
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
