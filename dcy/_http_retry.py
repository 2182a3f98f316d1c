"""When a failed attempt of a request by name may be made again, and how failures read.

The rule (RFC 9110 §9.2.2 for which methods are idempotent): an attempt whose connection was
never made sent nothing, so any method may go to another instance. Once the request may have
reached a server, only idempotent methods are sent again, and only with a body that can be
sent twice (bytes, text, a form or ``json=``; not a stream that the first try consumed).

Nothing here knows an HTTP library: aiohttp, requests and httpx clients all decide with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dcy._errors import AllInstancesFailed
from dcy._query import Instance

# Answers of an instance that an idempotent request by service name retries elsewhere.
RETRY_STATUSES: frozenset[int] = frozenset({502, 503, 504})

IDEMPOTENT_METHODS: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_REPLAYABLE_BODIES = (bytes, bytearray, str, Mapping, list, tuple)

Attempts = Sequence[tuple[Instance, BaseException]]


class RetriedStatus(Exception):
    """A 502/503/504 answer that was retried on another instance, as recorded in
    ``AllInstancesFailed.attempts`` by the requests and httpx clients (the aiohttp client
    records aiohttp's own ``ClientResponseError``)."""

    def __init__(self, status: int, message: str, url: str) -> None:
        super().__init__(f"HTTP {status} {message} from {url}".replace("  ", " "))
        self.status = status
        self.message = message
        self.url = url


def may_retry(method: str, options: Mapping[str, Any], *, sent: bool) -> bool:
    """Whether a failed attempt may be made again on another instance (aiohttp options)."""
    return retry_allowed(method, replayable=replayable(options), sent=sent)


def retry_allowed(method: str, *, replayable: bool, sent: bool) -> bool:
    """Whether a failed attempt may be made again, whatever the HTTP library."""
    return replayable and (not sent or method.upper() in IDEMPOTENT_METHODS)


def replayable(options: Mapping[str, Any]) -> bool:
    """Whether the request body (``data=``) can be sent a second time; ``json=`` always can."""
    data = options.get("data")
    return data is None or isinstance(data, _REPLAYABLE_BODIES)


def all_failed(method: str, service: str, tried: Attempts, *, sent: bool) -> AllInstancesFailed:
    """The error for a request by name that got no answer; ``sent``: the last attempt may
    have reached its server, which is why it was not made again."""
    details = ", ".join(f"{i.hostport} ({describe(e)})" for i, e in tried) or "none"
    if sent and tried:
        message = (
            f"{method} to {service!r} failed at {tried[-1][0].hostport} after the request "
            f"was sent ({describe(tried[-1][1])}); not retried, it may have reached the "
            f"server. Tried: {details}"
        )
    else:
        message = f"{method} to {service!r}: no instance answered. Tried: {details}"
    return AllInstancesFailed(message, service=service, attempts=tuple(tried))


def describe(error: BaseException) -> str:
    # A retried answer, as aiohttp's ClientResponseError or our RetriedStatus: both carry
    # the status and reason as attributes.
    status = getattr(error, "status", None)
    if isinstance(status, int):
        return f"HTTP {status} {getattr(error, 'message', '')}".rstrip()
    if isinstance(error, TimeoutError) and not str(error):
        return "TimeoutError: no complete answer within the time budget"
    return f"{type(error).__name__}: {error}"
