"""``dcy-alert``: report every health check transition Consul sees, as it happens.

    dcy-alert                                   # every check of the local datacenter
    dcy-alert --service worker --debounce 10 --json
    dcy-alert --webhook https://hooks.example/consul --exec notify-send "consul alert"

Each transition is printed as one line (``--json``: one JSON object per line), POSTed as JSON
to every ``--webhook`` (with retries and backoff), and handed to the ``--exec`` command: the
command runs without a shell, gets the transition as JSON on stdin and as ``DCY_*``
environment variables, so nothing Consul reports (check output is written by whoever runs the
check) is ever interpreted by a shell. A failing webhook or command is logged and never stops
the watch; each destination has its own queue, so a slow one delays nobody else.

The agent is found the way Consul's CLI finds it: ``-http-addr`` (or ``--consul-addr``),
``-token``, ... else ``CONSUL_HTTP_ADDR``, ``CONSUL_HTTP_TOKEN`` and the other ``CONSUL_*``
variables. Exit codes: 0 after SIGINT/SIGTERM, 1 when Consul cannot be used (unreachable at
start, ACL or TLS refusals at start or later: a deleted token ends the watch), 2 for usage
errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp

from dcy._backoff import Backoff
from dcy._cli import (
    CONSUL_FLAGS_TITLE,
    ConsulFlags,
    add_consul_flags,
    stop_on_signals,
    unless_stopped,
)
from dcy._dcy import Dcy
from dcy._errors import ConsulUnavailable, DcyError, InvalidName
from dcy._health_events import Transition

log = logging.getLogger("dcy.alert")

# Queued transitions still get this long to reach their destinations after a signal.
SHUTDOWN_GRACE = 5.0
WEBHOOK_BACKOFF = Backoff(base=0.5, cap=30.0)
# How long to wait for the agent at start before exiting 1.
WAIT_FOR_CONSUL = 10.0


# -- command line ------------------------------------------------------------------------------
def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} must be zero or more seconds")
    return value


def _positive(text: str) -> float:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than zero seconds")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be zero or more")
    return value


def _url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcy-alert",
        description="Report Consul health check transitions (passing, warning, critical).",
        epilog="Consul flags default to the CONSUL_* environment variables, as in Consul's CLI.",
        allow_abbrev=False,
    )
    what = parser.add_argument_group("what to watch")
    what.add_argument(
        "--service",
        metavar="NAME",
        help="one service ([tag.]name[@dc]), its node checks included; default: every check",
    )
    what.add_argument(
        "-datacenter", "--datacenter", metavar="DC", help="datacenter (default: the agent's)"
    )
    what.add_argument(
        "--debounce",
        type=_non_negative,
        default=0.0,
        metavar="SECONDS",
        help="report a state only once it has held this long; flaps inside it are dropped",
    )
    out = parser.add_argument_group("where transitions go")
    out.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    out.add_argument(
        "--webhook",
        type=_url,
        action="append",
        default=[],
        metavar="URL",
        help="POST each transition as JSON to URL (may be repeated)",
    )
    out.add_argument("--webhook-timeout", type=_positive, default=10.0, metavar="SECONDS")
    out.add_argument(
        "--webhook-retries",
        type=_count,
        default=3,
        metavar="N",
        help="retries after a failed POST, with exponential backoff (default 3)",
    )
    out.add_argument(
        "--exec",
        dest="command",
        nargs=argparse.REMAINDER,
        metavar="CMD ARG",
        help="run CMD ARG... per transition, without a shell: JSON on stdin, DCY_* environment"
        " variables; must be the last option",
    )
    out.add_argument("--exec-timeout", type=_positive, default=30.0, metavar="SECONDS")
    add_consul_flags(parser.add_argument_group(CONSUL_FLAGS_TITLE), wait_default=WAIT_FOR_CONSUL)
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="of the messages on stderr (default info)",
    )
    return parser


# -- destinations ------------------------------------------------------------------------------
class Destination(Protocol):
    name: str

    async def deliver(self, transition: Transition) -> None: ...

    async def aclose(self) -> None: ...


class PrintDestination:
    name = "stdout"

    def __init__(self, *, as_json: bool) -> None:
        self._as_json = as_json

    async def deliver(self, transition: Transition) -> None:
        line = json.dumps(transition.as_dict()) if self._as_json else str(transition)
        try:
            print(line, flush=True)
        except OSError as exc:  # a closed pipe: keep the other destinations going
            log.error("cannot print a transition: %s", exc)

    async def aclose(self) -> None:
        pass


class WebhookDestination:
    """POSTs each transition as JSON; retries connection errors, 5xx and 429 with backoff."""

    def __init__(self, url: str, *, timeout: float, retries: int) -> None:
        self.name = f"webhook {url}"
        self._url = url
        self._timeout = timeout
        self._retries = retries
        self._session: aiohttp.ClientSession | None = None

    async def deliver(self, transition: Transition) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                headers={"User-Agent": "dcy-alert"},
            )
        problem = ""
        retry = WEBHOOK_BACKOFF.start()
        for attempt in range(self._retries + 1):
            if attempt:
                delay = retry.next_delay() or 0.0
                log.info("%s: %s; retry %d in %.1fs", self.name, problem, attempt, delay)
                await asyncio.sleep(delay)
            try:
                async with self._session.post(self._url, json=transition.as_dict()) as response:
                    if response.status < 400:
                        return
                    problem = f"HTTP {response.status}"
                    if response.status < 500 and response.status != 429:
                        break  # the receiver refuses this request: sending it again won't help
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                problem = str(exc) or type(exc).__name__
        log.error("%s: giving up on %s: %s", self.name, transition.check_id, problem)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def transition_environment(transition: Transition) -> dict[str, str]:
    """The ``DCY_*`` variables a command gets. NUL cannot travel in the environment."""
    values = {
        "DCY_CHECK_ID": transition.check_id,
        "DCY_CHECK": transition.name,
        "DCY_NODE": transition.node,
        "DCY_SERVICE_ID": transition.service_id,
        "DCY_SERVICE": transition.service_name,
        "DCY_OLD_STATUS": transition.old_status,
        "DCY_STATUS": transition.new_status,
        "DCY_OUTPUT": transition.output,
        "DCY_NOTES": transition.notes,
        "DCY_AT": f"{transition.at:.3f}",
    }
    return {key: value.replace("\0", "") for key, value in values.items()}


class CommandDestination:
    """Runs a command per transition: argv as given (no shell), JSON on stdin, DCY_* env.

    The command's stdout goes to our stderr, so it cannot corrupt the transition stream."""

    def __init__(self, argv: Sequence[str], *, timeout: float) -> None:
        self.name = f"command {argv[0]}"
        self._argv = list(argv)
        self._timeout = timeout

    async def deliver(self, transition: Transition) -> None:
        try:
            process = await asyncio.create_subprocess_exec(
                *self._argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=sys.stderr.fileno(),
                env={**os.environ, **transition_environment(transition)},
            )
        except OSError as exc:
            log.error("%s: cannot start: %s", self.name, exc)
            return
        try:
            async with asyncio.timeout(self._timeout):
                await process.communicate(json.dumps(transition.as_dict()).encode() + b"\n")
        except TimeoutError:
            process.kill()
            await process.wait()
            log.error("%s: killed after %gs", self.name, self._timeout)
            return
        if process.returncode:
            log.warning("%s: exited with %s", self.name, process.returncode)

    async def aclose(self) -> None:
        pass


