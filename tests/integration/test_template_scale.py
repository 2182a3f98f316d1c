"""Issue 16 with dcy-template: a template ranging over every service of an agent with
Consul's default limits, 300 of them. Every change of the series reaches the output file,
the renderer holds at most 32 connections (counted from /proc, outside it), a probe client
on the same address is never refused, and /metrics shows the budget at work: change
detectors over HTTP, a blocking HTTP/2 stream per query over HTTPS."""

from __future__ import annotations

import os
import re
import sys
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

from tests.harness import (
    ConsulAgent,
    ManagedProcess,
    bound_status_port,
    eventually,
    until,
)
from tests.scale_series import (
    BUDGET,
    SERVICES,
    Agent,
    ConnectionSampler,
    Probe,
    Row,
    Writer,
    default_limits_agent,
    run_series,
)

pytestmark = pytest.mark.integration

DCY_TEMPLATE = str(Path(sys.executable).with_name("dcy-template"))
# One line per instance of every service, in every state.
TEMPLATE = (
    "{% for s in services() %}{% for i in service(s.Name, 'any') %}"
    "{{ s.Name }} {{ i.ID }} {{ i.Node }} {{ i.Port }} {{ i.Status }} {{ i.Tags|join(',') }}\n"
    "{% endfor %}{% endfor %}"
)


@pytest.fixture
def agent(consul_factory: Callable[..., ConsulAgent]) -> Agent:
    return default_limits_agent(consul_factory)


@pytest.fixture
def tls_agent(consul_factory: Callable[..., ConsulAgent], tmp_path: Path) -> Agent:
    return default_limits_agent(consul_factory, tmp_path / "tls")


def rendered(path: Path) -> Mapping[str, Sequence[Row]]:
    """The output file as rows per service (written atomically: never half a file)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    rows: dict[str, list[Row]] = {}
    for line in text.splitlines():
        name, service_id, node, port, status, *tags = line.split(" ")
        tagged = tuple(t for t in (tags[0].split(",") if tags else ()) if t)
        rows.setdefault(name, []).append((service_id, node, int(port), status, tagged))
    return rows


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = re.findall(r"^(dcy_template_[a-z_]+) ([0-9.e+]+)$", text, re.MULTILINE)
    return {name: float(value) for name, value in found}


async def test_a_template_over_three_hundred_services_within_the_budget(
    agent: Agent, tmp_path: Path
) -> None:
    await render_three_hundred(agent, tmp_path)


async def test_the_same_over_https_with_http2(tls_agent: Agent, tmp_path: Path) -> None:
    await render_three_hundred(tls_agent, tmp_path)


async def render_three_hundred(agent: Agent, tmp_path: Path) -> None:
    source, output = tmp_path / "all.tpl", tmp_path / "all.txt"
    source.write_text(TEMPLATE)
    env = dict(os.environ, CONSUL_HTTP_ADDR=agent.url)
    multiplexed = agent.tls is not None
    if agent.tls is not None:
        env |= {
            "CONSUL_CACERT": str(agent.tls.ca),
            "CONSUL_CLIENT_CERT": str(agent.tls.client_cert),
            "CONSUL_CLIENT_KEY": str(agent.tls.client_key),
        }
    renderer = ManagedProcess(
        [DCY_TEMPLATE, "-template", f"{source}:{output}", "-status-addr", "127.0.0.1:0"],
        tmp_path / "dcy-template.log",
        env=env,
    )
    writer = Writer(agent)
    try:
        with Probe(agent) as probe:
            renderer.spawn()
            assert renderer.process is not None
            with ConnectionSampler(agent, renderer.process.pid) as connections:
                await eventually(
                    lambda: len(rendered(output)) > SERVICES,
                    what="first render of every service",
                    timeout=60,
                )
                port = until(
                    lambda: bound_status_port(renderer.log_path.read_text()),
                    timeout=10,
                    what="the status port",
                )
                before = metrics(port)
                assert before["dcy_template_watched_queries"] > SERVICES
                if multiplexed:
                    # 301 blocking queries, as HTTP/2 streams over two connections.
                    assert before["dcy_template_wide"] == 0
                    assert before["dcy_template_blocking_queries"] > SERVICES
                    assert 0 < before["dcy_template_agent_connections"] <= 2
                else:
                    assert before["dcy_template_wide"] == 1
                    assert 0 < before["dcy_template_agent_connections"] <= BUDGET
                    # services() blocks itself; every service query is covered by a detector.
                    assert before["dcy_template_blocking_queries"] < 8
                await run_series(writer, lambda: rendered(output))
                after = metrics(port)
    finally:
        writer.close()
        renderer.stop()
    assert connections.samples > 0
    assert 0 < connections.most <= (2 if multiplexed else BUDGET)
    assert probe.answers > 0
    assert probe.failures == []
    if multiplexed:
        # No detector: each change answered the blocking queries of the services it touched.
        assert after["dcy_template_detector_wakeups_total"] == 0
        assert after["dcy_template_refetches_total"] == 0
        return
    assert (
        after["dcy_template_detector_wakeups_total"]
        >= before["dcy_template_detector_wakeups_total"] + 5
    )
    # At least the node check's 150 services were asked again.
    assert after["dcy_template_refetches_total"] >= before["dcy_template_refetches_total"] + 150
    assert "dcy_template_sweeps_total" in after
