"""Generated pipelines of builtins over generated data render the same text under dcy-template
as under consul-template v0.42.1.

Each example is one template of many lines (pipelines over KV values it wrote to the agent,
``printf`` layouts over literals), rendered by one ``-once`` run of each program: a few
dozen process runs for the whole property, not one per expression.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.harness import ConsulAgent
from tools.build import require_binary

pytestmark = pytest.mark.integration

DCY_TEMPLATE = str(Path(sys.executable).with_name("dcy-template"))
_examples = itertools.count()

# Stages that take a string and give one, so any chain of them is valid.
STRING_STAGES = [
    "toUpper",
    "toLower",
    "toTitle",
    "trimSpace",
    "toJSON",
    "html",
    "js",
    "urlquery",
    "sha256Hex",
    "md5sum",
    "base64Encode",
    'printf "%q"',
    'printf "%-12s|"',
    'printf "%x"',
    'printf "%v"',
    'replaceAll "a" "<&>"',
    'regexReplaceAll "[0-9]+" "#"',
    'trimPrefix " "',
    'trimSuffix "\\n"',
    'split "," | join ";"',
    'printf "%s%s" "-"',
    "print",
]
# Stages that end a chain with something else than a string.
LAST_STAGES = ["", "len", 'split ","', 'split "" | len', 'printf "%d"', 'printf "%5.1f"']

VERBS = ["%d", "%5d", "%-5d|", "%x", "%o", "%b", "%v", "%s", "%q", "%t", "%f", "%.2f", "%e", "%g"]

text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
    max_size=16,
)


def go_string(value: str) -> str:
    # A JSON string without \\u escapes of non-ASCII is a valid Go string literal.
    return json.dumps(value, ensure_ascii=False)


literal = st.one_of(
    st.integers(min_value=-(2**40), max_value=2**40).map(str),
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(lambda f: repr(float(f))),
    text.map(go_string),
    st.sampled_from(["true", "false", "nil"]),
)


@st.composite
def lines(draw: st.DrawFn, keys: int) -> str:
    if draw(st.booleans()):
        key = draw(st.integers(min_value=0, max_value=keys - 1))
        stages = draw(st.lists(st.sampled_from(STRING_STAGES), max_size=4))
        last = draw(st.sampled_from(LAST_STAGES))
        pipeline = " | ".join([f'key (printf "%s/k{key}" $p)', *stages, *([last] if last else [])])
        return "{{ " + pipeline + " }}"
    verbs = draw(st.lists(st.sampled_from(VERBS), min_size=1, max_size=3))
    args = draw(st.lists(literal, min_size=len(verbs), max_size=len(verbs)))
    return "{{ printf " + go_string(" ".join(verbs)) + " " + " ".join(args) + " }}"


@st.composite
def examples(draw: st.DrawFn) -> tuple[list[str], list[str]]:
    values = draw(st.lists(text, min_size=1, max_size=4))
    body = draw(st.lists(lines(len(values)), min_size=1, max_size=12))
    return values, body


def put_key(agent: ConsulAgent, key: str, value: str) -> None:
    request = urllib.request.Request(f"{agent.url}/v1/kv/{key}", data=value.encode(), method="PUT")
    urllib.request.urlopen(request, timeout=5).close()


def render(program: list[str], agent: ConsulAgent, src: Path, out: Path) -> tuple[int, bytes]:
    result = subprocess.run(
        [*program, "-once", "-template", f"{src}:{out}"],
        env=dict(os.environ, CONSUL_HTTP_ADDR=agent.http_addr),
        capture_output=True,
        timeout=60,
    )
    return result.returncode, out.read_bytes() if out.exists() else result.stderr


@settings(max_examples=20)
@given(example=examples())
def test_pipelines_render_like_consul_template(
    consul: ConsulAgent,
    tmp_path_factory: pytest.TempPathFactory,
    example: tuple[list[str], list[str]],
) -> None:
    values, body = example
    folder = tmp_path_factory.mktemp("prop")
    prefix = f"prop/{next(_examples)}"
    for i, value in enumerate(values):
        put_key(consul, f"{prefix}/k{i}", value)
    src = folder / "t.ctmpl"
    src.write_text(
        f'{{{{ $p := "{prefix}" }}}}' + "\n".join(f"{i}: {line}" for i, line in enumerate(body))
    )
    ct_status, expected = render(
        [str(require_binary("consul-template")), "-consul-addr", consul.http_addr],
        consul,
        src,
        folder / "ct.out",
    )
    status, actual = render([DCY_TEMPLATE], consul, src, folder / "dcy.out")
    assert (status == 0) == (ct_status == 0), (expected, actual)
    if ct_status == 0:
        assert actual == expected
