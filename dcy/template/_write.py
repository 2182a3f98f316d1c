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
    last_written: bytes | None = None,
) -> bool:
    """Write ``content`` to ``destination`` if it differs; return whether it was written.

    ``last_written`` is what the caller itself wrote there last. Content that differs from it
    is written without reading the file first: the read is a fifth of the time from Consul's
    answer to the new file (bench/template.py), and only a file someone else had already
    filled with exactly the new content could tell them apart (it is then written again).
    Unchanged content is always checked against the file, which may have been edited."""
    data = content.encode()
    current: bytes | None = None
    current_mode: int | None = None
    if last_written is not None and data != last_written:
        if perms is None:
            # The file keeps its mode (someone may have changed it): a stat, not a read.
            with contextlib.suppress(FileNotFoundError):
                current_mode = stat.S_IMODE(os.stat(destination).st_mode)
    else:
        # One open gives both the current content and its mode.
        try:
            with open(destination, "rb") as handle:
                current = handle.read()
                current_mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
        except FileNotFoundError:
            pass
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
        if backup:
            # One .bak, the previous good output, copied with its mode.
            with contextlib.suppress(FileNotFoundError):
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
