"""dcy-template running consul-template's own ``.ctmpl`` files, against consul-template v0.42.1,
both CLIs as subprocesses on the same agent in the same run (the conventions of
bench/template.py, whose machinery this reuses).

Corpus: the whole of tests/ctmpl_corpus (49 templates) on the fixed state of
tests/ctmpl_state.py, rendered with ``-once`` in one process per tool (one ``-template`` flag
per file), timed from the process's start to its exit, the tools alternating; the outputs are
compared byte for byte first. The same-run floor is ``python -c "import aiohttp, jinja2"``.

Propagation: bench/template.py's case 2 with the same Go template for both tools (ranging
over 200 services × 5 instances: ``services``, then ``service`` for each), dcy-template
rendering it through its Go helper: an extra instance of one service registered or
deregistered, back to back, from the PUT's answer to the file holding the new content.

Within dcy's default connection budget over HTTP, no query blocks per service: a check-less
instance added or removed is attributed through ``/v1/internal/ui/services``, then the
service's own query is asked. The agent's own time to answer those two (medians, asked
directly on the same agent after the propagation rounds) is printed beside, as
``budget_attribution_floor_ms``: the least such a change costs before any render.

Ratios are ours ÷ consul-template's; below 1 is better.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncio
import os
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass

from bench._common import agent_session, consul_agent, emit, note, parse_args, percentile, rounded
from bench.template import (
    AGENT_HCL,
    CASE2_GO,
    CASE2_JINJA,
    DCY_TEMPLATE,
    Tool,
    case1_go,
    case2,
    import_floor_ms,
    many_name,
    ms,
    ratio,
    tool_env,
)
from tests import ctmpl_state
from tests.harness import ConsulAgent
from tools.build import require_binary

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "ctmpl_corpus"
ENV = {"CTMPL_APP_NAME": "shop-from-env"}


# As many connections as consul-template opens here (one blocking query per watch): dcy's
# default budget of 32 makes the engine detect changes with wide queries past it instead.
NARROW = ("-max-connections", "1000")


@dataclass(frozen=True, slots=True)
class DcyTool(Tool):
    """dcy-template with extra flags (bench/template.py's source file is ``source.tpl``)."""

    extra: tuple[str, ...] = ()

    def argv(self, consul_addr: str, source: Path, destination: Path) -> list[str]:
        return [*Tool.argv(self, consul_addr, source, destination), *self.extra]


def tools() -> tuple[Tool, ...]:
    """consul-template; dcy-template on the Go template (default budget, and as many
    connections as consul-template); dcy-template on the jinja twin of the template, the
    in-Python renderer design (a) would be measured against."""
    theirs = Tool(
        "consul-template", require_binary("consul-template"), case1_go, CASE2_GO, signal.SIGINT
    )
    go = ("-syntax", "go")
    return (
        theirs,
        DcyTool("dcy", DCY_TEMPLATE, case1_go, CASE2_GO, signal.SIGTERM, extra=go),
        DcyTool("dcy_narrow", DCY_TEMPLATE, case1_go, CASE2_GO, signal.SIGTERM, extra=go + NARROW),
        DcyTool("jinja_narrow", DCY_TEMPLATE, case1_go, CASE2_JINJA, signal.SIGTERM, extra=NARROW),
    )


def corpus_flags(out: Path) -> list[str]:
    out.mkdir()
    templates = sorted(CORPUS.glob("*.ctmpl"))
    return [f for t in templates for f in ("-template", f"{t}:{out / t.stem}")]


def check_same(ours: Path, theirs: Path) -> None:
    for template in CORPUS.glob("*.ctmpl"):
        if (ours / template.stem).read_bytes() != (theirs / template.stem).read_bytes():
            raise RuntimeError(f"{template.name} renders differently")


async def corpus_once(argv: list[str], out: Path) -> float:
    """Seconds from spawning ``argv`` rendering the corpus with -once to its exit."""
    flags = corpus_flags(out)
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        *argv,
        "-once",
        *flags,
        env={**tool_env(), **ENV},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, errors = await process.communicate()
    elapsed = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{argv[0]} -once failed: {errors.decode()[-2000:]}")
    return elapsed


async def corpus(agent: ConsulAgent, workdir: Path, samples: int) -> dict[str, list[float]]:
    ctmpl_state.load(agent)
    argvs = {
        "dcy": [str(DCY_TEMPLATE), "-consul-addr", agent.http_addr],
        "consul-template": [
            str(require_binary("consul-template")),
            "-consul-addr",
            agent.http_addr,
        ],
    }
    times: dict[str, list[float]] = {name: [] for name in argvs}
    for number in range(samples + 1):  # the first round compiles bytecode, uncounted
        order = list(argvs) if number % 2 == 0 else list(reversed(argvs))
        outs = {}
        for name in order:
            outs[name] = workdir / f"corpus-{name}-{number}"
            elapsed = await corpus_once(argvs[name], outs[name])
            if number:
                times[name].append(elapsed)
        check_same(outs["dcy"], outs["consul-template"])
    return times


async def agent_answer_ms(agent: ConsulAgent, samples: int) -> dict[str, float]:
    """The agent's median time to answer what attributes a check-less change within the
    budget: the summary of every service, then one service's instances."""
    paths = {
        "agent_ui_services_ms": "/v1/internal/ui/services",
        "agent_health_service_ms": f"/v1/health/service/{many_name(0)}",
    }
    times: dict[str, float] = {}
    async with agent_session(agent) as session:
        for name, path in paths.items():
            taken = []
            for _ in range(samples):
                started = time.perf_counter()
                async with session.get(path) as response:
                    await response.read()
                taken.append(time.perf_counter() - started)
            times[name] = ms(taken)
    return times


async def main(quick: bool) -> None:
    samples, changes, rounds = (3, 10, 1) if quick else (15, 100, 2)
    with tempfile.TemporaryDirectory(prefix="dcy-bench-ctmpl-") as tmp:
        # One agent each: the corpus's fixed state would show in the 200-service template.
        with consul_agent(AGENT_HCL) as agent:
            once = await corpus(agent, Path(tmp), samples)
        note("corpus: outputs identical in every round")
        with consul_agent(AGENT_HCL) as agent:
            many = await case2(agent, Path(tmp), tools(), changes, rounds, label="propagation")
            answers = await agent_answer_ms(agent, samples)
        floor = await import_floor_ms(5 if quick else 15)
    ct = many["consul-template"]
    corpus_dcy = statistics.median(once["dcy"])
    corpus_ct = statistics.median(once["consul-template"])
    figures: dict[str, float | int] = {
        "corpus_render_ratio": ratio(corpus_dcy, corpus_ct),
        "propagation_p50_ratio": ratio(
            percentile(many["dcy"].latencies, 50), percentile(ct.latencies, 50)
        ),
        "propagation_p99_ratio": ratio(
            percentile(many["dcy"].latencies, 99), percentile(ct.latencies, 99)
        ),
        "corpus_templates": len(list(CORPUS.glob("*.ctmpl"))),
        "corpus_samples": len(once["dcy"]),
        "corpus_dcy_ms": rounded(corpus_dcy * 1000),
        "corpus_ct_ms": rounded(corpus_ct * 1000),
        "import_aiohttp_jinja2_ms": rounded(floor),
        "corpus_dcy_minus_import_floor_ms": rounded(corpus_dcy * 1000 - floor),
        "changes": len(ct.latencies),
        "cpus": os.cpu_count() or 0,
        **answers,
        "budget_attribution_floor_ms": rounded(sum(answers.values())),
    }
    for name, side in many.items():
        short = "ct" if name == "consul-template" else name
        figures |= {
            f"{short}_p50_ms": ms(side.latencies, 50),
            f"{short}_p99_ms": ms(side.latencies, 99),
            f"{short}_first_render_cold_ms": rounded(
                statistics.median(side.first_render_cold) * 1000
            ),
            f"{short}_requests_per_change": rounded(side.change_requests / side.changes),
            f"{short}_max_connections": max(side.max_connections),
        }
        if name != "consul-template":
            figures[f"{short}_p50_ratio"] = ratio(
                percentile(side.latencies, 50), percentile(ct.latencies, 50)
            )
            figures[f"{short}_p99_ratio"] = ratio(
                percentile(side.latencies, 99), percentile(ct.latencies, 99)
            )
    emit({"bench": "ctmpl", **figures})


if __name__ == "__main__":
    asyncio.run(main(parse_args(__doc__ or "").quick))
