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
from typing import Any, Protocol, TypeVar

from dcy._dcy import Dcy
from dcy._durations import parse_duration

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


class ConsulFlags(Protocol):
    """The settings of :func:`add_consul_flags` (an argparse namespace, or a plan)."""

    @property
    def http_addr(self) -> str | None: ...
    @property
    def token(self) -> str | None: ...
    @property
    def token_file(self) -> str | None: ...
    @property
    def ca_file(self) -> str | None: ...
    @property
    def ca_path(self) -> str | None: ...
    @property
    def client_cert(self) -> str | None: ...
    @property
    def client_key(self) -> str | None: ...
    @property
    def tls_server_name(self) -> str | None: ...
    @property
    def wait_for_consul(self) -> float | None: ...


def consul_client(flags: ConsulFlags) -> Dcy:
    """A client from the flags of :func:`add_consul_flags` (absent ones: the environment).
    Raises ValueError for a bad address, token file or CONSUL_* variable."""
    return Dcy(
        flags.http_addr,
        token=flags.token,
        token_file=flags.token_file,
        ca_file=flags.ca_file,
        ca_path=flags.ca_path,
        client_cert=flags.client_cert,
        client_key=flags.client_key,
        tls_server_name=flags.tls_server_name,
        wait_for_agent=flags.wait_for_consul,
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
