"""The call policy of a blocking client by name (requests, httpx.Client) on a SyncDcy.

The policy's state (pools, endpoints, ejections) lives in the caller's threads, under the
policy's lock; only rebuilding a pool from the resolver's cache goes to the engine thread.
A forked child's client has a new engine and so a new resolver: the policy is rebuilt.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from dcy._http_policy import CallPolicy, Exchange, PolicyOptions

if TYPE_CHECKING:
    from dcy._sync import SyncDcy


class SyncCalls:
    """Where a blocking transport starts each request: a real host, or an Exchange."""

    def __init__(self, client: SyncDcy, options: PolicyOptions) -> None:
        self._client = client
        self._options = options
        self._policy = CallPolicy(client.resolver, **options)  # bad options fail here

    @property
    def policy(self) -> CallPolicy:
        policy = self._policy
        resolver = self._client.resolver
        if policy.resolver is not resolver:
            policy = self._policy = CallPolicy(resolver, **self._options)
        return policy

    def start(self, url: str, method: str, *, replayable: bool) -> tuple[Exchange, str] | None:
        """The exchange of a request to ``url`` by name, and the URL's rest after the
        origin; None when the host is a real one."""
        policy = self.policy
        routed = policy.route(url)
        if routed is None:
            return None
        route, rest = routed
        now = time.monotonic()
        pool = policy.current_pool(route.query, now)
        if pool is None:
            pool = self._client.run(policy.refresh(route.query, now))
        return policy.exchange(pool, route, method, replayable=replayable, now=now), rest
