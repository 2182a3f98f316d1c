"""Prometheus metrics of one renderer, in a registry of its own (several renderers can live
in one process, e.g. in tests), or none at all: prometheus-client is imported only by a run
that serves them (``-status-addr``); :class:`NoMetrics` takes the counts otherwise."""

from __future__ import annotations

from typing import Any


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
