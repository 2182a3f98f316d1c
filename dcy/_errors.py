"""The exceptions dcy raises.

    DcyError
    ├── ConsulUnavailable       the agent could not be reached, or could not serve the request
    │                           now (no cluster leader, rate limited, 5xx): transient, retried
    ├── TlsError                the agent's certificate (or ours) was refused: never retried
    ├── ConsulError             the agent answered with a refusal: never retried
    │   ├── AclDenied           the token is missing or lacks a permission (HTTP 401/403)
    │   ├── SessionInvalid      the session does not exist (expired, destroyed, never was)
    │   ├── CheckCritical       a session was refused because a check it names is critical
    │   ├── UnknownCheck        the agent (or a session) names a check that is not registered
    │   └── UnknownService      the agent has no local service with that ID
    ├── LookupFailed            a name could not be resolved to an instance
    │   ├── ServiceNotFound     Consul knows no instance of the service at all
    │   └── NoHealthyInstances  instances exist, none in the wanted health states
    └── AllInstancesFailed      an HTTP request by service name got no answer it could return

Invalid arguments (a malformed name, a port out of range) raise ``ValueError`` before anything
reaches Consul; ``InvalidName`` is that ``ValueError`` for names and queries.

Consul's answers are classified once, where they arrive (``dcy._answers``): callers look at
the class and its attributes, never at the message text. Errors of the layers below (aiohttp,
dnspython) never escape: they are mapped at the boundary with ``raise ... from exc``, so the
original stays on ``__cause__``. :attr:`DcyError.transient` says whether waiting can help;
the one retry policy (``dcy.Backoff``) retries only those.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dcy._query import Instance


class DcyError(Exception):
    """Base of every error dcy raises on purpose."""

    #: Whether the same request may succeed later without anything being changed.
    transient: bool = False


class ConsulUnavailable(DcyError):
    """The Consul agent could not be reached, did not answer within the allowed time, or
    answered that it cannot serve the request now (``status``: 429, 500, 502, 503, 504;
    None when no answer came at all)."""

    transient = True

    def __init__(
        self, message: str, *, address: str | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.address = address
        self.status = status


class TlsError(DcyError):
    """The TLS handshake with the agent failed (unknown CA, wrong name, bad client cert).

    Retrying does not help, so this is raised at once instead of waiting for a timeout."""


class ConsulError(DcyError):
    """Consul answered with a refusal: ``status`` is the HTTP status, ``operation`` the
    request (``"PUT /v1/session/create"``). Subclasses name what was refused in one
    attribute of their own (``session_id``, ``check_id``, ``service_id``)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        operation: str | None = None,
        **subject: str,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.operation = operation
        for name, value in subject.items():
            if name not in type(self).__annotations__:
                raise TypeError(f"{type(self).__name__} has no field {name!r}")
            setattr(self, name, value)


class AclDenied(ConsulError):
    """Consul refused the request for lack of an ACL permission (HTTP 403, or 401)."""


class SessionInvalid(ConsulError):
    """The session ``session_id`` does not exist: it expired, was destroyed, was invalidated
    by a failed check, or never existed."""

    session_id: str = ""


class CheckCritical(ConsulError):
    """Consul refused a session because the check ``check_id`` it names is critical."""

    check_id: str = ""


class UnknownCheck(ConsulError):
    """The check ``check_id`` is not registered (a TTL update, or a session naming it)."""

    check_id: str = ""


class UnknownService(ConsulError):
    """The local agent has no service ``service_id`` (deregistered, or a restarted agent)."""

    service_id: str = ""


class LookupFailed(DcyError):
    """A service name could not be resolved to an instance."""

    def __init__(self, message: str, *, query: str) -> None:
        super().__init__(message)
        self.query = query


class ServiceNotFound(LookupFailed):
    """Consul has no instance of this service in any health state."""


class NoHealthyInstances(LookupFailed):
    """The service has instances, but none in the requested health states."""


class AllInstancesFailed(DcyError):
    """An HTTP request by service name got no answer it could return.

    ``attempts`` lists every instance tried, in order, with what went wrong there: the HTTP
    library's own error (aiohttp, requests or httpx), or for a retried 502/503/504 aiohttp's
    ``ClientResponseError`` or, from requests and httpx, ``dcy.RetriedStatus``; the last error
    is also the ``__cause__``. A request that may have reached a server (a POST whose connection
    broke after sending) is never replayed, so this can name a single instance."""

    def __init__(
        self,
        message: str,
        *,
        service: str,
        attempts: tuple[tuple[Instance, BaseException], ...] = (),
    ) -> None:
        super().__init__(message)
        self.service = service
        self.attempts = attempts

    @property
    def instances(self) -> tuple[Instance, ...]:
        """The instances tried, in order."""
        return tuple(instance for instance, _ in self.attempts)


class InvalidName(ValueError):
    """A service name or query that cannot be parsed; the message quotes the input."""


# -- signals between the HTTP/2 transport (dcy._h2) and the pipeline that classifies them ----
class H2Unavailable(Exception):
    """The agent did not agree to HTTP/2 (ALPN chose HTTP/1.1): use HTTP/1.1 for good."""


class TlsHandshakeFailed(Exception):
    """The TLS handshake of a new HTTP/2 connection failed (its cause says why): a TlsError,
    as a failed handshake of an HTTP/1.1 connection is."""
