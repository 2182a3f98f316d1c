"""Rules of the code base that a reader cannot check by running it, checked on its syntax:
Consul's words are read in one place, there is one retry policy, and no dependency's
private names are used."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("dcy", "svc")
EVERYTHING = (*PRODUCT, "tests", "bench", "tasks", "tools", "images")
OWN_PACKAGES = {"dcy", "svc", "tests", "bench", "tasks", "tools"}


def _modules(*folders: str) -> Iterator[tuple[Path, ast.Module]]:
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path, ast.parse(path.read_text(), str(path))


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"


def test_consul_answers_are_read_only_by_the_classification_table() -> None:
    """No `"..." in str(error)` outside dcy/_answers.py: callers look at error classes."""
    found = []
    for path, tree in _modules(*PRODUCT):
        if path.name == "_answers.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(
                isinstance(op, ast.In | ast.NotIn) for op in node.ops
            ):
                texts = [c for c in node.comparators if _is_text_of(c)]
                if texts:
                    found.append(_where(path, node))
    assert found == []


def _is_text_of(node: ast.AST) -> bool:
    """``str(x)``, ``str(x).lower()``, ``x.args``: the text of something."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return _is_text_of(node.func.value)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return node.func.id in ("str", "repr")
    return isinstance(node, ast.Attribute) and node.attr == "args"


def test_delays_grow_only_in_the_shared_retry_policy() -> None:
    """Exponential growth (``2 ** n``) and retry jitter live in dcy/_backoff.py alone, and a
    sleep after a failure (in an ``except`` block) waits a delay the shared policy gave
    (``retry.next_delay()``, ``retry.wait()``)."""
    found = []
    for path, tree in _modules(*PRODUCT):
        if path.name == "_backoff.py":
            continue
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.BinOp)
                and isinstance(node.op, ast.Pow)
                and isinstance(node.left, ast.Constant)
                and node.left.value == 2
                and not isinstance(node.right, ast.Constant)
            ):
                found.append(f"{_where(path, node)} doubling")
            if _calls(node, "uniform") and _where(path, node) not in JITTER_ELSEWHERE:
                found.append(f"{_where(path, node)} jitter")
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                found += [f"{_where(path, s)} sleep" for s in _sleeps_not_from_policy(node)]
    assert found == []


# Random delays that are not retries: consul-template's -exec-splay spreads reloads.
JITTER_ELSEWHERE = {"dcy/template/_exec.py:52"}


def _calls(node: ast.AST, name: str) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == name
    )


def _sleeps_not_from_policy(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.Call]:
    from_policy = {
        target.id
        for node in ast.walk(function)
        if isinstance(node, ast.Assign)
        and any(_calls(sub, "next_delay") for sub in ast.walk(node.value))
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    bad = []
    for handler in ast.walk(function):
        if not isinstance(handler, ast.ExceptHandler):
            continue
        for call in ast.walk(handler):
            if isinstance(call, ast.Call) and _calls(call, "sleep") and call.args:
                delay = call.args[0]
                ok = (isinstance(delay, ast.Name) and delay.id in from_policy) or any(
                    _calls(sub, "next_delay") for sub in ast.walk(delay)
                )
                if not ok:
                    bad.append(call)
    return bad


def test_no_private_name_of_a_dependency_is_used() -> None:
    """Every ``x._name`` names something defined in the module itself or in a module of this
    repository it imports; nothing private is imported from another package (aiohttp's
    ``site._server`` and the like are off limits)."""
    found = []
    for path, tree in _modules(*EVERYTHING):
        own = _private_names(tree)
        for imported in _own_imports(tree):
            own |= _private_names(ast.parse(imported.read_text()))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
                found.append(f"{_where(path, node)} .{node.attr}")
            elif _imports_from_elsewhere(node):
                assert isinstance(node, ast.ImportFrom) and node.module
                parts = node.module.split(".") + [a.name for a in node.names]
                if any(_private(part) for part in parts):
                    found.append(f"{_where(path, node)} from {node.module}")
    assert found == []


def _imports_from_elsewhere(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.ImportFrom)
        and node.level == 0
        and node.module is not None
        and node.module.split(".")[0] not in OWN_PACKAGES
    )


def _own_imports(tree: ast.Module) -> Iterator[Path]:
    """The files of this repository's modules that ``tree`` imports."""
    for node in ast.walk(tree):
        dotted: list[str] = []
        if isinstance(node, ast.Import):
            dotted = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            dotted = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in dotted:
            if name.split(".")[0] not in OWN_PACKAGES:
                continue
            base = ROOT.joinpath(*name.split("."))
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.is_file():
                    yield candidate


def test_no_consul_client_library_is_imported() -> None:
    """One Consul client: dcy's own pipeline (dcy/_consul.py), not py-consul."""
    found = []
    for path, tree in _modules(*EVERYTHING):
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            if any(name.split(".")[0] == "consul" for name in names):
                found.append(_where(path, node))
    assert found == []


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_names(tree: ast.Module) -> set[str]:
    """The private names a module defines: functions, classes, attributes and variables it
    assigns, and strings (``__slots__`` entries)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)
    return {name for name in names if _private(name)}
