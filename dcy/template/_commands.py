"""Running a template's command after its output changed: argv only, never a shell.

A failing or hanging command is logged with its output and does not stop the renderer (unless
the user asked for that); a command shared by several templates runs once per pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass

log = logging.getLogger("dcy.template")


@dataclass(frozen=True, slots=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int | None  # None: killed after the timeout, or could not start
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


async def run_command(argv: tuple[str, ...], *, timeout: float) -> CommandResult:
    """Run ``argv`` (no shell) with a timeout; stdout and stderr are captured together."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        log.error("command %s could not start: %s", list(argv), exc.strerror or exc)
        return CommandResult(argv, None, str(exc))
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        # The whole process group: a reload script's children must not outlive it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        output = (await process.communicate())[0]
        text = output.decode(errors="replace")
        log.error("command %s timed out after %gs; output:\n%s", list(argv), timeout, text)
        return CommandResult(argv, None, text)
    text = output.decode(errors="replace")
    if process.returncode != 0:
        log.error("command %s exited %s; output:\n%s", list(argv), process.returncode, text)
    else:
        log.info("command %s ok", list(argv))
    return CommandResult(argv, process.returncode, text)
