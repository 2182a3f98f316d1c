"""The renderer against the fake seam: dependency discovery, selective re-rendering,
quiescence, commands, and the failure rules (no partial files, old output kept)."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dcy import Backoff, Dcy, WatchOptions
from dcy._consul import QueryResult
from dcy.template import Renderer, RendererOptions, TemplateSpec
from dcy.template._kvspecs import TemplateSpecs
from dcy.testing import FakeConsul
from tests.harness import eventually

FAST = WatchOptions(wait=0.5, min_interval=0, backoff=Backoff(0.01, 0.05))


@pytest.fixture
def fake() -> FakeConsul:
    return FakeConsul()


@pytest.fixture
async def dcy(fake: FakeConsul) -> AsyncIterator[Dcy]:
    async with Dcy(api=fake, watch_options=FAST) as client:
        yield client


class Running:
    """A renderer running in the background of a test."""

    def __init__(self, renderer: Renderer) -> None:
        self.renderer = renderer
        self.task = asyncio.ensure_future(renderer.run())

    async def stop(self) -> None:
        self.renderer.stop()
        await asyncio.wait_for(self.task, 5)


def make(dcy: Dcy, *specs: TemplateSpec, **options: object) -> Renderer:
    return Renderer(
        dcy.engine,
        specs,
        domain="sd",
        specs=TemplateSpecs(),
        options=RendererOptions(**options),  # type: ignore[arg-type]
    )


async def run_once(dcy: Dcy, *specs: TemplateSpec, **options: object) -> tuple[int, Renderer]:
    """Render in once mode; the exit status and the renderer (its states tell the rest)."""
    renderer = make(dcy, *specs, **options)
    return await asyncio.wait_for(renderer.run(once=True), 5), renderer


async def rendered(dcy: Dcy, text: str, folder: Path) -> str:
    """What ``text`` renders to in once mode (which must succeed)."""
    out = folder / "rendered"
    status, renderer = await run_once(dcy, inline(out, text))
    assert status == 0, renderer.states[0].last_error
    return out.read_text()


def inline(dest: Path, text: str, **kwargs: object) -> TemplateSpec:
    return TemplateSpec(destination=dest, contents=text, **kwargs)  # type: ignore[arg-type]


SERVICES_LOOP = (
    "{% for s in services() %}{{ s.Name }}:"
    "{% for i in service(s.Name) %} {{ i.Port }}{% endfor %}\n{% endfor %}"
)


async def test_multi_pass_discovery_renders_complete_output(
    dcy: Dcy, fake: FakeConsul, tmp_path: Path
) -> None:
    """services → service for each: the file appears only once every query answered."""
    fake.add_service("web", port=8001)
    fake.add_service("web", port=8002)
    fake.add_service("db", port=5432)
    out = tmp_path / "out.txt"
    running = Running(make(dcy, inline(out, SERVICES_LOOP)))
    await eventually(out.exists, what="first render")
    assert out.read_text() == "db: 5432\nweb: 8001 8002\n"
    assert running.renderer.states[0].writes == 1
    await running.stop()


async def test_only_affected_templates_rerender(dcy: Dcy, fake: FakeConsul, tmp_path: Path) -> None:
    """A change to one service re-renders the template using it, not the others."""
    fake.add_service("web", port=8001)
    fake.add_service("db", port=5432)
    web, db = tmp_path / "web", tmp_path / "db"
    running = Running(
        make(
            dcy,
            inline(web, "{% for i in service('web') %}{{ i.Port }}{% endfor %}"),
            inline(db, "{% for i in service('db') %}{{ i.Port }}{% endfor %}"),
        )
    )
    await eventually(lambda: web.exists() and db.exists())
    _, db_state = running.renderer.states
    db_renders = db_state.renders
    fake.add_service("web", port=8002)
    await eventually(lambda: web.read_text() == "80018002", what="web re-rendered")
    # A change of db renders db once: had the web change rendered db too, it counts two.
    fake.add_service("db", port=5433)
    await eventually(lambda: db.read_text() == "54325433", what="db re-rendered")
    assert db_state.renders == db_renders + 1
    await running.stop()


async def test_missing_key_blocks_and_is_reported(
    dcy: Dcy, fake: FakeConsul, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A key that does not exist holds the file back, is reported after the timeout,
    and the file appears once the key is written."""
    caplog.set_level(logging.WARNING, "dcy.template")
    out = tmp_path / "out"
    running = Running(make(dcy, inline(out, "port={{ key('app/port') }}"), missing_key_timeout=0.2))
    await eventually(lambda: "still waiting" in caplog.text, what="missing key report")
    assert "app/port" in caplog.text and not out.exists()
    await fake.kv_put("app/port", b"8080")
    await eventually(out.exists, what="render after the key appeared")
    assert out.read_text() == "port=8080"
    await running.stop()


