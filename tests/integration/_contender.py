"""A contender in a leader election, run as its own process by the integration tests.

    python -m tests.integration._contender ADDR NAME EVENTS [--ttl 10] [--lock-delay 1]
        [--check-ttl SECONDS]

Appends one line per event to the file EVENTS: ``waiting <pid>``, ``leader <pid>`` once it
leads, ``lost <pid> <reason>`` when it loses leadership. It leads until killed; SIGTERM makes
it step down and exit. With ``--check-ttl`` it registers itself as a service with a TTL
check of that many seconds and binds its session to that check.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from pathlib import Path

from dcy import Dcy, TtlCheck


def _event(path: Path, text: str) -> None:
    with path.open("a") as events:
        events.write(f"{text}\n")


async def contend(args: argparse.Namespace) -> None:
    events = Path(args.events)
    pid = os.getpid()
    async with Dcy(args.addr) as dcy, contextlib.AsyncExitStack() as stack:
        checks: tuple[str, ...] = ()
        if args.check_ttl:
            registration = await dcy.register(
                "leader-contender",
                1,
                service_id=f"leader-contender-{pid}",
                check=TtlCheck(ttl=args.check_ttl),
            )
            stack.push_async_callback(registration.deregister)
            checks = registration.check_ids
        _event(events, f"waiting {pid}")
        leadership = dcy.leadership(
            args.name, ttl=args.ttl, lock_delay=args.lock_delay, checks=checks
        )
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
    parser.add_argument("--check-ttl", type=float, default=0.0)
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
