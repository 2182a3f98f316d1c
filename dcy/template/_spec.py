"""What to render where, and what to run afterwards: one TemplateSpec per template.

``-template "src:dest[:command]"`` splits on the first two colons only: source and destination
paths cannot contain a colon (there are no drive letters to special-case), and everything after
the second colon is the command, colons included (``nginx -s reload``, ``curl http://x:1/``).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcy._durations import parse_duration

DEFAULT_COMMAND_TIMEOUT = 30.0
SYNTAXES = (None, "go", "jinja")


@dataclass(frozen=True, slots=True)
class TemplateSpec:
    """One template: source (a file, or inline ``contents``), destination and reactions."""

    destination: Path
    source: Path | None = None
    contents: str | None = None
    command: tuple[str, ...] = ()
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT
    perms: int | None = None
    backup: bool = False
    wait: tuple[float, float] | None = None
    error_on_missing_key: bool = False
    create_dest_dirs: bool = True
    # "go" (consul-template's Go text/template), "jinja", or None: go for a ``.ctmpl`` source.
    syntax: str | None = None

    def __post_init__(self) -> None:
        if self.syntax not in SYNTAXES:
            raise ValueError(
                f"template for {self.destination}: unknown syntax {self.syntax!r}: use go or jinja"
            )
        if (self.source is None) == (self.contents is None):
            raise ValueError(
                f"template for {self.destination}: give exactly one of source or contents"
            )
        if self.command_timeout <= 0:
            raise ValueError(f"template for {self.destination}: command_timeout must be > 0")

    @property
    def go_syntax(self) -> bool:
        """Rendered as consul-template renders it (Go text/template), not with jinja."""
        if self.syntax is not None:
            return self.syntax == "go"
        return self.source is not None and self.source.suffix == ".ctmpl"

    @property
    def name(self) -> str:
        return str(self.source) if self.source is not None else f"(inline) → {self.destination}"

    def read_source(self) -> str:
        if self.contents is not None:
            return self.contents
        assert self.source is not None
        return self.source.read_text()


def parse_template_flag(value: str, *, base: Path | None = None) -> TemplateSpec:
    """Parse one ``-template "src:dest[:command]"`` value."""
    parts = value.split(":", 2)
    if len(parts) < 2 or not parts[0].strip() or not parts[1].strip():
        raise ValueError(f'invalid -template {value!r}: expected "source:destination[:command]"')
    source, destination = (_path(p.strip(), base) for p in parts[:2])
    command = parse_command(parts[2]) if len(parts) == 3 and parts[2].strip() else ()
    return TemplateSpec(destination=destination, source=source, command=command)


def parse_command(value: Any) -> tuple[str, ...]:
    """A command as argv: a list stays as it is; a string is split like a shell would split
    words, but it is never run by a shell (no expansion, no pipes)."""
    if isinstance(value, list | tuple):
        if not value or not all(isinstance(a, str) for a in value):
            raise ValueError(f"invalid command {value!r}: a non-empty list of strings")
        return tuple(value)
    if not isinstance(value, str):
        raise ValueError(f"invalid command {value!r}")
    try:
        argv = tuple(shlex.split(value))
    except ValueError as exc:
        raise ValueError(f"invalid command {value!r}: {exc}") from exc
    if not argv:
        raise ValueError(f"invalid command {value!r}: empty")
    return argv


def parse_perms(value: Any) -> int:
    """File mode as consul-template users write it: ``0644`` in HCL (which python-hcl2 reads
    as the decimal number 644), ``"0644"``, or ``"644"``."""
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or any(c not in "01234567" for c in text):
        raise ValueError(f"invalid perms {value!r}: use octal digits like 0644")
    mode = int(text, 8)
    if mode > 0o7777:
        raise ValueError(f"invalid perms {value!r}: beyond 07777")
    return mode


def spec_from_mapping(raw: dict[str, Any], *, base: Path | None = None) -> TemplateSpec:
    """A ``template {}`` stanza of an HCL config file."""
    known = {
        "source",
        "destination",
        "contents",
        "command",
        "command_timeout",
        "perms",
        "backup",
        "wait",
        "error_on_missing_key",
        "create_dest_dirs",
        "syntax",
    }
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"template stanza: unknown field(s) {', '.join(unknown)}")
    if not raw.get("destination"):
        raise ValueError("template stanza: destination is required")
    wait = raw.get("wait")
    wait_pair: tuple[float, float] | None = None
    if wait:
        block = wait[0] if isinstance(wait, list) else wait
        if isinstance(block, str):
            from dcy._durations import parse_wait

            wait_pair = parse_wait(block)
        else:
            low = parse_duration(block.get("min", 0), what="wait.min")
            wait_pair = (low, parse_duration(block.get("max", low * 4), what="wait.max"))
    return TemplateSpec(
        destination=_path(str(raw["destination"]), base),
        source=_path(str(raw["source"]), base) if raw.get("source") else None,
        contents=raw.get("contents"),
        command=parse_command(raw["command"]) if raw.get("command") else (),
        command_timeout=parse_duration(
            raw.get("command_timeout", DEFAULT_COMMAND_TIMEOUT), what="command_timeout"
        ),
        perms=parse_perms(raw["perms"]) if raw.get("perms") is not None else None,
        backup=bool(raw.get("backup", False)),
        wait=wait_pair,
        error_on_missing_key=bool(raw.get("error_on_missing_key", False)),
        create_dest_dirs=bool(raw.get("create_dest_dirs", True)),
        syntax=str(raw["syntax"]).strip().lower() if raw.get("syntax") else None,
    )


def _path(text: str, base: Path | None) -> Path:
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # "~name" of no known user: a shell keeps it literal too
        path = Path(text)
    return path if path.is_absolute() or base is None else base / path