async def test_kv_functions(dcy: Dcy, fake: FakeConsul, tmp_path: Path) -> None:
    """keyOrDefault, keyExists, ls (direct children only) and tree (recursive)."""
    for key, value in (("cfg/a", b"1"), ("cfg/b", b"2"), ("cfg/sub/c", b"3"), ("cfg/sub/", b"")):
        await fake.kv_put(key, value)
    text = (
        "{{ keyOrDefault('cfg/missing', 'dflt') }} {{ keyExists('cfg/a') }} "
        "{{ keyExists('nope') }}|{% for p in ls('cfg') %}{{ p.Key }}={{ p.Value }} {% endfor %}"
        "|{% for p in tree('cfg/') %}{{ p.Key }} {% endfor %}"
    )
    out = tmp_path / "out"
    running = Running(make(dcy, inline(out, text)))
    await eventually(out.exists)
    assert out.read_text() == "dflt True False|a=1 b=2 |a b sub/c "
    await running.stop()


async def test_outage_keeps_file_and_reports_staleness(
    dcy: Dcy, fake: FakeConsul, tmp_path: Path
) -> None:
    """Consul away: the file is untouched, the renderer lives and says its data is stale."""
    fake.add_service("web", port=8001)
    out = tmp_path / "out"
    running = Running(
        make(dcy, inline(out, "{% for i in service('web') %}{{ i.Port }}{% endfor %}"))
    )
    await eventually(out.exists)
    before = out.stat().st_mtime_ns
    fake.set_unavailable()
    await eventually(lambda: running.renderer.stale, what="stale")
    await asyncio.sleep(0.3)  # the window: six back-off caps (0.05 s) of failed retries
    assert out.read_text() == "8001" and out.stat().st_mtime_ns == before
    assert not running.task.done()
    fake.set_unavailable(False)
    fake.add_service("web", port=8002)
    await eventually(lambda: out.read_text() == "80018002", what="recovery")
    assert not running.renderer.stale
    await running.stop()


async def test_template_error_keeps_old_output(dcy: Dcy, fake: FakeConsul, tmp_path: Path) -> None:
    """A runtime error in the template is reported with its line and the old file stays."""
    fake.add_service("web", port=8001)
    src, out = tmp_path / "in.j2", tmp_path / "out"
    src.write_text("{% for i in service('web') %}{{ i.Port }}{% endfor %}")
    running = Running(make(dcy, TemplateSpec(destination=out, source=src)))
    await eventually(out.exists)
    src.write_text("line one\n{{ service('web')[0].NoSuchField }}\n")
    running.renderer.source_changed(src)
    state = running.renderer.states[0]
    await eventually(lambda: state.last_error, what="error reported")
    assert state.last_error is not None and ":2:" in state.last_error
    assert out.read_text() == "8001"
    src.write_text("{{ 1 + ")
    running.renderer.source_changed(src)
    await eventually(lambda: state.last_error and "syntax error" in state.last_error)
    assert out.read_text() == "8001" and not running.task.done()
    await running.stop()


