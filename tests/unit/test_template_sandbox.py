"""The template sandbox in process: known escapes refused, generated attribute chains over
records and functions never reach Python internals (the renderer's fast paths skip the
sandbox's checks for record fields and its own functions), and file()'s rules."""

from __future__ import annotations

import os
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcy._query import Instance
from dcy._specs import CatalogServicesSpec, HealthServiceSpec
from dcy._watch import Snapshot
from dcy.template import _render
from dcy.template._env import EnvPolicy
from dcy.template._functions import HELPERS, DataFunctions
from dcy.template._kvspecs import TemplateSpecs
from dcy.template._records import RECORD_FIELDS
from dcy.template._render import RenderOutcome, TemplateRenderer
from dcy.template._spec import TemplateSpec
from dcy.template.cli import build_parser, config_from_args
from tests.template_escapes import CANARY_TOKEN, ESCAPES, Escape

ENTRY = {
    "Node": {"Node": "n1", "Address": "10.0.0.1", "Datacenter": "dc1"},
    "Service": {"ID": "consul", "Service": "consul", "Port": 8300, "Tags": ["a"],
                "Meta": {"raft": "v3"}},
    "Checks": [{"Node": "n1", "CheckID": "serfHealth", "Name": "Serf", "Status": "passing"}],
}  # fmt: skip


def _source(spec: Any) -> Snapshot[Any] | None:
    if isinstance(spec, HealthServiceSpec):
        return Snapshot((Instance.from_health_entry(ENTRY),), 1, 0.0)
    if isinstance(spec, CatalogServicesSpec):
        return Snapshot({"consul": ["a"]}, 1, 0.0)
    return Snapshot({}, 1, 0.0)


def render(
    text: str, *, sandbox: Path | None = None, env_policy: EnvPolicy | None = None
) -> RenderOutcome:
    spec = TemplateSpec(destination=Path("/nonexistent/out"), contents=text)
    renderer = TemplateRenderer(
        spec, domain="consul", sandbox=sandbox, specs=TemplateSpecs(), env_policy=env_policy
    )
    return renderer.render(_source)


@pytest.fixture(autouse=True)
def canary_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", CANARY_TOKEN)


@pytest.mark.parametrize("escape", ESCAPES, ids=lambda e: e.name)
def test_known_escapes_are_refused_or_harmless(escape: Escape) -> None:
    """Each known sandbox escape is a render error with the expected reason, or renders
    the expected harmless text; nothing carries the token."""
    outcome = render(escape.source, env_policy=EnvPolicy().protecting(CANARY_TOKEN))
    if escape.refused is not None:
        assert outcome.content is None and outcome.error is not None
        assert escape.refused in outcome.error
    else:
        assert outcome.error is None and outcome.content is not None
        assert escape.renders is not None and outcome.content.startswith(escape.renders)
        assert CANARY_TOKEN not in outcome.content


# -- generated attribute chains --------------------------------------------------------------
# Records (read through the fast paths) and functions (called through the fast path for
# dcy's own): where a shortcut past the sandbox's checks would show first.
ROOTS = {
    "s": "service('consul')[0]",
    "check": "service('consul')[0].Checks[0]",
    "meta": "service('consul')[0].ServiceMeta",
    "svc": "services()[0]",
    "fn": "service",
    "envf": "env",
    "helper": "toLower",
    "cls": "namespace",
    "me": "self",
    "gen": "[1]|map('string')",
}
FIELDS = sorted(set().union(*RECORD_FIELDS.values()))
INTERNALS = [
    "__class__", "__mro__", "__subclasses__", "__globals__", "__init__", "__dict__",
    "__self__", "__func__", "__code__", "__dataclass_fields__", "_deps", "_env_policy",
    "_TemplateReference__context", "gi_frame", "f_globals", "mro", "format", "items",
]  # fmt: skip
ACCESSES = ["dot", "item", "attr", "format"]


def _step(var: str, access: str, name: str) -> str:
    return {
        "dot": f"{var}.{name}",
        "item": f"{var}[{name!r}]",
        "attr": f"{var}|attr({name!r})",
        "format": f"'{{0.{name}}}'.format({var})",
    }[access]


