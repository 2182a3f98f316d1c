"""Start a program once what it needs is there: ``python _after.py [--url URL]... [--file
PATH]... -- PROGRAM ARGS...``.

Waits (at most two minutes, then starts anyway: the program's own retries take over) until
every URL answers 200 and every file exists, then replaces itself with PROGRAM, which keeps
this pid: the local cluster's state file and ``down`` know it by that pid. Used where the
order matters inside a host, as the Procfile waits for nsqlookupd before nsqd (nsqd announces
its topics only when it connects, and retries a refused nsqlookupd only every 15 s).
Standard library only.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.request
from pathlib import Path

PATIENCE = 120.0


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        print(
            "usage: _after.py [--url URL]... [--file PATH]... -- PROGRAM ARGS...", file=sys.stderr
        )
        return 2
    split = argv.index("--")
    options, program = argv[:split], argv[split + 1 :]
    urls = [options[i + 1] for i, o in enumerate(options[:-1]) if o == "--url"]
    files = [Path(options[i + 1]) for i, o in enumerate(options[:-1]) if o == "--file"]
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        if all(f.exists() for f in files) and all(ready(u) for u in urls):
            break
        time.sleep(0.2)
    os.execvp(program[0], program)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
