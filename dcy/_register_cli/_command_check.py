"""Running a check command the way Consul runs a script check, but from dcy-register.

Consul only runs scripts when ``enable_script_checks`` is on (off by default, and a known way
to run code on an agent), so dcy-register runs the command itself and reports the result to a
TTL check: the agent needs no extra permission and the command runs next to the program.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from typing import Literal

from dcy._errors import DcyError
from dcy._register import Registration
from dcy._register_cli._plan import CommandCheck

log = logging.getLogger("dcy.register_cli")

Status = Literal["passing", "warning", "critical"]

# Consul keeps at most 4 KiB of a check's output by default.
MAX_OUTPUT = 4096


@dataclass(frozen=True, slots=True)
class CheckResult:
    status: Status
    output: str


def status_of(returncode: int | None) -> Status:
    """Consul's script-check convention: 0 passing, 1 warning, anything else critical."""
    if returncode == 0:
        return "passing"
    if returncode == 1:
        return "warning"
    return "critical"


async def run_check(check: CommandCheck) -> CheckResult:
    """Run the command once (argv, no shell) with stdout and stderr captured together."""
    try:
        process = await asyncio.create_subprocess_exec(
            *check.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        return CheckResult("critical", f"cannot run {check.argv[0]!r}: {exc.strerror or exc}")
    try:
        output, _ = await asyncio.wait_for(process.communicate(), check.timeout)
    except TimeoutError:
        # The whole group: a check script's own children must not pile up.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        return CheckResult("critical", f"timed out after {check.timeout:g}s")
    text = output.decode(errors="replace")[-MAX_OUTPUT:]
    return CheckResult(status_of(process.returncode), text)


async def keep_checking(
    registration: Registration, check: CommandCheck, first: CheckResult | None = None
) -> None:
    """Report ``first`` at once, then a fresh result every interval, until cancelled."""
    result = first or await run_check(check)
    previous: Status | None = None
    while True:
        if result.status != previous:
            log.info("%s is %s: %s", registration.service_id, result.status, _brief(result))
            previous = result.status
        try:
            await registration.set_status(result.status, result.output)
        except DcyError as exc:
            # The registration's heartbeat re-sends the status it holds, and re-registers when
            # the agent forgot the check; nothing more to do here than to say so.
            log.debug("check result of %s not delivered yet: %s", registration.service_id, exc)
        await asyncio.sleep(check.interval)
        result = await run_check(check)


def _brief(result: CheckResult) -> str:
    lines = result.output.strip().splitlines()
    return lines[-1][:200] if lines else "(no output)"
