"""Which URLs name a service, decided once per origin and remembered.

The host of an ``http``/``https`` URL names a service when it is

* a single label such as ``http://worker/square``: the service ``worker`` in the local
  datacenter. Not a service: ``localhost``, labels made of digits only (``http://2130706433/``
  is an integer IPv4 address to every HTTP client), labels with characters a hostname cannot
  have, and the names a client lists in ``external_hosts``;
* Consul's DNS form ``[tag.]name.service[.dc].<domain>`` (``worker.service.sd``,
  ``v2.worker.service.dc2.sd``): the tag and datacenter select instances as they do in DNS.

Everything else passes through untouched: hosts with a dot (``example.com``, ``10.0.0.7``,
``localhost.localdomain``), IPv6 literals, any host with an explicit port (``worker:8080`` is
an address, as a docker-compose name is), and other schemes. Tags and datacenters are only
reachable through the DNS form, because ``v2.worker`` is also a valid real hostname.

Hostnames are case-insensitive, and so are Consul's service names, so hosts are lowercased.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from dcy._query import ServiceQuery, is_registrable_name

LOCAL_HOSTS: frozenset[str] = frozenset({"localhost"})
_SCHEMES = ("http://", "https://")
# More distinct origins than this means URLs are built from data; start over rather than grow.
_MAX_ROUTES = 4096


@dataclass(frozen=True, slots=True)
class Route:
    """Where requests to one origin go: the service to resolve, and the URL start to keep."""

    query: ServiceQuery  # what the resolver is asked, parsed once from the host
    prefix: str  # scheme and user info, e.g. "http://" or "https://user:secret@"


def split_origin(url: str) -> tuple[str, str]:
    """``("scheme://authority", "/path?query#fragment")``; the origin is "" without "://"."""
    start = url.find("://")
    if start < 0:
        return "", url
    start += 3
    end = url.find("/", start)
    if end < 0:
        end = len(url)
    for mark in "?#":
        found = url.find(mark, start, end)
        if found >= 0:
            end = found
    return url[:end], url[end:]


def route_for(
    origin: str, *, domain: str, external_hosts: frozenset[str] = LOCAL_HOSTS
) -> Route | None:
    """The route of ``scheme://authority`` when its host names a service, else None.

    Raises InvalidName for a malformed ``….service.<domain>`` host: it can only mean a
    service, so sending it to DNS would hide the mistake."""
    lowered = origin.lower()
    scheme = next((s for s in _SCHEMES if lowered.startswith(s)), None)
    if scheme is None:
        return None
    authority = origin[len(scheme) :]
    userinfo, _, host = authority.rpartition("@")
    host = host.lower()
    if not host or host.startswith("[") or ":" in host:
        return None  # IPv6 literal or explicit port: an address, not a name
    query = service_query_of(host, domain=domain, external_hosts=external_hosts)
    if query is None:
        return None
    return Route(query, scheme + (userinfo + "@" if userinfo else ""))


def service_query_of(
    host: str, *, domain: str, external_hosts: frozenset[str] = LOCAL_HOSTS
) -> ServiceQuery | None:
    """The service a lowercased host (no port) names, or None for a real host."""
    if "." not in host:
        if host in external_hosts or host.isdigit() or not is_registrable_name(host):
            return None
        return ServiceQuery.parse(host, domain=domain)
    return ServiceQuery.parse_dns(host, domain=domain)


class Router:
    """Routes of the origins seen so far: each origin is classified once."""

    __slots__ = ("_domain", "_external", "_routes", "_urls")

    def __init__(self, *, domain: str, external_hosts: Iterable[str] = ()) -> None:
        self._domain = domain
        self._external = LOCAL_HOSTS | {h.lower().rstrip(".") for h in external_hosts}
        self._routes: dict[str, Route | None] = {}
        # Most callers send the same few URLs over and over: skip even the split for those.
        self._urls: dict[str, tuple[Route, str] | None] = {}

    def route(self, url: str) -> tuple[Route, str] | None:
        """The route of ``url`` and the rest of it after the origin; None to pass through."""
        try:
            return self._urls[url]
        except KeyError:
            pass
        routed = self._route(url)
        if len(self._urls) >= _MAX_ROUTES:
            self._urls.clear()
        self._urls[url] = routed
        return routed

    def _route(self, url: str) -> tuple[Route, str] | None:
        origin, rest = split_origin(url)
        try:
            route = self._routes[origin]
        except KeyError:
            route = route_for(origin, domain=self._domain, external_hosts=self._external)
            if len(self._routes) >= _MAX_ROUTES:
                self._routes.clear()
            self._routes[origin] = route
        if route is None:
            return None
        return route, rest
