"""A requests transport adapter that calls services by name: ``http://worker/square``.

    session = requests.Session()
    session.mount("http://", dcy.RequestsAdapter(client))     # client: an open SyncDcy
    session.get("http://worker/square", params={"x": 3}).json()

Hosts are recognised as service names by the aiohttp client's rule (``dcy._http_routing``):
a single label that is not ``localhost`` nor in ``external_hosts``, or Consul's DNS form
``[tag.]name.service[.dc].<domain>``. Every other URL (``http://example.com``, an address,
a host with a port) goes to requests' own adapter untouched. A name is resolved through the
client's shared watch (no extra Consul query), and each attempt goes to one instance's
``address:port`` with urllib3's keep-alive pool for that instance.

Balancing, retries and ejection are the aiohttp client's (``dcy._http_policy``): a refused
connection is tried on another instance for any method; a broken exchange after sending, a
read timeout, or a 502/503/504, only for idempotent methods with a body that can be sent
twice (bytes or text, not a generator or file); at most ``attempts`` tries while ``budget``
seconds last. Without a ``timeout=``, each try's connect and read timeouts are what is left
of the budget (requests has no timeout for a whole exchange). No answer at all raises
AllInstancesFailed.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Unpack

try:
    import requests
    import urllib3
    from requests.adapters import HTTPAdapter
except ImportError as exc:  # pragma: no cover - the extra is installed for the tests
    raise ImportError(
        "dcy.RequestsAdapter needs requests: install it with pip install 'dcy[requests]'",
        name=exc.name,
    ) from exc


from dcy._http_policy import PolicyOptions
from dcy._http_retry import RetriedStatus
from dcy._http_sync import SyncCalls
from dcy._sync import SyncDcy


class RequestsAdapter(HTTPAdapter):
    """requests' ``HTTPAdapter`` that resolves service names; mount it for ``http://`` and
    ``https://``. ``adapter_options`` go to ``HTTPAdapter`` (``pool_maxsize`` per instance:
    raise it to the number of threads that share the session)."""

    def __init__(
        self,
        client: SyncDcy,
        *,
        adapter_options: dict[str, Any] | None = None,
        **options: Unpack[PolicyOptions],
    ) -> None:
        super().__init__(**(adapter_options or {}))
        self._calls = SyncCalls(client, options)

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: bool | str = True,
        cert: Any = None,
        proxies: Any = None,
    ) -> requests.Response:
        url = request.url or ""
        started = self._calls.start(
            url, request.method or "GET", replayable=_replayable(request.body)
        )
        if started is None:
            return super().send(request, stream, timeout, verify, cert, proxies)
        exchange, rest = started
        prefix = exchange.route.prefix
        while (chosen := exchange.next()) is not None:
            instance, endpoint = chosen
            # Aimed at the instance for this try only (copying a request costs as much as
            # the rest of the by-name work): afterwards it names the service again, so the
            # session keeps cookies and resolves redirects for the name.
            target = request.url = prefix + endpoint.hostport + rest
            try:
                response = super().send(
                    request,
                    stream,
                    max(exchange.left(), 0.001) if timeout is None else timeout,
                    verify,
                    cert,
                    proxies,
                )
            except (requests.ConnectionError, requests.Timeout) as error:
                exchange.failed(instance, endpoint, error, sent=not _not_connected(error))
                continue
            except BaseException:
                exchange.released(endpoint)
                raise
            finally:
                request.url = url
            status = response.status_code
            retried = partial(RetriedStatus, status, response.reason or "", target)
            if exchange.answered(instance, endpoint, status, retried):
                return response
            response.close()
        raise exchange.failure()


def _replayable(body: object) -> bool:
    return body is None or isinstance(body, bytes | str)


def _not_connected(error: requests.RequestException) -> bool:
    """Whether the attempt failed before its connection was made: nothing was sent."""
    if isinstance(error, requests.ConnectTimeout):
        return True
    reason = error.args[0] if error.args else None
    if isinstance(reason, urllib3.exceptions.MaxRetryError):
        reason = reason.reason
    # NewConnectionError (refused, unreachable, name resolution) is one of these.
    return isinstance(reason, urllib3.exceptions.ConnectTimeoutError)
