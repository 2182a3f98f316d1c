"""Writing rendered output: only when it changed, atomically, keeping the file's mode.

A reader (nginx reloading, a daemon re-reading its config) sees the old file or the new one,
never a half-written or empty one: the content goes to a temporary file in the same directory,
is fsynced, and replaces the destination with one rename. The ``.bak`` of the previous output
is made the same way (a hard link to the file about to be replaced, renamed into place).

A renderer killed mid-write (SIGKILL, power loss) leaves its temporary file behind; the name
carries the writer's pid (``.NAME.PID.RANDOM.tmp``), so the next renderer can tell a dead
writer's leftovers from a live one's and remove them (:func:`remove_stale_temps`).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
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
            _backup(destination)
        os.replace(temp_name, destination)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    _fsync_directory(directory)
    return True


def _temp_file(destination: Path) -> tuple[int, str]:
    return tempfile.mkstemp(
        prefix=f".{destination.name}.{os.getpid()}.", suffix=".tmp", dir=destination.parent
    )


def backup_path(destination: Path) -> Path:
    return destination.with_name(destination.name + ".bak")


def _backup(destination: Path) -> None:
    """One .bak, the previous good output with its mode, appearing whole in one rename: a
    copy straight into the .bak would leave half a file there if the renderer died."""
    target = backup_path(destination)
    try:
        if os.path.samefile(destination, target):
            # The .bak is the current file already (a renderer died between its backup and
            # its rename): there is nothing to keep, and renaming a link onto another link of
            # the same file does nothing at all, which would leave the temporary link behind.
            return
    except FileNotFoundError:
        pass
    temp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        os.link(destination, temp)
    except FileNotFoundError:
        return  # nothing rendered there yet
    except OSError:
        # A file system without hard links: a copy, still renamed into place.
        shutil.copy2(destination, temp)
    try:
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def remove_stale_temps(destination: Path) -> int:
    """Remove the temporary files that writers of ``destination`` (and of its .bak) left when
    they died mid-write; a live process's files are left alone. Returns how many went.

    Two renderers writing one destination from different pid namespaces would mistake each
    other's files for a dead writer's; one destination has one writer anyway."""
    removed = 0
    for target in (destination, backup_path(destination)):
        pattern = re.compile(re.escape(f".{target.name}.") + r"(\d+)\.[A-Za-z0-9_]+\.tmp")
        try:
            names = os.listdir(target.parent)
        except OSError:
            continue
        for name in names:
            match = pattern.fullmatch(name)
            if match is None or _alive(int(match.group(1))):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target.parent / name)
                removed += 1
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
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
