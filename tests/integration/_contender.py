"""A contender in a leader election, run as its own process by the integration tests.

    python -m tests.integration._contender ADDR NAME EVENTS [--ttl 10] [--lock-delay 1]

Appends one line per event to the file EVENTS: ``waiting <pid>``, ``leader <pid>`` once it
leads, ``lost <pid> <reason>`` when it loses leadership. It leads until killed; SIGTERM makes
it step down and exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from pathlib import Path

from dcy import Dcy


def _event(path: Path, text: str) -> None:
    with path.open("a") as events:
        events.write(f"{text}\n")


async def contend(args: argparse.Namespace) -> None:
    events = Path(args.events)
    pid = os.getpid()
    async with Dcy(args.addr) as dcy:
        _event(events, f"waiting {pid}")
        leadership = dcy.leadership(args.name, ttl=args.ttl, lock_delay=args.lock_delay)
        async with leadership as leader:
            _event(events, f"leader {pid}")
            reason = await leader.wait_lost()
            _event(events, f"lost {pid} {reason}")
            await asyncio.Event().wait()  # stay alive, not leading, until told to stop


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("addr")
    parser.add_argument("name")
    parser.add_argument("events")
    parser.add_argument("--ttl", type=float, default=10.0)
    parser.add_argument("--lock-delay", type=float, default=1.0)
    args = parser.parse_args()

    async def run() -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        # SIGTERM cancels: the async with blocks step down on the way out.
        with contextlib.suppress(asyncio.CancelledError):
            await contend(args)

    asyncio.run(run())


if __name__ == "__main__":
    main()
