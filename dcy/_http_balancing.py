"""Choosing an instance for each HTTP request, and taking failing ones out for a while.

An :class:`Endpoint` is one ``host:port`` the client talks to, shared by every service that
resolves to it; it carries the client's own view of that instance: requests in flight and
consecutive failures. A :class:`Pool` is one service's endpoints as last resolved.

Outlier ejection (as Envoy does it, much simplified): ``eject_after`` consecutive failures
(a connection error, a timeout, or a 502/503/504) take an endpoint out of rotation for
``eject_for`` seconds. Consul's health checks take seconds to notice a dead instance; this
notices it on the first requests. An endpoint is never ejected when no other endpoint of the
pool would be left, and when every endpoint is ejected anyway (pools change), the ejected
ones are used rather than none. The failure count survives the ejection, so an endpoint that
fails again right after coming back is ejected again at once; one success clears it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Container, Sequence
from typing import Literal

from dcy._query import Instance

Strategy = Literal["round_robin", "random", "least_outstanding"]
STRATEGIES: tuple[str, ...] = ("round_robin", "random", "least_outstanding")


class Endpoint:
    """One instance address as this client sees it. Mutable, owned by one client."""

    __slots__ = ("ejected_until", "failures", "hostport", "in_flight")

    def __init__(self, hostport: str) -> None:
        self.hostport = hostport
        self.in_flight = 0  # requests sent and not yet answered with headers
        self.failures = 0  # consecutive
        self.ejected_until = 0.0

    def __repr__(self) -> str:
        return (
            f"Endpoint({self.hostport!r}, in_flight={self.in_flight}, "
            f"failures={self.failures}, ejected_until={self.ejected_until:.3f})"
        )


class Outliers:
    """The ejection rule: when a failure takes an endpoint out, and for how long."""

    __slots__ = ("eject_after", "eject_for")

    def __init__(self, *, eject_after: int = 3, eject_for: float = 10.0) -> None:
        if isinstance(eject_after, bool) or not isinstance(eject_after, int) or eject_after < 1:
            raise ValueError(f"eject_after must be an int >= 1, got {eject_after!r}")
        if not 0 <= eject_for < float("inf"):
            raise ValueError(
                f"eject_for must be a finite number of seconds >= 0, got {eject_for!r}"
            )
        self.eject_after = eject_after
        self.eject_for = eject_for

    def failed(self, endpoint: Endpoint, pool: Sequence[Endpoint], now: float) -> bool:
        """Count a failure; True when it ejects ``endpoint`` now."""
        endpoint.failures += 1
        if endpoint.failures < self.eject_after or endpoint.ejected_until > now:
            return False
        if not any(other is not endpoint and other.ejected_until <= now for other in pool):
            return False  # the last one standing: a guess must not empty the pool
        endpoint.ejected_until = now + self.eject_for
        return True

    @staticmethod
    def succeeded(endpoint: Endpoint) -> None:
        endpoint.failures = 0
        endpoint.ejected_until = 0.0


class Pool:
    """One service's instances as last resolved, their endpoints, and whose turn it is."""

    __slots__ = ("endpoints", "fresh_until", "instances", "snapshot", "turn")

    def __init__(self) -> None:
        self.instances: tuple[Instance, ...] = ()
        self.endpoints: tuple[Endpoint, ...] = ()
        self.turn = -1
        self.fresh_until = 0.0  # when to ask the resolver's cache again (failover pools)
        self.snapshot: object | None = None  # the resolver snapshot the pool was built from

    def update(self, instances: tuple[Instance, ...], endpoint: Callable[[str], Endpoint]) -> None:
        if instances is not self.instances:
            self.instances = instances
            self.endpoints = tuple(endpoint(i.hostport) for i in instances)

    def choose(self, strategy: str, exclude: Sequence[Endpoint], now: float) -> int:
        """Index of the endpoint to try next, or -1 when every one is in ``exclude``.

        Ejected endpoints are skipped unless nothing else is left. ``least_outstanding``
        breaks ties in round-robin order, so equally idle endpoints share the load. A retry
        (``exclude`` not empty) takes the next endpoint without using up a turn: a failing
        instance must not shift the rotation of the requests that follow."""
        endpoints = self.endpoints
        count = len(endpoints)
        if not count:
            return -1
        if strategy == "random":
            start = random.randrange(count)
        else:
            if not exclude:
                self.turn += 1
            start = self.turn % count
        least = -1
        least_load = 0
        fallback = -1
        for step in range(count):
            index = (start + step) % count
            endpoint = endpoints[index]
            if endpoint in exclude:
                continue
            if endpoint.ejected_until > now:
                if fallback < 0:
                    fallback = index
                continue
            if strategy != "least_outstanding":
                return index
            if least < 0 or endpoint.in_flight < least_load:
                least, least_load = index, endpoint.in_flight
        return least if least >= 0 else fallback

    def has_other(self, exclude: Container[Endpoint]) -> bool:
        """Whether an endpoint outside ``exclude`` is left to try."""
        return any(e not in exclude for e in self.endpoints)
