"""Template sources edited on disk are picked up live (watchdog), no SIGHUP needed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    EVENT_TYPE_CLOSED_NO_WRITE,
    EVENT_TYPE_OPENED,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

_READ_ONLY_EVENTS = frozenset({EVENT_TYPE_OPENED, EVENT_TYPE_CLOSED_NO_WRITE})
# Only writes: then the kernel does not even report the renderer's own reads of a source,
# which would wake watchdog's threads (and take the GIL) in the middle of every render.
_WRITE_EVENTS: list[type[FileSystemEvent]] = [
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
]


class SourceWatcher(FileSystemEventHandler):
    """Calls ``on_change(path)`` on the event loop when a watched file changes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_change: Callable[[Path], None]) -> None:
        self._loop = loop
        self._on_change = on_change
        self._observer = Observer()
        self._directories: set[Path] = set()
        self._paths: set[Path] = set()
        self._observer.start()

    def watch(self, paths: set[Path]) -> None:
        self._paths = {p.resolve() for p in paths}
        for directory in {p.parent for p in self._paths} - self._directories:
            if directory.is_dir():
                # Editors replace files by rename, so watch the folder, not the file.
                self._observer.schedule(
                    self, str(directory), recursive=False, event_filter=_WRITE_EVENTS
                )
                self._directories.add(directory)

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in _READ_ONLY_EVENTS:
            return  # rendering reads the source: reacting to that would render forever
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            if not raw:
                continue
            path = Path(str(raw)).resolve()
            if path in self._paths:
                self._loop.call_soon_threadsafe(self._on_change, path)

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)
