"""Rendering one template in jinja2's sandbox, recording what it depended on.

A render is *complete* when every query it touched had an answer and every ``key`` it read
exists. Only complete renders are written. Templates that loop over data (``services`` then
``service`` for each) discover new queries as answers arrive, so the runner renders again until
a pass touches nothing new: multi-pass discovery.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment

from dcy._errors import DcyError
from dcy._watch import Snapshot
from dcy.template._env import EnvPolicy
from dcy.template._functions import HELPERS, MISSING, DataFunctions
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
    refused: DcyError | None = None  # Consul refused a query for good (ACL, TLS)

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


# Record type → its fields, turned around: which record types have a field of this name.
_TYPES_WITH_FIELD: dict[str, frozenset[type]] = {
    name: frozenset(cls for cls, fields in RECORD_FIELDS.items() if name in fields)
    for name in set().union(*RECORD_FIELDS.values())
}


class _RecordCodeGenerator(CodeGenerator):
    """jinja's compiler with two shortcuts for what config templates do most: read fields of
    dcy's records in loops and print them. A render of 1,000 lines is the whole time between
    a change of one service and its file (bench/template.py), and most of it was generic
    call overhead, not work.

    - ``s.ID`` reads the attribute inline when ``s`` is a record type with that field (its
      data fields are what the sandbox allows anyway), else it takes the sandbox's checked
      ``environment.getattr`` exactly as jinja would.
    - ``{{ a }} {{ b }}:{{ c }}`` becomes one ``yield`` of the joined pieces instead of one per
      piece: a generator resumes once per yield.
    """

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        self._record_fields: set[str] = set()
        super().visit_Template(node, frame)
        for name in sorted(self._record_fields):
            self.writeline(f"_dcy_has_{name} = environment.record_types_with[{name!r}]")

    def visit_Getattr(self, node: nodes.Getattr, frame: Frame) -> None:
        # Only a plain variable is read inline: it is evaluated three times below, which
        # is free for a name and would repeat a call or a lookup for anything else.
        if (
            node.attr not in _TYPES_WITH_FIELD
            or not isinstance(node.node, nodes.Name)
            or self.environment.is_async
        ):
            super().visit_Getattr(node, frame)
            return
        self._record_fields.add(node.attr)
        self.write("(")
        self.visit(node.node, frame)
        self.write(f".{node.attr} if ")
        self.visit(node.node, frame)
        self.write(f".__class__ in _dcy_has_{node.attr} else environment.getattr(")
        self.visit(node.node, frame)
        self.write(f", {node.attr!r}))")

    def visit_Output(self, node: nodes.Output, frame: Frame) -> None:
        if frame.buffer is not None or frame.require_output_check or len(node.nodes) < 2:
            super().visit_Output(node, frame)
            return
        # The buffered form jinja already generates (for {% set %} blocks, macros), into a
        # list of this Output's own, then a single yield.
        self.writeline("_dcy_out = []")
        frame.buffer = "_dcy_out"
        try:
            super().visit_Output(node, frame)
        finally:
            frame.buffer = None
        self.writeline('yield "".join(_dcy_out)')


# One expression must not take the renderer's memory or minutes of its CPU: ``'x' * 10**10``
# or ``10 ** 10 ** 9``. The sandbox bounds ``range`` the same way (MAX_RANGE, 100,000).
MAX_REPEAT = 1_000_000  # items (or characters) a ``*`` may make out of a sequence
MAX_INT_BITS = 16_384  # about 4,900 digits, more than Python will print (4,300)
_SEQUENCES = (str, bytes, list, tuple)


def _check_binop(operator: str, left: Any, right: Any) -> None:
    if operator == "**":
        if (
            type(left) is int
            and type(right) is int
            and abs(left) > 1
            and right * abs(left).bit_length() > MAX_INT_BITS
        ):
            raise SecurityError(f"{left} ** {right} is too big for a template")
        return
    if isinstance(left, int) and isinstance(right, _SEQUENCES):
        left, right = right, left
    if isinstance(left, _SEQUENCES) and isinstance(right, int):
        if len(left) * right > MAX_REPEAT:
            raise SecurityError(
                f"repeating {len(left)} item(s) {right} times makes more than {MAX_REPEAT:,}"
            )
    elif (
        type(left) is int
        and type(right) is int
        and left.bit_length() + right.bit_length() > MAX_INT_BITS
    ):
        raise SecurityError("a product too big for a template")


class _RecordSandbox(SandboxedEnvironment):
    """The sandbox, with fast paths for the data fields of dcy's own immutable records and
    for dcy's own template functions: a template over 200 services reads thousands of fields
    and makes hundreds of calls per render, and the generic safety checks were most of its
    time (see bench/template.py). Everything else goes through the full checks.

    Why the fast paths reach nothing the checks would refuse (tests/unit/
    test_template_sandbox.py tries): ``getattr_`` reads only declared dataclass fields of
    seven frozen record classes, matched by exact type, whose values are str, int, tuples,
    read-only mappings and more records; the compiled ``s.ID`` shortcut takes the same test
    through ``__class__``, which no object a template can reach overrides (jinja's namespace
    answers its real class); ``call`` skips the callable check only for bound methods of
    DataFunctions, the template API itself."""

    code_generator_class = _RecordCodeGenerator
    record_types_with = _TYPES_WITH_FIELD
    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        # Lorem ipsum has no place in a config file, and lipsum(n=10**9) is a memory bomb.
        del self.globals["lipsum"]
        # The compiled template calls ``environment.getattr`` for every ``a.b``: a plain
        # function in the instance's dict skips building a bound method per access and the
        # method lookup through the class chain (a 1,000-line render does 4,000 of them).
        fields_of = RECORD_FIELDS.get
        checked_getattr = super().getattr

        def getattr_(obj: Any, attribute: str) -> Any:
            fields = fields_of(type(obj))
            if fields is not None and attribute in fields:
                return getattr(obj, attribute)
            return checked_getattr(obj, attribute)

        self.getattr = getattr_  # type: ignore[method-assign]

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

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
        self,
        spec: TemplateSpec,
        *,
        domain: str,
        sandbox: Path | None,
        specs: Any,
        env_policy: EnvPolicy | None = None,
    ) -> None:
        self.spec = spec
        self._domain = domain
        self._sandbox = sandbox
        self._env_policy = env_policy
        self._specs = specs
        self._environment = _RecordSandbox(
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
            autoescape=False,
        )
        self._environment.filters.update(HELPERS)
        self._environment.globals.update(HELPERS)
        self._record_cache: dict[Any, tuple[Any, Any]] = {}
        self._query_cache: dict[Any, Any] = {}
        self._compiled: jinja2.Template | None = None
        self._compiled_from: str | None = None
        self._source_signature: tuple[int, int, int] | None = None

    def render(
        self, source: SnapshotSource, *, changed: Collection[Any] | None = None
    ) -> RenderOutcome:
        """Render with the watches' snapshots from ``source``. ``changed`` (the watches with
        news since the last render) is of no use here: the template runs whole, each function
        asking the source as it goes."""
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
            env_policy=self._env_policy,
            error_on_missing_key=self.spec.error_on_missing_key,
            record_cache=self._record_cache,
            query_cache=self._query_cache,
        )
        try:
            content = template.render(functions.globals())
        except DcyError as exc:
            outcome.refused = exc
            outcome.error = f"{self.spec.name}:{_template_line(exc, self.spec.name)}: {exc}"
            return outcome
        except Exception as exc:
            # Template code can raise whatever Python can (a sandbox-refused range is an
            # OverflowError, a macro calling itself a RecursionError): each is that
            # template's error, never the end of the renderer and its other templates.
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
        # A source file is read again only when its stat changed (or watchdog said so): a
        # stat is a third of an open/read/close on the way from a change to its file.
        signature: tuple[int, int, int] | None = None
        if self.spec.source is not None:
            info = os.stat(self.spec.source)
            signature = (info.st_ino, info.st_size, info.st_mtime_ns)
            if self._compiled is not None and signature == self._source_signature:
                return self._compiled
        text = self.spec.read_source()
        if self._compiled is None or text != self._compiled_from:
            self._compiled = self._environment.from_string(text)
            self._compiled.name = self.spec.name
            self._compiled_from = text
        self._source_signature = signature
        return self._compiled

    def forget_source(self) -> None:
        """Read the source again at the next render (it changed on disk)."""
        self._compiled_from = None
        self._source_signature = None


def _template_line(exc: BaseException, name: str) -> str:
    # jinja2 rewrites tracebacks so template frames carry the template's line numbers.
    line = "?"
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename in ("<template>", name):
            line = str(frame.lineno)
    return line
