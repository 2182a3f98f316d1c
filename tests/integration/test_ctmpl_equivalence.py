"""The drop-in promise: every template of tests/ctmpl_corpus renders the same bytes under
dcy-template as under consul-template v0.42.1, on one real agent loaded with a fixed state.

Both programs render the whole corpus in one ``-once`` process each (many ``-template``
flags), so the suite costs two process runs, not eighty.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import ctmpl_state
from tests.harness import ConsulAgent
from tools.build import require_binary

pytestmark = pytest.mark.integration

CORPUS = Path(__file__).resolve().parent.parent / "ctmpl_corpus"
TEMPLATES = sorted(CORPUS.glob("*.ctmpl"))
DCY_TEMPLATE = str(Path(sys.executable).with_name("dcy-template"))
# What env_usage.ctmpl reads; not a secret-looking name, so dcy's env policy lets it through.
ENV = {"CTMPL_APP_NAME": "shop-from-env"}


@dataclass(frozen=True)
class Renders:
    consul_template: Path
    dcy: Path


def render_all(program: list[str], agent: ConsulAgent, out: Path) -> None:
    out.mkdir()
    flags = [f for t in TEMPLATES for f in ("-template", f"{t}:{out / t.stem}")]
    env = dict(os.environ, CONSUL_HTTP_ADDR=agent.http_addr, **ENV)
    result = subprocess.run(
        [*program, "-once", *flags], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"{program[0]} failed:\n{result.stderr[-4000:]}"


@pytest.fixture(scope="module")
def renders(consul: ConsulAgent, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Renders]:
    ctmpl_state.load(consul)
    base = tmp_path_factory.mktemp("ctmpl")
    reference = base / "consul-template"
    ours = base / "dcy"
    render_all(
        [str(require_binary("consul-template")), "-consul-addr", consul.http_addr],
        consul,
        reference,
    )
    render_all([DCY_TEMPLATE], consul, ours)
    yield Renders(reference, ours)


def test_the_corpus_is_big_enough() -> None:
    assert len(TEMPLATES) >= 40


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.stem)
def test_same_bytes_as_consul_template(template: Path, renders: Renders) -> None:
    expected = (renders.consul_template / template.stem).read_bytes()
    actual = (renders.dcy / template.stem).read_bytes()
    assert expected.strip(), f"{template.name} renders nothing: it proves nothing"
    assert actual == expected