async def test_shared_command_runs_once_per_pass(
    dcy: Dcy, fake: FakeConsul, tmp_path: Path
) -> None:
    """Two templates with the same command that both changed run it once."""
    fake.add_service("web", port=8001)
    marker = tmp_path / "runs"
    command = (sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x')")
    body = "{% for i in service('web') %}{{ i.Port }}{% endfor %}"
    running = Running(
        make(
            dcy,
            inline(tmp_path / "a", body, command=command),
            inline(tmp_path / "b", body + "!", command=command),
        )
    )
    await eventually(lambda: marker.exists() and marker.read_text() == "x")
    fake.add_service("web", port=8002)
    await eventually(lambda: marker.read_text() == "xx", what="second run")
    # The window: both renders of a pass run before its commands start, so a second run of
    # this pass would start with the first; 0.2 s is ample for it to have written.
    await asyncio.sleep(0.2)
    assert marker.read_text() == "xx"
    await running.stop()


async def test_failing_command_does_not_stop_renderer(
    dcy: Dcy, fake: FakeConsul, tmp_path: Path
) -> None:
    """A command that fails is recorded with its output; rendering goes on."""
    fake.add_service("web", port=8001)
    command = (sys.executable, "-c", "import sys; print('boom'); sys.exit(3)")
    out = tmp_path / "out"
    body = "{% for i in service('web') %}{{ i.Port }}{% endfor %}"
    running = Running(make(dcy, inline(out, body, command=command)))
    await eventually(lambda: running.renderer.command_results)
    first = running.renderer.command_results[0]
    assert (first.returncode, first.output.strip()) == (3, "boom")
    fake.add_service("web", port=8002)
    await eventually(lambda: out.read_text() == "80018002")
    await eventually(lambda: len(running.renderer.command_results) == 2)
    assert not running.task.done()
    await running.stop()


async def test_quiescence_collapses_bursts(dcy: Dcy, fake: FakeConsul, tmp_path: Path) -> None:
    """With wait min:max, a burst of changes yields one render; the first is not delayed."""
    fake.add_service("web", port=8000)
    out = tmp_path / "out"
    body = "{% for i in service('web') %}{{ i.Port }} {% endfor %}"
    running = Running(make(dcy, inline(out, body, wait=(0.4, 2.0))))
    await eventually(out.exists)
    state = running.renderer.states[0]
    renders = state.renders
    for port in range(8001, 8006):
        fake.add_service("web", port=port)
        await asyncio.sleep(0.05)
    await eventually(lambda: out.read_text().count(" ") == 6, what="burst rendered")
    assert state.renders == renders + 1
    await running.stop()


async def test_dry_mode_prints_and_writes_nothing(
    dcy: Dcy, fake: FakeConsul, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """-dry prints the output with its destination and writes no file, runs no command."""
    fake.add_service("web", port=8001)
    out = tmp_path / "out"
    marker = tmp_path / "ran"
    command = (sys.executable, "-c", f"open({str(marker)!r}, 'w')")
    status, _ = await run_once(
        dcy, inline(out, "{{ service('web')[0].Port }}", command=command), dry=True
    )
    assert status == 0
    assert capsys.readouterr().out == f"> {out}\n8001"
    assert not out.exists() and not marker.exists()


async def test_file_function_stays_in_sandbox(dcy: Dcy, tmp_path: Path) -> None:
    """file() reads inside the sandbox and refuses paths that escape it."""
    sandbox = tmp_path / "box"
    sandbox.mkdir()
    (sandbox / "motd").write_text("hello")
    (tmp_path / "secret").write_text("nope")
    good, bad = tmp_path / "good", tmp_path / "bad"
    renderer = make(
        dcy,
        inline(good, "{{ file('motd') }}"),
        inline(bad, "{{ file('../secret') }}"),
        sandbox=sandbox,
    )
    assert await asyncio.wait_for(renderer.run(once=True), 5) == 1
    assert good.read_text() == "hello" and not bad.exists()
    assert "outside the sandbox" in (renderer.states[1].last_error or "")


async def test_sandbox_blocks_unsafe_attributes(dcy: Dcy, tmp_path: Path) -> None:
    """Templates run in jinja2's sandbox: no reaching into Python internals."""
    out = tmp_path / "out"
    unsafe = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    status, renderer = await run_once(dcy, inline(out, unsafe))
    assert status == 1
    assert not out.exists()
    assert "unsafe" in (renderer.states[0].last_error or "")


async def test_helpers(dcy: Dcy, fake: FakeConsul, tmp_path: Path) -> None:
    """consul-template's helpers under their names, as filters."""
    fake.add_service("web", port=1, tags=["blue", "x"])
    fake.add_service("web", port=2, tags=["green", "x"])
    text = (
        "{% for tag, group in service('web') | byTag | items %}{{ tag }}={{ group | length }} "
        "{% endfor %}|{{ 'a,b' | split(',') | join('+') }}|{{ 'A' | toLower }}"
        "|{{ '{\"k\": 1}' | parseJSON | toJSON }}|{{ 'x-1' | regexReplaceAll('x-(\\\\d)', 'y$1') }}"
        "|{{ ['a', 'b'] | contains('b') }}|{{ env('DCY_TEST_ENV', 'unset') }}"
    )
    assert await rendered(dcy, text, tmp_path) == 'blue=1 green=1 x=2 |a+b|a|{"k":1}|y1|True|unset'


class _StaggeredFake(FakeConsul):
    """Answers each service's first query after a delay of its own, so answers come one by
    one as they do from a real agent (the fake otherwise answers all in one loop turn)."""

    async def health_service(self, name: str, **kwargs: Any) -> QueryResult:
        if not kwargs.get("index"):
            await asyncio.sleep(0.002 * int(name.rsplit("-", 1)[1]))
        return await super().health_service(name, **kwargs)


async def test_first_render_waits_for_every_discovered_query(tmp_path: Path) -> None:
    """Over N services the template renders three times before its file (nothing known, the
    names known, everything known), not once per answer."""
    fake = _StaggeredFake()
    for i in range(20):
        fake.add_service(f"svc-{i:02d}", port=1000 + i)
    async with Dcy(api=fake, watch_options=FAST) as client:
        out = tmp_path / "out.txt"
        status, renderer = await run_once(client, inline(out, SERVICES_LOOP))
        assert status == 0
    assert out.read_text().count("\n") == 20
    assert renderer.states[0].renders == 3


async def test_compiled_shortcuts_keep_jinja_semantics(
    dcy: Dcy, fake: FakeConsul, tmp_path: Path
) -> None:
    """Record fields read inline, other objects through the sandbox's getattr (a dict's
    ``d.ID`` is its item), joined output in blocks and macros, line numbers in errors."""
    fake.add_service("web", port=8080, address="10.0.0.5")
    text = (
        "{% macro pair(a) %}{{ a }}-{{ a }}{% endmacro %}"
        "{% set joined %}{{ 1 }}+{{ 2 }}{% endset %}"
        '{% set d = {"ID": 7} %}'
        "{% for s in service('web') %}{{ s.Address }}:{{ s.Port }} {{ d.ID }} "
        "{{ pair(s.Port) }} {{ joined }}{% endfor %}"
    )
    assert await rendered(dcy, text, tmp_path) == "10.0.0.5:8080 7 8080-8080 1+2"

    bad = tmp_path / "bad"
    for source, message in (
        ("line one\n\n{{ nope.ID }}", ":3: 'nope' is undefined"),
        ("{% for s in service('web') %}\n{{ s.__class__.__mro__ }}{% endfor %}", "unsafe"),
        ("{% for s in service('web') %}\n{{ s.NoSuchField }}{% endfor %}", ":2:"),
    ):
        status, renderer = await run_once(dcy, inline(bad, source))
        assert status == 1
        assert message in (renderer.states[0].last_error or ""), renderer.states[0].last_error
        assert not bad.exists()
