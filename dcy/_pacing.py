"""When a watch loop may send its next blocking query: at once after news, never in a hot loop.

A blocking query that returns at once, again and again, is a hot loop: Consul answers it as
fast as it can, for nothing. Two ways a loop gets there, two rules (times passed in, so the
rules are tested without a clock):

* **No news, quickly.** An answer that changed nothing (same index, or the same content
  under a new index: a catalog of service names wakes on every new instance of any
  service) and came back sooner than ``quiet_interval`` after its query was sent delays the
  next query until ``quiet_interval`` after that send. A rolling deploy wakes the catalog
  query on every instance it registers; this turns hundreds of useless answers into one
  every ``quiet_interval``, as consul-template does (its views wait 100 ms in that case).
* **News, sustained.** An answer that changed something is followed by the next query at
  once, so a change made right after another is seen as soon as the first: the first query
  after a change is never delayed. Only a sustained stream of changes is throttled, by a
  token bucket holding ``burst`` queries and refilled one per ``min_interval``.

A loop's first answer counts as no news here while other loops of the engine still wait for
theirs (the watch engine decides): the blocking query after it carries that answer's index,
so nothing is lost by sending it later, and at start-up those queries (one per service of a
big template) would compete with the other loops' first answers and with the first render
(``bench/template.py``, case 2). A loop starting alone (a leadership's lock key) follows up
at once.
"""

from __future__ import annotations


class QueryPacer:
    """The pacing of one watch loop."""

    __slots__ = ("_burst", "_min_interval", "_quiet_interval", "_tokens", "_updated")

    def __init__(self, *, min_interval: float, burst: int, quiet_interval: float) -> None:
        self._min_interval = min_interval
        self._burst = float(burst)
        self._quiet_interval = quiet_interval
        self._tokens = float(burst)
        self._updated: float | None = None

    def _refill(self, now: float) -> None:
        if self._updated is not None and self._min_interval > 0:
            earned = (now - self._updated) / self._min_interval
            self._tokens = min(self._burst, self._tokens + earned)
        self._updated = now

    def delay(self, now: float, *, sent_at: float, news: bool) -> float:
        """Seconds to wait before the next query, after an answer to the query sent at
        ``sent_at`` arrived at ``now``; ``news`` says whether it changed anything."""
        self._refill(now)
        wait = 0.0
        if not news:
            wait = max(0.0, sent_at + self._quiet_interval - now)
        if self._min_interval > 0 and self._tokens < 1:
            wait = max(wait, (1 - self._tokens) * self._min_interval)
        return wait

    def spend(self, now: float) -> None:
        """A query goes out at ``now``."""
        self._refill(now)
        if self._min_interval > 0:
            self._tokens -= 1
