"""Rendering a template in consul-template's Go syntax, through the Go helper.

Same contract as the jinja renderer (:class:`dcy.template._render.TemplateRenderer`): a render
records every watch it used, is incomplete while one has no answer or a ``key`` does not
exist, and reports errors as ``file:line[:col]: message`` without stopping the renderer.

Discovery across passes happens here, within one render: the helper says which dependencies
the template touched; those whose watches already have an answer the helper lacks are sent,
and the template runs again, until it touches nothing new that is available. The rest wait for
their first answer, as for jinja templates.

A render costs what changed, not what the template uses: the runner says which watches have
new answers since the template's last render (``changed``), and the renderer keeps the rest of
what it used then (a template over 200 services asks about the one that changed, not all 200).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

from dcy._errors import DcyError
from dcy._watch import Snapshot
from dcy.template._env import EnvPolicy
from dcy.template._functions import DataFunctions
from dcy.template._godeps import Dependency, UnsupportedDependency, dependency
from dcy.template._gohelper import GoHelper, HelperError
from dcy.template._render import RenderOutcome, SnapshotSource
from dcy.template._spec import TemplateSpec

# A template whose every pass finds more data (a chain of lookups) stops here; the next
# answer renders it again.
MAX_PASSES = 16

_ids = itertools.count(1)


class _NoData:
    """file() and env() need no watches."""

    def value(self, spec: Any) -> Any:
        raise AssertionError("not used")

    def missing_key(self, key: str) -> None:
        raise AssertionError("not used")

    def key_spec(self, key: str, *, datacenter: str | None) -> Any:
        raise AssertionError("not used")

    def prefix_spec(self, prefix: str, *, datacenter: str | None) -> Any:
        raise AssertionError("not used")

    def datacenters_spec(self) -> Any:
        raise AssertionError("not used")


class GoTemplateRenderer:
    """Renders one Go-syntax template through the renderer's shared helper."""

    def __init__(
        self,
        spec: TemplateSpec,
        *,
        helper: GoHelper,
        sandbox: Path | None,
        local_node: str | None = None,
        env_policy: EnvPolicy | None = None,
    ) -> None:
        self.spec = spec
        self._helper = helper
        self._sandbox = sandbox
        self._local_node = local_node
        self._env_policy = env_policy
        self._id = f"t{next(_ids)}"
        self._text: str | None = None
        self._signature: tuple[int, int, int] | None = None
        self._dependencies: dict[str, Dependency] = {}
        self._last_used: list[str] = []
        # What the last render used, when it ended with everything sent to the helper it is
        # still talking to: the snapshots by watch, the names behind each watch, the watches
        # without an answer. None: the next render looks at everything again.
        self._view: dict[Any, Snapshot[Any] | None] | None = None
        self._names: dict[Any, list[str]] = {}
        self._names_of: list[str] | None = None  # the "used" list ``_names`` was made from
        self._waiting: set[Any] = set()
        self._generation = -1

    def render(
        self, source: SnapshotSource, *, changed: Collection[Any] | None = None
    ) -> RenderOutcome:
        """Render with the watches' snapshots from ``source``. ``changed``: the watches with
        a new answer (or a refusal) since this template's last render, when the caller
        knows them (the runner does); None looks at every watch the template used."""
        outcome = RenderOutcome()
        view, self._view = self._view, None  # kept again only if this render ends well
        try:
            text = self._source_text()
        except OSError as exc:
            outcome.error = f"{self.spec.name}: cannot read template: {exc.strerror}"
            return outcome
        local = DataFunctions(
            _NoData(), domain="", sandbox=self._sandbox, env_policy=self._env_policy
        )

        def callback(call: str, argument: str, default: str | None) -> str:
            if call == "file":
                return local.file(argument)
            if call == "env":
                return local.env(argument, default if default is not None else "")
            raise ValueError(f"unknown call {call!r}")

        try:
            generation = self._helper.generation
            # What changed since the last render among what the template used then.
            if changed is None or view is None or generation != self._generation:
                data = self._updates(self._last_used, source, outcome)
            else:
                data = self._changes(view, changed, source, outcome)
            for _ in range(MAX_PASSES):
                reply = self._helper.render(
                    self._id,
                    text=text,
                    data=data,
                    err_missing_key=self.spec.error_on_missing_key,
                    callback=callback,
                )
                if reply.get("error"):
                    outcome.error = self._position(str(reply["error"]))
                    return outcome
                used: list[str] = reply.get("used") or []
                if used == self._last_used and self._helper.generation == generation:
                    # What the first pass checked already (a change of data the template used
                    # before, the common case): nothing new to look up.
                    data = []
                    break
                generation = self._helper.generation  # a new helper has none of the data
                data = self._updates(used, source, outcome)
                if not data:
                    break
        except DcyError as exc:
            # Consul refused a query for good (ACL, TLS): the runner stops on it.
            outcome.refused = exc
            outcome.error = f"{self.spec.name}: {exc}"
            return outcome
        except (HelperError, UnsupportedDependency) as exc:
            outcome.error = f"{self.spec.name}: {exc}"
            return outcome
        finally:
            outcome.files = local.files
        if data:
            # Still discovering after MAX_PASSES: incomplete; the next answer renders again.
            for name, _ in data:
                del self._helper.sent[name]  # computed, never sent
                outcome.waiting.add(self._dependency(name).spec)
        for name in reply.get("missing") or []:
            dep = self._dependency(name)
            if dep.spec not in outcome.waiting:
                # It has an answer and still holds the render back: a ``key`` that does not
                # exist, a ``safeLs`` of an empty folder.
                outcome.missing_keys.add(name)
        outcome.content = reply.get("output") or ""
        if not data:
            # Every pass after a restart of the helper sent it all it lacked (``sent`` was
            # emptied), so the helper now running holds what this render used.
            self._generation = self._helper.generation
            self._keep_view(used, outcome)
        self._last_used = used
        return outcome

    def _keep_view(self, used: list[str], outcome: RenderOutcome) -> None:
        """Remember what this render used, for the next render to start from."""
        if used is self._names_of:
            # The helper's very list from last time: the same watches, the snapshots just read.
            self._view = outcome.used
        else:
            # Only what the template uses now (``outcome.used`` may still hold watches that
            # only the previous source used; the runner lets those go after this render).
            self._names = {}
            for name in used:
                self._names.setdefault(self._dependency(name).spec, []).append(name)
            self._names_of = used
            self._view = {spec: outcome.used[spec] for spec in self._names}
        self._waiting = {spec for spec, snapshot in self._view.items() if snapshot is None}

    def _changes(
        self,
        view: dict[Any, Snapshot[Any] | None],
        changed: Collection[Any],
        source: SnapshotSource,
        outcome: RenderOutcome,
    ) -> list[tuple[str, str]]:
        """``_updates`` of the last render's names, reading only the ``changed`` watches."""
        outcome.used = dict(view)  # a copy: the runner compares it with the last one
        outcome.waiting = set(self._waiting)
        data: list[tuple[str, str]] = []
        for spec in changed:
            names = self._names.get(spec)
            if names is None:
                continue  # not used by this template any more
            snapshot = source(spec)
            outcome.used[spec] = snapshot
            if snapshot is None:
                outcome.waiting.add(spec)
                continue
            outcome.waiting.discard(spec)
            for name in names:
                self._send(name, snapshot.value, data)
        return data

    def _updates(
        self, names: list[str], source: SnapshotSource, outcome: RenderOutcome
    ) -> list[tuple[str, str]]:
        """Record the watches behind ``names``; the answers the helper has not seen yet."""
        data: list[tuple[str, str]] = []
        for name in names:
            spec = self._dependency(name).spec
            snapshot = source(spec)
            outcome.used[spec] = snapshot
            if snapshot is None:
                outcome.waiting.add(spec)
                continue
            self._send(name, snapshot.value, data)
        return data

    def _send(self, name: str, value: Any, data: list[tuple[str, str]]) -> None:
        """Add ``value`` of ``name`` to ``data`` unless the helper has it already."""
        sent = self._helper.sent
        if name in sent and sent[name] is value:
            return
        payload = self._dependency(name).payload(value)
        if payload is None:
            return  # a key that does not exist yet: consul-template waits for it too
        sent[name] = value
        data.append((name, payload))

    def _dependency(self, name: str) -> Dependency:
        dep = self._dependencies.get(name)
        if dep is None:
            dep = dependency(name, local_node=self._local_node)
            if len(self._dependencies) > 4096:
                self._dependencies.clear()  # a template computing endless names
            self._dependencies[name] = dep
        return dep

    def _source_text(self) -> str:
        if self.spec.source is not None:
            info = os.stat(self.spec.source)
            signature = (info.st_ino, info.st_size, info.st_mtime_ns)
            if self._text is not None and signature == self._signature:
                return self._text
            self._signature = signature
        self._text = self.spec.read_source()
        return self._text

    def _position(self, message: str) -> str:
        """Go's ``template: :3:5: executing "" at <x>: ...`` as ``file:3:5: at <x>: ...``."""
        for stage in ("parse: ", "execute: "):
            if message.startswith(stage):
                message = message[len(stage) :]
                break
        if message.startswith("template: :"):
            message = f"{self.spec.name}:" + message[len("template: :") :]
        return message.replace(' executing "" at <', " at <", 1)

    def forget_source(self) -> None:
        self._text = None
        self._signature = None

    def close(self) -> None:
        self._helper.drop(self._id)
