"""When a failed attempt of a request by name may be made again, and how failures read.

The rule (RFC 9110 §9.2.2 for which methods are idempotent): an attempt whose connection was
never made sent nothing, so any method may go to another instance. Once the request may have
reached a server, only idempotent methods are sent again, and only with a body that can be
sent twice (bytes, text, a form or ``json=``; not a stream that the first try consumed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

from dcy._errors import AllInstancesFailed
from dcy._query import Instance

# Answers of an instance that an idempotent request by service name retries elsewhere.
RETRY_STATUSES: frozenset[int] = frozenset({502, 503, 504})

IDEMPOTENT_METHODS: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Raised before a single byte of the request left: safe to send anywhere else.
NOT_CONNECTED = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
_REPLAYABLE_BODIES = (bytes, bytearray, str, Mapping, list, tuple)

Attempts = Sequence[tuple[Instance, BaseException]]


def may_retry(method: str, options: Mapping[str, Any], *, sent: bool) -> bool:
    """Whether a failed attempt may be made again on another instance."""
    return replayable(options) and (not sent or method.upper() in IDEMPOTENT_METHODS)


def replayable(options: Mapping[str, Any]) -> bool:
    """Whether the request body (``data=``) can be sent a second time; ``json=`` always can."""
    data = options.get("data")
    return data is None or isinstance(data, _REPLAYABLE_BODIES)


def within(timeout: aiohttp.ClientTimeout, seconds: float) -> aiohttp.ClientTimeout:
    """The session's timeouts, with the whole exchange cut to ``seconds`` at most."""
    total = seconds if timeout.total is None else min(timeout.total, seconds)
    return aiohttp.ClientTimeout(
        total=total,
        connect=timeout.connect,
        sock_read=timeout.sock_read,
        sock_connect=timeout.sock_connect,
        ceil_threshold=timeout.ceil_threshold,
    )


def status_error(response: aiohttp.ClientResponse) -> aiohttp.ClientResponseError:
    """A retried 502/503/504, as the error recorded for that attempt."""
    return aiohttp.ClientResponseError(
        response.request_info,
        response.history,
        status=response.status,
        message=response.reason or "",
    )


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
    if isinstance(error, aiohttp.ClientResponseError):
        return f"HTTP {error.status} {error.message}".rstrip()
    if isinstance(error, TimeoutError) and not str(error):
        return "TimeoutError: no complete answer within the time budget"
    return f"{type(error).__name__}: {error}"
