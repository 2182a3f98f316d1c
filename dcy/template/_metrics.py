"""Prometheus metrics of one renderer, in a registry of its own (several renderers can live
in one process, e.g. in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class RendererMetrics:
    def __init__(self) -> None:
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
