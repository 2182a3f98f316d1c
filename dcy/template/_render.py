"""Rendering one template in jinja2's sandbox, recording what it depended on.

A render is *complete* when every query it touched had an answer and every ``key`` it read
exists. Only complete renders are written. Templates that loop over data (``services`` then
``service`` for each) discover new queries as answers arrive, so the runner renders again until
a pass touches nothing new: multi-pass discovery.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment

from dcy._errors import InvalidName
from dcy._watch import Snapshot
from dcy.template._functions import HELPERS, MISSING, DataFunctions, TemplateError
from dcy.template._records import RECORD_FIELDS
from dcy.template._spec import TemplateSpec

SnapshotSource = Callable[[Any], Snapshot[Any] | None]


@dataclass
class RenderOutcome:
    content: str | None = None
    used: dict[Any, Snapshot[Any] | None] = field(default_factory=dict)
    waiting: set[Any] = field(default_factory=set)
    missing_keys: set[str] = field(default_factory=set)
    files: set[Path] = field(default_factory=set)
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.error is None and not self.waiting and not self.missing_keys


class _RecordingDependencies:
    def __init__(self, source: SnapshotSource, outcome: RenderOutcome, specs: Any) -> None:
        self._source = source
        self._outcome = outcome
        self._specs = specs

    def value(self, spec: Any) -> Any:
        snapshot = self._source(spec)
        self._outcome.used[spec] = snapshot
        if snapshot is None:
            self._outcome.waiting.add(spec)
            return MISSING
        return snapshot.value

    def missing_key(self, key: str) -> None:
        self._outcome.missing_keys.add(key)

    def key_spec(self, key: str, *, datacenter: str | None) -> Any:
        return self._specs.key(key, datacenter)

    def prefix_spec(self, prefix: str, *, datacenter: str | None) -> Any:
        return self._specs.prefix(prefix, datacenter)

    def datacenters_spec(self) -> Any:
        return self._specs.datacenters()


# The template functions dcy itself provides (``service``, ``key``, ...): known to be safe.
_OWN_FUNCTIONS = frozenset(
    f for name, f in vars(DataFunctions).items() if callable(f) and not name.startswith("_")
)


class _RecordSandbox(SandboxedEnvironment):
    """The sandbox, with fast paths for the data fields of dcy's own immutable records and
    for dcy's own template functions: a template over 200 services reads thousands of fields
    and makes hundreds of calls per render, and the generic safety checks were most of its
    time (see bench/template.py). Everything else goes through the full checks."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        fields = RECORD_FIELDS.get(type(obj))
        if fields is not None and attribute in fields:
            return getattr(obj, attribute)
        return super().getattr(obj, attribute)

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        if getattr(obj, "__func__", None) in _OWN_FUNCTIONS:
            # What Context.call would do for a function that takes no context.
            kwargs.pop("_loop_vars", None)
            kwargs.pop("_block_vars", None)
            return obj(*args, **kwargs)
        return super().call(context, obj, *args, **kwargs)


class TemplateRenderer:
    """Compiles a template's source (again only when it changed) and renders it."""

    def __init__(
        self, spec: TemplateSpec, *, domain: str, sandbox: Path | None, specs: Any
    ) -> None:
        self.spec = spec
        self._domain = domain
        self._sandbox = sandbox
        self._specs = specs
        self._environment = _RecordSandbox(
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
            autoescape=False,
        )
        self._environment.filters.update(HELPERS)
        self._environment.globals.update(HELPERS)
        self._record_cache: dict[Any, tuple[Any, Any]] = {}
        self._compiled: jinja2.Template | None = None
        self._compiled_from: str | None = None

    def render(self, source: SnapshotSource) -> RenderOutcome:
        outcome = RenderOutcome()
        try:
            template = self._compile()
        except jinja2.TemplateSyntaxError as exc:
            outcome.error = f"{self.spec.name}:{exc.lineno}: syntax error: {exc.message}"
            return outcome
        except OSError as exc:
            outcome.error = f"{self.spec.name}: cannot read template: {exc.strerror}"
            return outcome
        functions = DataFunctions(
            _RecordingDependencies(source, outcome, self._specs),
            domain=self._domain,
            sandbox=self._sandbox,
            error_on_missing_key=self.spec.error_on_missing_key,
            record_cache=self._record_cache,
        )
        try:
            content = template.render(functions.globals())
        except (
            TemplateError,
            InvalidName,
            jinja2.TemplateError,
            ValueError,
            TypeError,
            KeyError,
            AttributeError,
            ZeroDivisionError,
        ) as exc:
            if outcome.waiting:
                # Data still on its way (an empty list indexed, say): not the template's
                # fault yet. The render is incomplete and runs again when the answer is in.
                return outcome
            outcome.error = f"{self.spec.name}:{_template_line(exc, self.spec.name)}: {exc}"
            return outcome
        finally:
            outcome.files = functions.files
        outcome.content = content
        for spec in self._record_cache.keys() - outcome.used.keys():
            del self._record_cache[spec]
        return outcome

    def _compile(self) -> jinja2.Template:
        text = self.spec.read_source()
        if self._compiled is None or text != self._compiled_from:
            self._compiled = self._environment.from_string(text)
            self._compiled.name = self.spec.name
            self._compiled_from = text
        return self._compiled

    def forget_source(self) -> None:
        """Read the source again at the next render (it changed on disk)."""
        self._compiled_from = None


def _template_line(exc: BaseException, name: str) -> str:
    # jinja2 rewrites tracebacks so template frames carry the template's line numbers.
    line = "?"
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename in ("<template>", name):
            line = str(frame.lineno)
    return line