chains = st.tuples(
    st.sampled_from(sorted(ROOTS)),
    st.lists(
        st.tuples(
            st.sampled_from(ACCESSES),
            st.one_of(st.sampled_from(INTERNALS), st.sampled_from(FIELDS)),
            st.booleans(),  # call the result with no arguments
        ),
        min_size=1,
        max_size=4,
    ),
)


class _Probe:
    """A template global that keeps whatever a chain reached."""

    def __init__(self) -> None:
        self.reached: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.reached.append(value)
        return ""


@pytest.fixture(scope="module")
def probe() -> Iterator[_Probe]:
    recorder = _Probe()
    patch = pytest.MonkeyPatch()
    patch.setattr(_render, "HELPERS", {**HELPERS, "probe": recorder})
    yield recorder
    patch.undo()


def _forbidden(value: Any) -> str | None:
    """Why ``value`` is a way into Python's internals, or None when it is harmless."""
    if isinstance(value, types.ModuleType | types.FrameType | types.CodeType):
        return "a module, frame or code object"
    if isinstance(value, types.CellType | types.TracebackType):
        return "a closure cell or traceback"
    if value is os.environ:
        return "os.environ"
    if isinstance(value, dict | types.MappingProxyType) and any(
        isinstance(k, str) and k.startswith("__") for k in value
    ):
        return "a namespace dict (globals, vars)"
    if isinstance(value, type) and value.__name__ not in ("Cycler", "Joiner", "Namespace"):
        return f"the class {value.__name__}"
    if (
        isinstance(value, types.FunctionType)
        and value not in set(HELPERS.values())
        and value.__name__ != "safe_range"
    ):
        return f"the function {value.__qualname__}"
    if isinstance(value, types.MethodType) and type(value.__self__) is DataFunctions:
        return None  # the template's own data functions
    module = type(value).__module__
    if module.startswith("dcy") and type(value) not in RECORD_FIELDS:
        return f"dcy's internal {type(value).__qualname__}"
    if module.startswith("jinja2") and type(value).__name__ in ("Environment", "Context"):
        return f"jinja's {type(value).__name__}"
    return None


@settings(max_examples=300)
@given(chains)
def test_attribute_chains_never_reach_internals(
    probe: _Probe, chain: tuple[str, list[tuple[str, str, bool]]]
) -> None:
    """Any chain of attribute reads (``.a``, ``['a']``, ``|attr``, ``'{0.a}'.format``) and
    calls over records and functions is refused, or ends at a harmless value."""
    root, steps = chain
    lines = [f"{{% set v0 = {ROOTS[root]} %}}"]
    for i, (access, name, call) in enumerate(steps):
        # Each value is probed as it is reached: a later refused step must not hide it.
        expression = _step(f"v{i}", access, name)
        lines.append(f"{{% set v{i + 1} = ({expression}){'()' if call else ''} %}}")
        lines.append(f"{{{{ probe(v{i + 1}) }}}}{{{{ v{i + 1} }}}}")
    probe.reached.clear()
    outcome = render("".join(lines))
    assert CANARY_TOKEN not in (outcome.content or "") + (outcome.error or "")
    for value in probe.reached:
        assert _forbidden(value) is None, (lines, _forbidden(value))


def test_the_probe_sees_what_it_is_there_to_catch(probe: _Probe) -> None:
    """The chain property can fail: a value the sandbox would never hand out is caught."""
    assert _forbidden(os) and _forbidden(render.__globals__) and _forbidden(str)
    assert _forbidden(DataFunctions.env) and _forbidden(os.environ)
    probe.reached.clear()
    render("{{ probe(service) }}{{ probe(namespace) }}{{ probe('x') }}")
    assert [_forbidden(v) for v in probe.reached] == [None, None, None]


# -- file() ------------------------------------------------------------------------------------
@pytest.fixture
def box(tmp_path: Path) -> Path:
    """A sandbox folder with a file, a sub-folder, and a secret beside it (outside)."""
    sandbox = tmp_path / "box"
    (sandbox / "sub").mkdir(parents=True)
    (sandbox / "motd").write_text("hello")
    (sandbox / "sub" / "inner").write_text("inner")
    (tmp_path / "secret").write_text("outside")
    return sandbox


