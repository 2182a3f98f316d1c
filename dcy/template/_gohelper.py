"""The Go helper process that renders consul-template syntax (``tools/ctmpl-helper``).

One helper serves every Go-syntax template of a renderer, for as long as the renderer runs.
It gets no environment at all (no Consul address, no token): it never talks to Consul, and
``env()``/``file()`` come back here as callbacks, where dcy-template's env policy and sandbox
rules apply. Requests are JSON lines; a reply is a JSON header line followed by the output's
raw bytes, and repeats a template's "used"/"missing" lists only when they changed. The
protocol is described in tools/ctmpl-helper/main.go.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HELPER_ENV = "DCY_CTMPL_HELPER"
HELPER_NAME = "dcy-ctmpl"
# A render that takes longer is stopped (the helper is killed and started again next time):
# ``loop 1000000000`` must not hang the renderer and every other template with it.
RENDER_TIMEOUT = 30.0


class HelperError(Exception):
    """The helper could not be started, died, or did not answer in time."""


def helper_path() -> Path:
    """Where the helper is: $DCY_CTMPL_HELPER, next to the running Python (scripts/install
    links it into the virtualenv), ``dcy-ctmpl`` on PATH, or the newest in the build cache
    (``tools/build.py`` builds it into ``~/.cache/dcy/bin``)."""
    configured = os.environ.get(HELPER_ENV)
    if configured:
        return Path(configured)
    beside = Path(sys.executable).with_name(HELPER_NAME)
    if beside.exists():
        return beside
    found = shutil.which(HELPER_NAME)
    if found:
        return Path(found)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    cached = sorted(
        (Path(base) / "dcy" / "bin").glob(f"{HELPER_NAME}-*"),
        key=lambda p: p.stat().st_mtime,
    )
    cached = [p for p in cached if ".partial-" not in p.name]
    if not cached:
        raise HelperError(
            f"the {HELPER_NAME} helper for consul-template syntax is not installed: run "
            f"`python3 tools/build.py {HELPER_NAME}` (or scripts/install), or set {HELPER_ENV}"
        )
    return cached[-1]


Callback = Callable[[str, str, str | None], str]  # (call, argument, default) → value


class GoHelper:
    """The helper process and its pipes; started on first use, again after it died."""

    def __init__(self, path: Path | None = None, *, timeout: float = RENDER_TIMEOUT) -> None:
        self._path = path
        self._timeout = timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._buffer = bytearray()
        # What the helper holds: dependency name → the watch value last sent (by identity),
        # and template id → the source text it has.
        self.sent: dict[str, Any] = {}
        self.texts: dict[str, str] = {}
        # Template id → the "used" and "missing" lists of its last rendered reply: the helper
        # leaves out a list that has not changed.
        self._lists: dict[str, tuple[list[str], list[str]]] = {}
        # Counts the processes started: a new one holds none of the data sent before.
        self.generation = 0

    def _start(self) -> subprocess.Popen[bytes]:
        if self._process is not None and self._process.poll() is None:
            return self._process
        path = self._path or helper_path()
        try:
            self._process = subprocess.Popen(
                [str(path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env={},  # nothing to leak: no address, no token, no secrets
                close_fds=True,
                # A Ctrl-C at the terminal is the renderer's to handle; the helper ends when
                # its stdin closes, whatever way the renderer ends.
                start_new_session=True,
            )
        except OSError as exc:
            raise HelperError(f"cannot start {path}: {exc.strerror or exc}") from exc
        self.generation += 1
        self._buffer.clear()
        self.sent.clear()
        self.texts.clear()
        self._lists.clear()
        return self._process

    def render(
        self,
        template_id: str,
        *,
        text: str,
        data: list[tuple[str, str]],
        err_missing_key: bool,
        callback: Callback,
    ) -> dict[str, Any]:
        """Render one template; ``data`` holds (dependency, JSON) answers new to the helper.
        Returns the helper's reply: ``output`` (text), ``used`` and ``missing`` (lists, the
        same objects as the previous reply's when they did not change), or ``error``."""
        process = self._start()
        head = {"op": "render", "id": template_id, "err_missing_key": err_missing_key}
        if self.texts.get(template_id) != text:
            head["text"] = text
        parts = ",".join(
            '{"dep":' + json.dumps(name) + ',"raw":' + payload + "}" for name, payload in data
        )
        line = json.dumps(head)[:-1] + ',"data":[' + parts + "]}\n"
        deadline = time.monotonic() + self._timeout
        try:
            self._write(process, line.encode())
            while True:
                message = json.loads(self._read_line(process, deadline))
                call = message.get("call")
                if call is None:
                    break
                try:
                    answer = {
                        "value": callback(call, message.get("arg", ""), message.get("default"))
                    }
                except Exception as exc:  # the template's error, reported where it called
                    answer = {"error": str(exc)}
                self._write(process, (json.dumps(answer) + "\n").encode())
            size = message.get("output")
            if size is not None:
                output = self._read_exactly(process, size, deadline).decode(errors="replace")
                used, missing = self._lists.get(template_id, ([], []))
                used = message.get("used", used)
                missing = message.get("missing", missing)
                self._lists[template_id] = (used, missing)
                message = {"output": output, "used": used, "missing": missing}
        except HelperError:
            self.close(kill=True)  # stuck or dead: it must not hold the renderer any longer
            raise
        self.texts[template_id] = text
        return message  # type: ignore[no-any-return]

    def drop(self, template_id: str) -> None:
        """Forget a template that is no longer rendered."""
        if template_id not in self.texts or self._process is None:
            return
        del self.texts[template_id]
        self._lists.pop(template_id, None)
        try:
            self._write(
                self._process, (json.dumps({"op": "drop", "id": template_id}) + "\n").encode()
            )
            self._read_line(self._process, time.monotonic() + self._timeout)
        except HelperError:
            self.close(kill=True)

    def _write(self, process: subprocess.Popen[bytes], data: bytes) -> None:
        assert process.stdin is not None
        try:
            process.stdin.write(data)
            process.stdin.flush()
        except OSError as exc:
            raise HelperError(f"the {HELPER_NAME} helper died: {exc}") from exc

    def _read_line(self, process: subprocess.Popen[bytes], deadline: float) -> bytes:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return line
            self._fill(process, deadline)

    def _read_exactly(self, process: subprocess.Popen[bytes], size: int, deadline: float) -> bytes:
        while len(self._buffer) < size:
            self._fill(process, deadline)
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def _fill(self, process: subprocess.Popen[bytes], deadline: float) -> None:
        """Add what the helper wrote to the buffer, waiting for it until ``deadline``."""
        assert process.stdout is not None
        fd = process.stdout.fileno()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HelperError(f"the render took longer than {self._timeout:.0f}s; stopped")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                break
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            raise HelperError(f"the {HELPER_NAME} helper died (exit {process.wait()})")
        self._buffer += chunk

    def close(self, *, kill: bool = False) -> None:
        """Stop the helper: it ends when its stdin closes (``kill``: at once)."""
        process, self._process = self._process, None
        self.sent.clear()
        self.texts.clear()
        self._lists.clear()
        if process is None:
            return
        if kill:
            process.kill()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):  # a dead helper's pipe
                    stream.close()
        try:
            process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
