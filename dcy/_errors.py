"""The exceptions dcy raises.

    DcyError
    ├── ConsulUnavailable       the agent could not be reached or did not answer in time
    ├── TlsError                the agent's certificate (or ours) was refused: not transient
    ├── ConsulError             the agent answered, but with an error (bad request, 5xx)
    │   └── AclDenied           the token is missing or lacks a permission (HTTP 403)
    ├── LookupFailed            a name could not be resolved to an instance
    │   ├── ServiceNotFound     Consul knows no instance of the service at all
    │   └── NoHealthyInstances  instances exist, none in the wanted health states
    └── AllInstancesFailed      an HTTP request by service name got no answer it could return

Invalid arguments (a malformed name, a port out of range) raise ``ValueError`` before anything
reaches Consul; ``InvalidName`` is that ``ValueError`` for names and queries.

Errors of the layers below (aiohttp, py-consul, dnspython) never escape: they are mapped here at
the boundary with ``raise ... from exc``, so the original stays on ``__cause__``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dcy._query import Instance


class DcyError(Exception):
    """Base of every error dcy raises on purpose."""


class ConsulUnavailable(DcyError):
    """The Consul agent could not be reached, or did not answer within the allowed time."""

    def __init__(self, message: str, *, address: str | None = None) -> None:
        super().__init__(message)
        self.address = address


class TlsError(DcyError):
    """The TLS handshake with the agent failed (unknown CA, wrong name, bad client cert).

    Retrying does not help, so this is raised at once instead of waiting for a timeout."""


class ConsulError(DcyError):
    """Consul answered with an error."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AclDenied(ConsulError):
    """Consul refused the request for lack of an ACL permission (HTTP 403)."""


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

    ``attempts`` lists every instance tried, in order, with what went wrong there (an
    aiohttp error, or a ``ClientResponseError`` for a retried 502/503/504); the last error is
    also the ``__cause__``. A request that may have reached a server (a POST whose connection
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