@pytest.mark.parametrize(
    ("path", "content"),
    [
        ("motd", "hello"),
        ("sub/inner", "inner"),
        ("sub/../motd", "hello"),
        ("./sub/./inner", "inner"),
        ("{box}/motd", "hello"),  # absolute, inside
        ("link-inside", "inner"),  # a symlink to a file inside
    ],
)
def test_file_reads_inside_the_sandbox(box: Path, path: str, content: str) -> None:
    """Relative paths start at the sandbox folder; absolute paths, ``..`` and symlinks are
    fine while they end inside it."""
    (box / "link-inside").symlink_to(box / "sub" / "inner")
    outcome = render(f"{{{{ file({path.format(box=box)!r}) }}}}", sandbox=box)
    assert outcome.error is None and outcome.content == content


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("../secret", "outside the sandbox"),
        ("sub/../../secret", "outside the sandbox"),
        ("{box}/../secret", "outside the sandbox"),
        ("/etc/passwd", "outside the sandbox"),
        ("link-out", "outside the sandbox"),  # a symlink inside pointing out
        ("dir-out/secret", "outside the sandbox"),  # a folder symlink pointing out
        ("", "Is a directory"),
        ("sub", "Is a directory"),
        ("fifo", "not a regular file"),
        ("missing", "No such file"),
        ("token", "holds the renderer's Consul token"),
    ],
)
def test_file_refuses_what_is_not_a_file_inside(box: Path, path: str, message: str) -> None:
    """Paths that end outside, folders, FIFOs (without hanging) and a token file are render
    errors naming the path."""
    (box / "link-out").symlink_to(box.parent / "secret")
    (box / "dir-out").symlink_to(box.parent)
    os.mkfifo(box / "fifo")
    (box / "token").write_text(CANARY_TOKEN + "\n")
    policy = EnvPolicy().protecting(CANARY_TOKEN)
    outcome = render(f"{{{{ file({path.format(box=box)!r}) }}}}", sandbox=box, env_policy=policy)
    assert outcome.content is None and outcome.error is not None
    assert message in outcome.error and f"file({path.format(box=box)!r})" in outcome.error


def test_file_is_disabled_without_a_sandbox(box: Path) -> None:
    """Without -sandbox-path, file() refuses every path, and says how to enable it."""
    outcome = render(f"{{{{ file({str(box / 'motd')!r}) }}}}")
    assert outcome.error is not None and "-sandbox-path" in outcome.error


def test_file_does_not_follow_a_link_swapped_in_after_the_check(
    box: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder replaced by a symlink to outside between the check and the read (a race) is
    refused, not followed."""
    outside = box.parent / "elsewhere"
    outside.mkdir()
    (outside / "inner").write_text("stolen")
    real_resolve = Path.resolve

    def resolve_then_swap(self: Path, strict: bool = False) -> Path:
        resolved = real_resolve(self, strict)
        if resolved.name == "inner" and (box / "sub").is_dir() and not (box / "sub").is_symlink():
            (box / "sub" / "inner").unlink()
            (box / "sub").rmdir()
            (box / "sub").symlink_to(outside)
        return resolved

    monkeypatch.setattr(Path, "resolve", resolve_then_swap)
    outcome = render("{{ file('sub/inner') }}", sandbox=box)
    assert outcome.content is None and outcome.error is not None
    assert "stolen" not in outcome.error


def test_sandbox_path_must_be_a_folder(tmp_path: Path) -> None:
    """-sandbox-path naming no folder is a configuration error, not a file() failure later."""
    (tmp_path / "in.j2").write_text("x")
    args = build_parser().parse_args(
        ["-template", f"{tmp_path / 'in.j2'}:{tmp_path / 'out'}",
         "-sandbox-path", str(tmp_path / "missing")]
    )  # fmt: skip
    with pytest.raises(ValueError, match="is not a folder"):
        config_from_args(args)
