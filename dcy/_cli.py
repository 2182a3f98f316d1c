"""What dcy's command-line programs share: Consul flags, extras, and stopping on a signal.

``dcy-register`` and ``dcy-alert`` take Consul's own CLI flags (``-http-addr``, ``-token``,
...; CONSUL_* variables otherwise) and ``--wait-for-consul``; ``dcy-template`` takes
consul-template's names for the same settings. All three wait for the agent through
``Dcy(wait_for_agent=...)`` and stop on SIGINT/SIGTERM through :func:`unless_stopped`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import signal
from collections.abc import Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from dcy._dcy import Dcy
from dcy._durations import parse_duration
from dcy._watch import WatchOptions

T = TypeVar("T")

# The distributions each extra adds, by the module they provide.
EXTRAS: dict[str, tuple[str, ...]] = {
    "template": ("jinja2", "hcl2", "watchdog", "prometheus_client"),
    "register": ("hcl2", "yaml"),
}


def require_extra(program: str, extra: str) -> None:
    """Exit with a message naming the extra when a module it provides is not installed."""
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(
            f"{program} needs dcy's {extra!r} extra (missing: {', '.join(missing)}): "
            f"pip install 'dcy[{extra}]'"
        )


class _Arguments(Protocol):
    """An argparse parser or argument group."""

    def add_argument(self, *names: str, **options: Any) -> Any: ...


CONSUL_FLAGS_TITLE = "Consul (flags as in Consul's CLI; else CONSUL_*)"


def add_consul_flags(group: _Arguments, *, wait_default: float | None) -> None:
    """Consul's CLI flags (each also with two dashes) and ``--wait-for-consul``: how long
    to wait for an agent that does not answer yet (``wait_default`` None: forever)."""
    group.add_argument("-http-addr", "--http-addr", "--consul-addr", dest="http_addr")
    group.add_argument("-token", "--token", dest="token")
    group.add_argument("-token-file", "--token-file", dest="token_file")
    group.add_argument("-ca-file", "--ca-file", dest="ca_file")
    group.add_argument("-ca-path", "--ca-path", dest="ca_path")
    group.add_argument("-client-cert", "--client-cert", dest="client_cert")
    group.add_argument("-client-key", "--client-key", dest="client_key")
    group.add_argument("-tls-server-name", "--tls-server-name", dest="tls_server_name")
    default = "forever" if wait_default is None else f"{wait_default:g}s"
    group.add_argument(
        "--wait-for-consul",
        type=_wait,
        default=wait_default,
        metavar="DURATION",
        help="how long to wait for the agent to answer before giving up (exit 1), or "
        f"'forever' (default {default})",
    )


def _wait(text: str) -> float | None:
    if text.strip().lower() == "forever":
        return None
    try:
        seconds = parse_duration(text, what="--wait-for-consul")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"--wait-for-consul must be positive, got {text!r}")
    return seconds


@dataclass(frozen=True, slots=True)
class ConsulFlags:
    """What :func:`add_consul_flags` read (None: the CONSUL_* environment decides)."""

    http_addr: str | None = None
    token: str | None = None
    token_file: str | None = None
    ca_file: str | None = None
    ca_path: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    tls_server_name: str | None = None
    wait_for_consul: float | None = None  # None: wait forever
    verify: bool | None = None  # None: CONSUL_HTTP_SSL_VERIFY, else verify

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ConsulFlags:
        return cls(**{name: getattr(args, name, None) for name in cls.__dataclass_fields__})

    def client(self, watch_options: WatchOptions | None = None) -> Dcy:
        """A client with these settings. Raises ValueError for a bad address, token file
        or CONSUL_* variable."""
        return Dcy(
            self.http_addr,
            token=self.token,
            token_file=self.token_file,
            ca_file=self.ca_file,
            ca_path=self.ca_path,
            client_cert=self.client_cert,
            client_key=self.client_key,
            tls_server_name=self.tls_server_name,
            verify=self.verify,
            wait_for_agent=self.wait_for_consul,
            watch_options=watch_options,
        )


async def unless_stopped(work: Coroutine[Any, Any, T], stop: asyncio.Event) -> tuple[bool, T]:
    """Run ``work`` until it ends or ``stop`` is set (then cancel it): (finished, result)."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if task.done():
        return True, task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return False, None  # type: ignore[return-value]


@contextmanager
def stop_on_signals(
    stop: asyncio.Event, signals: Sequence[signal.Signals] = (signal.SIGINT, signal.SIGTERM)
) -> Iterator[None]:
    """Set ``stop`` on any of ``signals`` while the block runs (inside the event loop)."""
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
