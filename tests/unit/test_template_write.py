"""Writing output files: temporary names that tell a dead writer's leftovers from a live
one's, and a .bak that is always one whole previous version."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dcy.template._write import remove_stale_temps, render_atomically


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temps_of_dead_writers_are_removed(tmp_path: Path) -> None:
    """Leftovers of dead writers (of the file and of its .bak) go; a live writer's, other
    destinations' and unrelated files stay."""
    out = tmp_path / "app.conf"
    dead, live = dead_pid(), os.getpid()
    stale = [f".app.conf.{dead}.abc123_x.tmp", f".app.conf.bak.{dead}.0f0f0f0f.tmp"]
    kept = [
        f".app.conf.{live}.abc123_x.tmp",  # ours, maybe mid-write
        f".app.conf.1.{dead}.abc123_x.tmp",  # the temp of a file named app.conf.1
        f".other.{dead}.abc123_x.tmp",
        "app.conf.tmp",
        ".app.conf.notapid.x.tmp",
    ]
    for name in stale + kept:
        (tmp_path / name).write_text("partial")
    assert remove_stale_temps(out) == 2
    assert sorted(os.listdir(tmp_path)) == sorted(kept)


def test_temp_names_carry_the_writers_pid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The temporary file a write renames into place is named with the writer's pid."""
    out = tmp_path / "app.conf"
    renamed: list[str] = []
    real_replace = os.replace

    def spy(source: str, target: str) -> None:
        renamed.append(os.path.basename(source))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", spy)
    render_atomically(out, "new")
    assert len(renamed) == 1 and renamed[0].startswith(f".app.conf.{os.getpid()}.")
    assert renamed[0].endswith(".tmp") and out.read_text() == "new"


def test_backup_is_the_replaced_file_itself(tmp_path: Path) -> None:
    """The .bak is the previous output, mode kept, made by a rename (never a half copy)."""
    out = tmp_path / "app.conf"
    render_atomically(out, "v1", perms=0o640)
    first = out.stat().st_ino
    render_atomically(out, "v2", backup=True)
    backup = tmp_path / "app.conf.bak"
    assert backup.read_text() == "v1" and backup.stat().st_mode & 0o777 == 0o640
    assert backup.stat().st_ino == first  # the old file itself, linked: nothing copied
    assert out.read_text() == "v2"
    assert sorted(os.listdir(tmp_path)) == ["app.conf", "app.conf.bak"]


def test_a_backup_already_linked_to_the_file_leaves_no_temporary_link(tmp_path: Path) -> None:
    """A renderer killed between its backup and its rename leaves the .bak a second link of
    the current file. The next write must not leave a temporary link behind: a rename of one
    link onto another of the same file does nothing."""
    out = tmp_path / "out.conf"
    out.write_text("old")
    os.link(out, tmp_path / "out.conf.bak")
    assert render_atomically(out, "new", backup=True)
    assert out.read_text() == "new"
    assert (tmp_path / "out.conf.bak").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.conf", "out.conf.bak"]
