"""The process whose life the registration follows: a child we start, or a PID we watch.

A child gets its own process group, so a Ctrl-C in the terminal or honcho's ``killpg`` reaches
dcy-register alone and the child hears each signal exactly once (forwarded); and it is tied to
dcy-register with ``PR_SET_PDEATHSIG``, so a SIGKILLed dcy-register cannot leave it behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("dcy.register_cli")

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


class CannotStart(RuntimeError):
    """The command could not be executed; ``exit_code`` is what a shell would return."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def exit_code_of(returncode: int) -> int:
    """A shell's view of a child's end: its code, or 128+N after a death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


class ChildProcess:
    """A command started by dcy-register; signals sent to dcy-register are forwarded."""

    forwards_signals = True

    def __init__(self, process: asyncio.subprocess.Process, argv: Sequence[str]) -> None:
        self._process = process
        self.pid = process.pid
        self.description = f"{argv[0]} (pid {process.pid})"

    @classmethod
    async def start(cls, argv: Sequence[str]) -> ChildProcess:
        parent = os.getpid()

        def die_with_parent() -> None:
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:  # the parent died before prctl took effect
                os.kill(os.getpid(), signal.SIGTERM)

        try:
            process = await asyncio.create_subprocess_exec(
                *argv, process_group=0, preexec_fn=die_with_parent
            )
        except FileNotFoundError as exc:
            raise CannotStart(f"cannot run {argv[0]!r}: command not found", 127) from exc
        except PermissionError as exc:
            raise CannotStart(f"cannot run {argv[0]!r}: permission denied", 126) from exc
        except OSError as exc:
            raise CannotStart(f"cannot run {argv[0]!r}: {exc.strerror or exc}", 126) from exc
        return cls(process, argv)

    async def wait(self) -> int:
        return exit_code_of(await self._process.wait())

    def send(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._process.send_signal(sig)


class WatchedProcess:
    """A process dcy-register did not start (``--pid``): watched, never signalled. Its exit
    code belongs to its parent, so ``wait`` returns 0 when it is gone."""

    forwards_signals = False

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.description = f"pid {pid}"

    def send(self, sig: int) -> None:
        """Signals to dcy-register end the watch; the watched process is left alone."""

    async def wait(self) -> int:
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return 0
        except OSError:
            # No pidfd (old kernel, seccomp): fall back to looking at /proc.
            await self._poll_proc()
            return 0
        loop = asyncio.get_running_loop()
        gone: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not gone.done():
                gone.set_result(None)

        # A pidfd turns readable once the process has exited, whoever its parent is.
        loop.add_reader(fd, readable)
        try:
            await gone
        finally:
            loop.remove_reader(fd)
            os.close(fd)
        return 0

    async def _poll_proc(self) -> None:
        # Polling is all /proc offers; an Event would need someone to set it.
        while _alive(self.pid):  # noqa: ASYNC110
            await asyncio.sleep(1.0)


def _alive(pid: int) -> bool:
    try:
        # The state follows the parenthesised command name; Z (zombie) has exited.
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
