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
    try:
        current = destination.read_bytes()
    except FileNotFoundError:
        current = None
    if current == data and (perms is None or stat.S_IMODE(destination.stat().st_mode) == perms):
        return False
    directory = destination.parent
    if create_dirs:
        directory.mkdir(parents=True, exist_ok=True)
    mode = perms
    if mode is None:
        mode = stat.S_IMODE(destination.stat().st_mode) if current is not None else 0o644
    fd, temp_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp_name, mode)
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
