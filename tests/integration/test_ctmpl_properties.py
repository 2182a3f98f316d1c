"""Generated pipelines of builtins over generated data render the same text under dcy-template
as under consul-template v0.42.1.

Each example is a set of templates of many lines each (pipelines over KV values written to the
agent, ``printf`` layouts over literals), rendered by one ``-once`` run of each program: two
process runs per example set, not one per expression.
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
from hypothesis import Phase, given, settings
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


def render(
    program: list[str], agent: ConsulAgent, pairs: list[tuple[Path, Path]]
) -> subprocess.CompletedProcess[bytes]:
    flags = [f for src, out in pairs for f in ("-template", f"{src}:{out}")]
    return subprocess.run(
        [*program, "-once", *flags],
        env=dict(os.environ, CONSUL_HTTP_ADDR=agent.http_addr),
        capture_output=True,
        timeout=60,
    )


# No shrinking: each step would run both programs again (minutes on a red run); a failure
# names the template and shows its text instead.
@settings(max_examples=8, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(example_set=st.lists(examples(), min_size=8, max_size=16))
def test_pipelines_render_like_consul_template(
    consul: ConsulAgent,
    tmp_path_factory: pytest.TempPathFactory,
    example_set: list[tuple[list[str], list[str]]],
) -> None:
    """One hypothesis example is a set of templates: one run of each program renders them
    all, then they are compared one by one."""
    folder = tmp_path_factory.mktemp("prop")
    sources = []
    for number, (values, body) in enumerate(example_set):
        prefix = f"prop/{next(_examples)}"
        for i, value in enumerate(values):
            put_key(consul, f"{prefix}/k{i}", value)
        src = folder / f"t{number}.ctmpl"
        src.write_text(
            f'{{{{ $p := "{prefix}" }}}}' + "\n".join(f"{i}: {line}" for i, line in enumerate(body))
        )
        sources.append(src)
    theirs = render(
        [str(require_binary("consul-template")), "-consul-addr", consul.http_addr],
        consul,
        [(src, src.with_suffix(".ct")) for src in sources],
    )
    ours = render([DCY_TEMPLATE], consul, [(src, src.with_suffix(".dcy")) for src in sources])
    assert (ours.returncode == 0) == (theirs.returncode == 0), (theirs.stderr, ours.stderr)
    if theirs.returncode == 0:
        for src in sources:
            expected = src.with_suffix(".ct").read_bytes()
            actual = src.with_suffix(".dcy").read_bytes()
            assert actual == expected, f"{src.name}:\n{src.read_text()}"
