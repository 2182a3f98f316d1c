"""What `pip install dcy` gives a user: a library with a small footprint, typed, whose
programs are extras and whose demo services are another distribution.

Built and installed for real: a wheel of this checkout, installed into a new virtualenv
(dependencies from the package index, as a user's would come)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = {"aiohttp", "orjson", "dnspython", "h2"}
# Distributions no library user should get without asking: programs, demo, development.
NOT_FOR_LIBRARY_USERS = {
    "jinja2",
    "python-hcl2",
    "watchdog",
    "prometheus-client",
    "pyyaml",
    "honcho",
    "invoke",
    "pynsq",
    "tornado",
    "py-consul",
    "requests",
    "pytest",
    "hypothesis",
    "ruff",
    "mypy",
    "playwright",
    "dcy-svc",
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy of what the distribution is made of: setuptools leaves a build/
    # folder behind in the tree it builds.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "dcy", source / "dcy", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("dcy-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A new virtualenv with nothing but ``pip install <dcy wheel>``."""
    home = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", str(home)], check=True, timeout=120)
    subprocess.run(
        [str(home / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel)],
        check=True,
        timeout=300,
    )
    yield home


def _requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
    return [
        line.split(":", 1)[1].strip()
        for line in text.splitlines()
        if line.startswith("Requires-Dist:")
    ]


def test_the_library_requires_only_what_it_imports(wheel: Path) -> None:
    """Without extras, the wheel requires aiohttp, orjson, dnspython and h2; the programs'
    dependencies sit behind extras (template, register, cli), dev tools behind dev."""
    base = {
        r.split(">")[0].split("=")[0].split(";")[0].strip().lower()
        for r in _requirements(wheel)
        if "extra ==" not in r
    }
    assert base == LIBRARY
    extras = {
        r.split("extra ==")[1].strip().strip("'\"") for r in _requirements(wheel) if "extra ==" in r
    }
    assert {"template", "register", "cli", "dev"} <= extras


def test_the_wheel_is_typed_and_holds_only_dcy(wheel: Path) -> None:
    """py.typed ships; the demo services (svc) are not part of dcy's wheel."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "dcy/py.typed" in names
    assert not [n for n in names if n.startswith(("svc/", "tests/", "bench/", "tasks/"))]


def test_a_clean_install_pulls_no_program_demo_or_dev_dependency(venv: Path) -> None:
    """`pip install dcy` in a new virtualenv: the library and its four dependencies (with
    theirs), nothing for the programs, the demo system or development."""
    listed = subprocess.run(
        [str(venv / "bin" / "pip"), "list", "--format", "json", "--disable-pip-version-check"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    installed = {d["name"].lower() for d in json.loads(listed.stdout)}
    assert LIBRARY | {"dcy"} <= installed
    assert installed & NOT_FOR_LIBRARY_USERS == set()


def test_the_library_imports_and_programs_name_their_extra(venv: Path) -> None:
    """`import dcy` works with the base install (DNS loaded on first use, a version
    string); dcy-template and dcy-register say which extra they need instead of failing
    with an ImportError, and dcy-alert runs with the base install."""
    python = str(venv / "bin" / "python")
    code = (
        "import sys, dcy; "
        "assert 'dns' not in sys.modules and 'jinja2' not in sys.modules; "
        "r = dcy.DnsResolver; assert 'dns.asyncresolver' in sys.modules; print(dcy.__version__)"
    )
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=venv)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == _version()
    for program, extra in (("dcy-template", "template"), ("dcy-register", "register")):
        done = subprocess.run(
            [str(venv / "bin" / program), "--help"], capture_output=True, text=True, cwd=venv
        )
        assert done.returncode != 0 and f"dcy[{extra}]" in done.stderr, (program, done.stderr)
        assert "Traceback" not in done.stderr
    done = subprocess.run(
        [str(venv / "bin" / "dcy-alert"), "--help"], capture_output=True, text=True, cwd=venv
    )
    assert done.returncode == 0 and "--wait-for-consul" in done.stdout, done.stderr


def _version() -> str:
    for line in (ROOT / "dcy" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip('"')
    raise AssertionError("no __version__ in dcy/__init__.py")