class Fanout:
    """Hands each transition to every destination through its own queue and worker."""

    def __init__(self, destinations: Sequence[Destination]) -> None:
        self._destinations = list(destinations)
        self._queues: list[asyncio.Queue[Transition]] = [asyncio.Queue() for _ in destinations]
        self._workers = [
            asyncio.get_running_loop().create_task(self._work(d, q), name=f"dcy-alert:{d.name}")
            for d, q in zip(self._destinations, self._queues, strict=True)
        ]

    def submit(self, transition: Transition) -> None:
        for queue in self._queues:
            queue.put_nowait(transition)

    async def _work(self, destination: Destination, queue: asyncio.Queue[Transition]) -> None:
        while True:
            transition = await queue.get()
            try:
                await destination.deliver(transition)
            except Exception:
                log.exception("%s failed on %s", destination.name, transition.check_id)
            finally:
                queue.task_done()

    async def aclose(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Let queued transitions go out for at most ``grace`` seconds, then stop."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await asyncio.gather(*(q.join() for q in self._queues))
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        for destination in self._destinations:
            await destination.aclose()


# -- running -----------------------------------------------------------------------------------
async def serve(args: argparse.Namespace, client: Dcy, stop: asyncio.Event) -> int:
    """Watch until ``stop`` is set; the exit code."""
    finished, _ = await unless_stopped(client.open(), stop)
    if not finished:
        return 0
    destinations: list[Destination] = [PrintDestination(as_json=args.json)]
    destinations += [
        WebhookDestination(url, timeout=args.webhook_timeout, retries=args.webhook_retries)
        for url in args.webhook
    ]
    if args.command:
        destinations.append(CommandDestination(args.command, timeout=args.exec_timeout))
    fanout = Fanout(destinations)
    try:
        watch = client.watch_health(
            args.service, fanout.submit, debounce=args.debounce, datacenter=args.datacenter
        )
        what = f"service {args.service}" if args.service else "every check"
        where = args.datacenter or (client.agent.datacenter if client.agent else "")
        try:
            finished, _ = await unless_stopped(watch.ready(args.wait_for_consul), stop)
        except ConsulUnavailable as exc:
            log.warning("%s; still trying", exc)
        else:
            if finished:
                log.info("watching %s in %s (debounce %gs)", what, where, args.debounce)
        # A watch Consul refuses for good (the token was deleted, say) ends the program:
        # an alerter that watches nothing must not look like one that has nothing to say.
        finished, error = await unless_stopped(watch.wait_ended(), stop)
        if finished:
            log.error("stopping: %s", error)
            return 1
        return 0
    finally:
        await client.aclose()
        await fanout.aclose()


async def _main(args: argparse.Namespace, client: Dcy) -> int:
    stop = asyncio.Event()
    with stop_on_signals(stop):
        return await serve(args, client, stop)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is not None and not args.command:
        parser.error("--exec needs a command")
    logging.basicConfig(level=args.log_level.upper(), format="dcy-alert: %(levelname)s %(message)s")
    try:
        client = ConsulFlags.from_args(args).client()
    except ValueError as exc:  # a bad address, token file or CONSUL_* variable
        parser.error(str(exc))
    try:
        return asyncio.run(_main(args, client))
    except InvalidName as exc:
        parser.error(str(exc))
    except DcyError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C before the handlers were installed
        return 0


if __name__ == "__main__":
    sys.exit(main())
