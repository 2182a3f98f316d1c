"""Writing rendered output: only when it changed, atomically, keeping the file's mode.

A reader (nginx reloading, a daemon re-reading its config) sees the old file or the new one,
never a half-written or empty one: the content goes to a temporary file in the same directory,
is fsynced, and replaces the destination with one rename.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path


def render_atomically(
    destination: Path,
    content: str,
    *,
    perms: int | None = None,
    backup: bool = False,
    create_dirs: bool = True,
) -> bool:
    """Write ``content`` to ``destination`` if it differs; return whether it was written."""
    data = content.encode()
    # One open gives both the current content and its mode: this runs on every change, in
    # the time between Consul's answer and the new file (bench/template.py).
    try:
        with open(destination, "rb") as handle:
            current: bytes | None = handle.read()
            current_mode: int | None = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
    except FileNotFoundError:
        current, current_mode = None, None
    if current == data and (perms is None or current_mode == perms):
        return False
    mode = perms if perms is not None else current_mode if current_mode is not None else 0o644
    directory = destination.parent
    try:
        fd, temp_name = _temp_file(destination)
    except FileNotFoundError:
        if not create_dirs:
            raise
        directory.mkdir(parents=True, exist_ok=True)
        fd, temp_name = _temp_file(destination)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        if backup and current is not None:
            # One .bak, the previous good output, copied with its mode.
            shutil.copy2(destination, destination.with_name(destination.name + ".bak"))
        os.replace(temp_name, destination)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    _fsync_directory(directory)
    return True


def _temp_file(destination: Path) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)


def _fsync_directory(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
