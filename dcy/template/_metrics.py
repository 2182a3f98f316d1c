"""Prometheus metrics of one renderer, in a registry of its own (several renderers can live
in one process, e.g. in tests), or none at all: prometheus-client is imported only by a run
that serves them (``-status-addr``); :class:`NoMetrics` takes the counts otherwise."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dcy._watch import WatchEngine


class RendererMetrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        self.renders = Counter(
            "dcy_template_renders", "Template renders", ["template"], registry=self.registry
        )
        self.render_errors = Counter(
            "dcy_template_render_errors",
            "Renders that failed (syntax or runtime error, unwritable destination)",
            ["template"],
            registry=self.registry,
        )
        self.writes = Counter(
            "dcy_template_writes", "Destination files written", ["template"], registry=self.registry
        )
        self.command_runs = Counter(
            "dcy_template_command_runs", "Commands run", ["result"], registry=self.registry
        )
        self.stale_seconds = Gauge(
            "dcy_template_stale_seconds",
            "Age of the oldest data in use while Consul is unreachable (0 when fresh)",
            registry=self.registry,
        )
        self.watched_queries = Gauge(
            "dcy_template_watched_queries", "Consul queries watched", registry=self.registry
        )
        self.waiting = Gauge(
            "dcy_template_waiting",
            "1 while a template waits for data that does not exist (e.g. a missing key)",
            ["template"],
            registry=self.registry,
        )

    def follow_engine(self, engine: WatchEngine) -> None:
        """Export the counters of the watch engine (and its client's connections to the
        agent), read when scraped."""
        self.registry.register(_EngineCollector(engine))


class _EngineCollector:
    """What the engine counts itself, read at each scrape: connections to the agent, the
    blocking queries held, and past the budget, the change detectors' work."""

    def __init__(self, engine: WatchEngine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        engine = self._engine
        connections = getattr(engine.api, "open_connections", None)
        if connections is not None:
            yield GaugeMetricFamily(
                "dcy_template_agent_connections",
                "TCP connections open to the Consul agent, as the kernel counts them",
                value=connections,
            )
        yield GaugeMetricFamily(
            "dcy_template_blocking_queries",
            "Blocking queries held (one per query within the connection budget; past it, "
            "only queries no change detector covers)",
            value=engine.blocking_queries,
        )
        yield GaugeMetricFamily(
            "dcy_template_wide",
            "1 while the watched queries are past the connection budget (change detectors)",
            value=int(engine.wide),
        )
        yield CounterMetricFamily(
            "dcy_template_detector_wakeups",
            "Answers of the change detectors that moved their index",
            value=engine.detector_wakeups,
        )
        yield CounterMetricFamily(
            "dcy_template_refetches",
            "Non-blocking re-fetches of queries a change detector covers",
            value=engine.refetches,
        )
        yield CounterMetricFamily(
            "dcy_template_sweeps",
            "Changes no detector could attribute: every covered query re-fetched",
            value=engine.detectors.sweeps,
        )


class _Ignored:
    """Takes what a Prometheus counter or gauge takes, and keeps none of it."""

    def labels(self, *values: str) -> _Ignored:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def set_function(self, function: Any) -> None:
        pass


class NoMetrics:
    """The metrics of a renderer nobody asks for them: every update is a no-op."""

    registry = None

    def __init__(self) -> None:
        ignored = _Ignored()
        self.renders = self.render_errors = self.writes = self.command_runs = ignored
        self.stale_seconds = self.watched_queries = self.waiting = ignored

    def follow_engine(self, engine: WatchEngine) -> None:
        pass
