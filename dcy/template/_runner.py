"""The renderer: keeps every template's output in step with Consul, and reacts to changes.

It is driven by the watch engine (no Consul client of its own): each query a template touches
becomes a subscription; an answer that changes a value the template used marks that template
(and only that one) dirty; a pass renders the dirty templates whose quiescence period is over,
writes the changed outputs atomically, then runs their commands once each.

Failure rules: while Consul is unreachable the watches keep their last snapshots, so nothing
is re-rendered and no file is touched; a template error keeps the previous output; a failing
command is logged and the renderer carries on unless ``fatal_commands`` is set.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from dcy._errors import DcyError
from dcy._watch import Snapshot, Subscription, WatchEngine
from dcy.template._commands import CommandResult, run_command
from dcy.template._env import EnvPolicy
from dcy.template._gohelper import GoHelper
from dcy.template._gorender import GoTemplateRenderer
from dcy.template._metrics import NoMetrics, RendererMetrics
from dcy.template._render import RenderOutcome, TemplateRenderer
from dcy.template._spec import TemplateSpec
from dcy.template._write import remove_stale_temps, render_atomically

log = logging.getLogger("dcy.template")


class _Wakeup:
    """An Event whose waiter resumes one loop iteration after set(), with a timeout:
    ``asyncio.wait_for(event.wait(), t)`` puts an extra task between a change and its render.
    """

    def __init__(self) -> None:
        self._flag = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._flag = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def clear(self) -> None:
        self._flag = False

    async def wait(self, timeout: float | None) -> None:
        if self._flag:
            return
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, self.set)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()


class CommandFailed(Exception):
    """A command failed and the renderer was told to stop on that."""


class QueryRefused(Exception):
    """Consul refused a query a template makes (the token may not read it, TLS failed):
    the renderer stops, since only a new token, policy or certificate can help."""


@dataclass(frozen=True, slots=True)
class RendererOptions:
    wait: tuple[float, float] | None = None
    missing_key_timeout: float = 30.0
    dry: bool = False
    fatal_commands: bool = False
    sandbox: Path | None = None
    env_policy: EnvPolicy = field(default_factory=EnvPolicy)


@dataclass(eq=False)
class TemplateState:
    spec: TemplateSpec
    renderer: TemplateRenderer | GoTemplateRenderer
    used: dict[Any, Snapshot[Any] | None] = field(default_factory=dict)
    dirty: bool = True
    first_change: float | None = None
    last_change: float | None = None
    rendered: bool = False
    waiting_since: float | None = None
    reported_waiting: bool = False
    last_error: str | None = None
    renders: int = 0
    writes: int = 0
    files: set[Path] = field(default_factory=set)
    missing_keys: set[str] = field(default_factory=set)
    # Queries the last render found unanswered: rendering again before all of them answered
    # could not complete, so their first answers wake the template only together (a template
    # over 200 services would otherwise render ~200 times before its first write).
    awaiting: set[Any] = field(default_factory=set)
    # Queries of ``used`` with a new answer (or a refusal) since the last render: a Go-syntax
    # renderer reads only these again (a jinja template runs whole anyway).
    changed: set[Any] = field(default_factory=set)
    last_written: bytes | None = None  # what the file held after our last write or check
    swept: bool = False  # a dead writer's temporary files next to the destination removed


class Renderer:
    """Renders a set of templates for as long as it runs."""

    def __init__(
        self,
        engine: WatchEngine,
        templates: Iterable[TemplateSpec],
        *,
        domain: str,
        specs: Any,
        options: RendererOptions | None = None,
        metrics: RendererMetrics | NoMetrics | None = None,
        on_pass: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self._engine = engine
        self._domain = domain
        self._specs = specs
        self.options = options or RendererOptions()
        self.metrics = metrics or NoMetrics()
        self.metrics.stale_seconds.set_function(self.stale_seconds)
        self.metrics.follow_engine(engine)
        self._on_pass = on_pass
        self._subscriptions: dict[Any, Subscription[Any]] = {}
        # Queries Consul refused for good (ACL, TLS): a template using one fails the run.
        self._refused: dict[Any, DcyError] = {}
        self._users: dict[Any, set[TemplateState]] = {}
        self._wake = _Wakeup()
        self._stopping = False
        # Started with the first Go-syntax (.ctmpl) template: one helper for all of them.
        self._go_helper: GoHelper | None = None
        self.states: list[TemplateState] = []
        self.command_results: list[CommandResult] = []
        self.set_templates(templates)

    # -- configuration -------------------------------------------------------------------
    def set_templates(self, templates: Iterable[TemplateSpec]) -> None:
        """Replace the template set (SIGHUP); everything renders again."""
        for state in self.states:
            self._forget(state)
        now = time.monotonic()
        self.states = [
            TemplateState(spec, self._renderer_for(spec), first_change=now, last_change=now)
            for spec in templates
        ]
        self._wake.set()

    def _renderer_for(self, spec: TemplateSpec) -> TemplateRenderer | GoTemplateRenderer:
        if spec.go_syntax:
            if self._go_helper is None:
                self._go_helper = GoHelper()
            return GoTemplateRenderer(
                spec,
                helper=self._go_helper,
                sandbox=self.options.sandbox,
                local_node=getattr(self._specs, "local_node", None),
                env_policy=self.options.env_policy,
            )
        return TemplateRenderer(
            spec,
            domain=self._domain,
            sandbox=self.options.sandbox,
            specs=self._specs,
            env_policy=self.options.env_policy,
        )

    def source_changed(self, path: Path) -> None:
        """A template source or a file() read by a template changed on disk."""
        resolved = path.resolve()
        now = time.monotonic()
        for state in self.states:
            source = state.spec.source.resolve() if state.spec.source else None
            if source == resolved or resolved in state.files:
                state.renderer.forget_source()
                self._mark_dirty(state, now)

    @property
    def watched_paths(self) -> set[Path]:
        paths = {s.spec.source.resolve() for s in self.states if s.spec.source is not None}
        for state in self.states:
            paths |= state.files
        return paths

    # -- running -------------------------------------------------------------------------
    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self, *, once: bool = False) -> int:
        """Render until stop() (or, with ``once``, until every template is written once).
        Returns an exit status: 0 fine, 1 a template could not be rendered in once mode."""
        try:
            while not self._stopping:
                now = time.monotonic()
                due = [s for s in self.states if s.dirty and self._due(s, now)]
                if due:
                    await self._pass(due)
                    continue
                if once:
                    status = self._once_status(now)
                    if status is not None:
                        return status
                self._report_waiting(now)
                self._wake.clear()
                await self._wake.wait(self._next_deadline(now))
            return 0
        finally:
            await self.aclose()

    def _due(self, state: TemplateState, now: float) -> bool:
        wait = state.spec.wait or self.options.wait
        if not state.rendered or wait is None or state.last_change is None:
            return True  # the first render is never delayed
        low, high = wait
        first = state.first_change if state.first_change is not None else now
        return now >= state.last_change + low or now >= first + high

    def _next_deadline(self, now: float) -> float | None:
        deadlines = []
        for state in self.states:
            wait = state.spec.wait or self.options.wait
            if state.dirty and wait and state.last_change is not None:
                first = state.first_change if state.first_change is not None else now
                deadlines.append(min(state.last_change + wait[0], first + wait[1]))
            if state.waiting_since is not None and not state.reported_waiting:
                deadlines.append(state.waiting_since + self.options.missing_key_timeout)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - now)

    def _once_status(self, now: float) -> int | None:
        if any(s.last_error for s in self.states):
            return 1
        if all(s.rendered for s in self.states):
            return 0
        if any(
            s.waiting_since is not None
            and now - s.waiting_since >= self.options.missing_key_timeout
            for s in self.states
        ):
            self._report_waiting(now)
            return 1
        return None

    async def _pass(self, due: list[TemplateState]) -> None:
        # The collector stays off from the first render to the last write of a pass: a render
        # allocates thousands of objects, and the collections they set off (full ones walk
        # the whole heap) were about a fifth of a big template's render time, between a
        # change and its file (bench/template.py, case 2). Collection resumes after the writes.
        collecting = gc.isenabled()
        gc.disable()
        try:
            commands, written = self._render_and_write(due)
        finally:
            if collecting:
                gc.enable()
        for argv, timeout in commands.items():
            result = await run_command(argv, timeout=timeout)
            self.command_results.append(result)
            self.metrics.command_runs.labels("ok" if result.ok else "failed").inc()
            if not result.ok and self.options.fatal_commands:
                raise CommandFailed(f"command {list(argv)} failed: {result.output.strip()}")
        if self._on_pass is not None:
            await self._on_pass(written)

    def _render_and_write(
        self, due: list[TemplateState]
    ) -> tuple[dict[tuple[str, ...], float], bool]:
        """Render the due templates and write what changed; the commands to run after."""
        commands: dict[tuple[str, ...], float] = {}
        written = False
        for state in due:
            outcome = self._render(state)
            if outcome.content is None:
                continue
            if self.options.dry:
                sys.stdout.write(f"> {state.spec.destination}\n{outcome.content}")
                sys.stdout.flush()
                continue
            if not state.swept:
                state.swept = True
                removed = remove_stale_temps(state.spec.destination)
                if removed:
                    log.info(
                        "removed %d temporary file(s) a killed writer left next to %s",
                        removed,
                        state.spec.destination,
                    )
            try:
                changed = render_atomically(
                    state.spec.destination,
                    outcome.content,
                    perms=state.spec.perms,
                    backup=state.spec.backup,
                    create_dirs=state.spec.create_dest_dirs,
                    last_written=state.last_written,
                )
            except OSError as exc:
                state.last_written = None
                state.last_error = f"cannot write {state.spec.destination}: {exc}"
                log.error("%s", state.last_error)
                self.metrics.render_errors.labels(state.spec.name).inc()
                continue
            state.last_written = outcome.content.encode()
            if changed:
                state.writes += 1
                written = True
                self.metrics.writes.labels(state.spec.name).inc()
                log.info("rendered %s", state.spec.destination)
                if state.spec.command:
                    timeout = commands.get(state.spec.command, 0.0)
                    commands[state.spec.command] = max(timeout, state.spec.command_timeout)
        return commands, written

    def _render(self, state: TemplateState) -> RenderOutcome:
        now = time.monotonic()
        state.dirty = False
        state.first_change = None
        changed, state.changed = state.changed, set()
        outcome = state.renderer.render(self._snapshot, changed=changed)
        state.renders += 1
        self.metrics.renders.labels(state.spec.name).inc()
        self._track(state, outcome)
        if outcome.refused is not None:
            # Not the template's fault, and no retry or edit of it can help: the token or
            # the TLS setup must change. Nothing is written; the run ends with this error.
            state.last_error = outcome.error
            self.metrics.render_errors.labels(state.spec.name).inc()
            raise QueryRefused(f"template {outcome.error}; nothing written") from outcome.refused
        if outcome.error is not None:
            if outcome.error != state.last_error:
                log.error("template %s; keeping the previous output", outcome.error)
            state.last_error = outcome.error
            self.metrics.render_errors.labels(state.spec.name).inc()
            outcome.content = None
            return outcome
        state.last_error = None
        if not outcome.complete:
            if state.waiting_since is None:
                state.waiting_since = now
            outcome.content = None
            return outcome
        if state.reported_waiting:
            log.info("template %s has all its data now", state.spec.name)
        state.waiting_since = None
        state.reported_waiting = False
        state.rendered = True
        self.metrics.waiting.labels(state.spec.name).set(0)
        return outcome

    def _report_waiting(self, now: float) -> None:
        for state in self.states:
            if (
                state.waiting_since is not None
                and not state.reported_waiting
                and now - state.waiting_since >= self.options.missing_key_timeout
            ):
                state.reported_waiting = True
                names = sorted(str(s) for s in state.used if state.used[s] is None)
                keys = sorted(state.missing_keys)
                log.warning(
                    "template %s is still waiting after %.0fs for %s; nothing is written "
                    "until they exist",
                    state.spec.name,
                    now - state.waiting_since,
                    ", ".join([*(f"key {k!r}" for k in keys), *names]) or "data",
                )
                self.metrics.waiting.labels(state.spec.name).set(1)

    # -- dependencies ---------------------------------------------------------------------
    def _snapshot(self, spec: Any) -> Snapshot[Any] | None:
        refused = self._refused.get(spec) if self._refused else None
        if refused is not None:
            raise refused
        subscription = self._subscriptions.get(spec)
        if subscription is None:
            subscription = self._engine.subscribe(
                spec, partial(self._on_snapshot, spec), on_end=partial(self._on_refused, spec)
            )
            self._subscriptions[spec] = subscription
            self.metrics.watched_queries.set(len(self._subscriptions))
        return subscription.watch.snapshot

    def _track(self, state: TemplateState, outcome: RenderOutcome) -> None:
        # Sets made from the dicts reuse the hashes they hold (a spec's hash is Python code):
        # a render over 200 watches that changed one value costs no 200 hashes here.
        before, after = set(state.used), set(outcome.used)
        for spec in before - after:
            self._drop_user(spec, state)
        for spec in after - before:  # the state is a user of every spec it used before
            self._users.setdefault(spec, set()).add(state)
        state.used = outcome.used
        state.awaiting = set(outcome.waiting)
        state.files = outcome.files
        state.missing_keys = outcome.missing_keys

    def _drop_user(self, spec: Any, state: TemplateState) -> None:
        users = self._users.get(spec)
        if users is None:
            return
        users.discard(state)
        if not users:
            del self._users[spec]
            subscription = self._subscriptions.pop(spec, None)
            if subscription is not None:
                asyncio.get_running_loop().create_task(subscription.aclose())
            self.metrics.watched_queries.set(len(self._subscriptions))

    def _forget(self, state: TemplateState) -> None:
        for spec in list(state.used):
            self._drop_user(spec, state)
        state.used = {}
        if isinstance(state.renderer, GoTemplateRenderer):
            state.renderer.close()

    def _on_snapshot(self, spec: Any, snapshot: Snapshot[Any]) -> None:
        now = time.monotonic()
        for state in tuple(self._users.get(spec, ())):
            state.changed.add(spec)
            used = state.used.get(spec)
            # A stale flag flipping over an unchanged value changes nothing in the output.
            if used is snapshot or (used is not None and used.value is snapshot.value):
                continue
            if used is None and spec in state.awaiting:
                state.awaiting.discard(spec)
                if state.awaiting:
                    continue
            self._mark_dirty(state, now)

    def _on_refused(self, spec: Any, error: DcyError) -> None:
        """Consul refused a query for good: its templates render once more and fail on it."""
        self._refused[spec] = error
        now = time.monotonic()
        for state in tuple(self._users.get(spec, ())):
            state.changed.add(spec)
            self._mark_dirty(state, now)

    def _mark_dirty(self, state: TemplateState, now: float) -> None:
        if not state.dirty:
            state.first_change = now
        state.dirty = True
        state.last_change = now
        self._wake.set()

    def stale_seconds(self) -> float:
        """Age of the oldest data in use while Consul is unreachable; 0 when all is fresh."""
        ages = [
            s.watch.snapshot.age
            for s in self._subscriptions.values()
            if s.watch.snapshot is not None and s.watch.snapshot.stale
        ]
        return max(ages, default=0.0)

    @property
    def stale(self) -> bool:
        return any(
            s.watch.snapshot is not None and s.watch.snapshot.stale
            for s in self._subscriptions.values()
        )

    async def aclose(self) -> None:
        if self._go_helper is not None:
            self._go_helper.close()
            self._go_helper = None
        subscriptions = list(self._subscriptions.values())
        self._subscriptions.clear()
        self._users.clear()
        await asyncio.gather(*(s.aclose() for s in subscriptions), return_exceptions=True)
