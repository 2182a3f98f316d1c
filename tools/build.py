"""Build Consul, NSQ and consul-template from the Go module proxy into a per-user cache.

Standard library only: the install script runs this before any virtualenv exists.

Each wrapper module under ``tools/<name>/`` pins one upstream release in its go.mod; that
go.mod is the single source of the version. Binaries land in
``$XDG_CACHE_HOME/dcy/bin/<program>-<version>`` (``~/.cache/dcy/bin`` by default), so every
clone of the repository, including CI's fresh one, reuses them; a binary is rebuilt only when
it is missing or its pinned version changed. ``.bin/<program>`` links in the checkout point at
the cached binaries for convenience.

    python3 tools/build.py            # build what is missing, link .bin/
    python3 tools/build.py --print    # show where each binary is
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent


@dataclass(frozen=True, slots=True)
class Program:
    name: str  # the executable's name
    wrapper: str  # folder under tools/ holding the wrapper go.mod
    module: str  # the upstream module whose version is pinned
    package: str  # the Go package built into the executable
    # Our own Go code lives in the wrapper folder: its hash is part of the cached name, so an
    # edit rebuilds the binary (a pinned upstream version alone would not).
    own_source: bool = False


PROGRAMS: tuple[Program, ...] = (
    Program("consul", "consul", "github.com/hashicorp/consul", "github.com/hashicorp/consul"),
    Program("nsqd", "nsq", "github.com/nsqio/nsq", "github.com/nsqio/nsq/apps/nsqd"),
    Program("nsqlookupd", "nsq", "github.com/nsqio/nsq", "github.com/nsqio/nsq/apps/nsqlookupd"),
    Program("nsqadmin", "nsq", "github.com/nsqio/nsq", "github.com/nsqio/nsq/apps/nsqadmin"),
    # Not part of the product: only bench/template compares against it.
    Program(
        "consul-template",
        "consul-template",
        "github.com/hashicorp/consul-template",
        "github.com/hashicorp/consul-template",
    ),
    # dcy-template's helper for consul-template syntax (.ctmpl): consul-template's own template
    # package behind a pipe, fed with the data dcy's watches fetched (dcy/template/_gohelper.py).
    Program(
        "dcy-ctmpl",
        "ctmpl-helper",
        "github.com/hashicorp/consul-template",
        ".",
        own_source=True,
    ),
)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dcy" / "bin"


def pinned_version(program: Program) -> str:
    """The version of the upstream module required by the wrapper's go.mod."""
    gomod = (TOOLS / program.wrapper / "go.mod").read_text()
    match = re.search(rf"^\s*{re.escape(program.module)}\s+(v\S+)", gomod, re.MULTILINE)
    if not match:
        raise SystemExit(f"tools/{program.wrapper}/go.mod does not require {program.module}")
    return match.group(1)


def binary_path(name: str) -> Path:
    """Where the cached binary of program ``name`` lives (it may not be built yet)."""
    program = _program(name)
    version = pinned_version(program)
    if program.own_source:
        version += "-" + _source_hash(TOOLS / program.wrapper)
    return cache_dir() / f"{program.name}-{version}"


def _source_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.suffix == ".go" or path.name in ("go.mod", "go.sum"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def require_binary(name: str) -> Path:
    """The cached binary of ``name``, or an error that says how to build it."""
    path = binary_path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: build it with `python3 tools/build.py` (or `scripts/install`)"
        )
    return path


def _program(name: str) -> Program:
    for program in PROGRAMS:
        if program.name == name:
            return program
    raise KeyError(f"unknown program {name!r}; known: {', '.join(p.name for p in PROGRAMS)}")


def build(program: Program, *, force: bool = False) -> tuple[Path, float | None]:
    """Build one program unless its cached binary exists; return (path, seconds or None)."""
    target = binary_path(program.name)
    if target.is_file() and not force:
        return target, None
    go = shutil.which("go")
    if go is None:
        raise SystemExit("`go` is not on PATH: install Go 1.26 to build Consul and NSQ")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    started = time.monotonic()
    print(f"building {program.name} {pinned_version(program)} ...", file=sys.stderr, flush=True)
    subprocess.run(
        [go, "build", "-trimpath", "-o", str(partial), program.package],
        cwd=TOOLS / program.wrapper,
        check=True,
    )
    # Rename last: a build killed half-way never leaves a binary that looks complete.
    partial.replace(target)
    return target, time.monotonic() - started


def link_into_checkout() -> None:
    links = ROOT / ".bin"
    links.mkdir(exist_ok=True)
    for program in PROGRAMS:
        _link(links / program.name, binary_path(program.name))
    if sys.prefix != sys.base_prefix:
        # Run by a virtualenv's Python (scripts/install): dcy-template looks for its helper
        # next to its own interpreter first, so it finds the one built from this checkout.
        _link(Path(sys.executable).parent / "dcy-ctmpl", binary_path("dcy-ctmpl"))


def _link(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print binary paths and exit")
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    parser.add_argument("names", nargs="*", help="programs to build (default: all)")
    args = parser.parse_args(argv)
    selected = [_program(n) for n in args.names] if args.names else list(PROGRAMS)
    if args.print:
        for program in selected:
            path = binary_path(program.name)
            state = "ok" if path.is_file() else "missing"
            print(f"{program.name}\t{pinned_version(program)}\t{path}\t{state}")
        return 0
    for program in selected:
        path, seconds = build(program, force=args.force)
        state = "cached" if seconds is None else f"built in {seconds:.0f}s"
        print(f"{program.name:16} {path} ({state})", file=sys.stderr)
    link_into_checkout()
    return 0


if __name__ == "__main__":
    sys.exit(main())
