"""Exec mode: supervise one child process that reads the rendered files.

The child starts once every template has been written. After later writes it gets the reload
signal (after a random splay, so a fleet does not reload at once); without a reload signal it is
restarted. Signals the renderer does not use itself are forwarded to it. Restart policy: when
the child exits on its own, the renderer stops and exits with the child's status (as
consul-template does), so a process supervisor above restarts both together.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
from collections.abc import Callable

from dcy.template._config import ExecSettings

log = logging.getLogger("dcy.template.exec")


class ChildSupervisor:
    def __init__(self, settings: ExecSettings, on_exit: Callable[[int], None]) -> None:
        self.settings = settings
        self._on_exit = on_exit
        self.process: asyncio.subprocess.Process | None = None
        self._waiter: asyncio.Task[None] | None = None
        self._stopping = False
        self.restarts = 0

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(*self.settings.command)
        log.info("started %s (pid %s)", list(self.settings.command), self.process.pid)
        self._waiter = asyncio.get_running_loop().create_task(self._wait(self.process))

    async def _wait(self, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if process is self.process and not self._stopping:
            log.warning("child %s exited with %s", process.pid, code)
            self._on_exit(_exit_status(code))

    async def reload(self) -> None:
        """Tell the child its files changed: the reload signal, or a restart."""
        if not self.running:
            return
        if self.settings.splay > 0:
            await asyncio.sleep(random.uniform(0, self.settings.splay))
        assert self.process is not None
        if self.settings.reload_signal is not None:
            self.process.send_signal(self.settings.reload_signal)
            return
        self.restarts += 1
        await self.stop()
        self._stopping = False
        await self.start()

    def forward(self, sig: signal.Signals) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(sig)

    async def stop(self) -> None:
        """kill_signal, then SIGKILL after kill_timeout."""
        self._stopping = True
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(self.settings.kill_signal)
        try:
            await asyncio.wait_for(process.wait(), self.settings.kill_timeout)
        except TimeoutError:
            log.warning(
                "child %s ignored %s; killing it", process.pid, self.settings.kill_signal.name
            )
            process.kill()
            await process.wait()


def _exit_status(code: int) -> int:
    # Like a shell: death by signal N is 128 + N.
    return 128 - code if code < 0 else code
