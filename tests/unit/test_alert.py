"""dcy-alert's pieces without a real agent: usage errors, the command, webhook and print
destinations, and a whole run against FakeConsul."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from dcy import Backoff, Dcy, Transition, WatchOptions, alert
from dcy.alert import (
    CommandDestination,
    Fanout,
    WebhookDestination,
    build_parser,
    main,
    serve,
    transition_environment,
)
from dcy.testing import FakeConsul

OPTIONS = WatchOptions(
    wait=0.3, min_interval=0, backoff=Backoff(0.01, 0.05), first_answer_timeout=0.5
)
HOSTILE = "$(touch {marker}); rm -rf {marker} `id` | tee x; echo 'q\"uote"


def _transition(output: str = "HTTP 503") -> Transition:
    return Transition(
        check_id="service:web-1",
        name="web HTTP /health",
        node="n1",
        service_id="web-1",
        service_name="web",
        old_status="passing",
        new_status="critical",
        output=output,
        notes="GET /health",
        at=1700000000.25,
    )


async def eventually(condition: Callable[[], Any], *, timeout: float = 10.0) -> None:
    """Poll until ``condition()`` is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


# -- usage ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--debounce", "-1"], "must be zero or more seconds"),
        (["--debounce", "soon"], "not a number"),
        (["--webhook", "ftp://hooks"], "not an http:// or https:// URL"),
        (["--webhook-retries", "-2"], "zero or more"),
        (["--exec"], "--exec needs a command"),
        (["-http-addr=ftp://consul"], "unknown scheme 'ftp'"),
        (["--frobnicate"], "unrecognized arguments"),
    ],
)
def test_usage_errors_exit_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad arguments exit with code 2 and say what is wrong on stderr."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_consul_flags_read_like_consuls_cli() -> None:
    """-http-addr=X (Consul's spelling), --http-addr and --consul-addr all set the address."""
    parser = build_parser()
    for argv in (["-http-addr=10.0.0.1:18500"], ["--consul-addr", "10.0.0.1:18500"]):
        assert parser.parse_args(argv).http_addr == "10.0.0.1:18500"
    args = parser.parse_args(["-token", "t", "--service", "web", "--exec", "cmd", "--json"])
    assert (args.token, args.service, args.command) == ("t", "web", ["cmd", "--json"])
    assert args.json is False  # everything after --exec belongs to the command


def test_transition_environment_names_every_field_and_drops_nul() -> None:
    """The command's DCY_* variables carry each field; NUL (impossible in env) is dropped."""
    env = transition_environment(_transition("a\0b"))
    assert env["DCY_STATUS"] == "critical" and env["DCY_OLD_STATUS"] == "passing"
    assert env["DCY_CHECK"] == "web HTTP /health" and env["DCY_CHECK_ID"] == "service:web-1"
    assert (env["DCY_SERVICE"], env["DCY_SERVICE_ID"], env["DCY_NODE"]) == ("web", "web-1", "n1")
    assert env["DCY_OUTPUT"] == "ab" and env["DCY_NOTES"] == "GET /health"
    assert env["DCY_AT"] == "1700000000.250"


# -- the command ---------------------------------------------------------------------------------

RECORDER = """
import json, os, sys
with open(sys.argv[1], "a") as out:
    out.write(json.dumps({"stdin": sys.stdin.read(), "env": {
        k: v for k, v in os.environ.items() if k.startswith("DCY_")}}) + "\\n")
"""


async def test_command_gets_json_on_stdin_and_env_without_a_shell(tmp_path: Path) -> None:
    """Check output full of shell syntax reaches the command literally and runs nothing."""
    script = tmp_path / "record.py"
    script.write_text(RECORDER)
    marker = tmp_path / "marker"
    hostile = HOSTILE.format(marker=marker)
    record = tmp_path / "record.jsonl"
    destination = CommandDestination([sys.executable, str(script), str(record)], timeout=30)
    await destination.deliver(_transition(hostile))
    (line,) = record.read_text().splitlines()
    got = json.loads(line)
    assert json.loads(got["stdin"])["output"] == hostile
    assert got["env"]["DCY_OUTPUT"] == hostile
    assert not marker.exists()


async def test_missing_or_slow_command_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A command that cannot start, or outlives its timeout (killed), only logs an error."""
    missing = CommandDestination([str(tmp_path / "no-such-command")], timeout=5)
    slow = CommandDestination([sys.executable, "-c", "import time; time.sleep(60)"], timeout=0.2)
    with caplog.at_level(logging.ERROR, logger="dcy.alert"):
        await missing.deliver(_transition())
        await slow.deliver(_transition())
    assert "cannot start" in caplog.text and "killed after 0.2s" in caplog.text


# -- the webhook ---------------------------------------------------------------------------------


class Receiver:
    """A real HTTP server answering with scripted statuses and keeping what it got."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.bodies: list[Any] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status)


@pytest.fixture
async def receiver_factory() -> AsyncIterator[Callable[[list[int]], Any]]:
    runners: list[web.AppRunner] = []

    async def start(statuses: list[int]) -> Receiver:
        receiver = Receiver(statuses)
        app = web.Application()
        app.router.add_post("/hook", receiver.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = int(runner.addresses[-1][1])
        receiver.url = f"http://127.0.0.1:{port}/hook"
        return receiver

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(alert, "WEBHOOK_BACKOFF", Backoff(0.01, 0.05))


async def test_webhook_retries_server_errors_then_delivers(
    receiver_factory: Callable[[list[int]], Any],
) -> None:
    """A 503 then a 429 are retried; the third POST lands, with the transition as JSON."""
    receiver = await receiver_factory([503, 429])
    destination = WebhookDestination(receiver.url, timeout=5, retries=3)
    try:
        await destination.deliver(_transition())
    finally:
        await destination.aclose()
    assert len(receiver.bodies) == 3
    assert receiver.bodies[-1] == _transition().as_dict()


async def test_webhook_does_not_retry_a_refusal_and_gives_up_quietly(
    receiver_factory: Callable[[list[int]], Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A 400 is not retried; an unreachable URL is retried, then logged, never raised."""
    receiver = await receiver_factory([400])
    refused = WebhookDestination(receiver.url, timeout=5, retries=3)
    from tests.harness import free_ports

    (port,) = free_ports(1)
    nobody = WebhookDestination(f"http://127.0.0.1:{port}/hook", timeout=1, retries=2)
    with caplog.at_level(logging.INFO, logger="dcy.alert"):
        try:
            await refused.deliver(_transition())
            await nobody.deliver(_transition())
        finally:
            await refused.aclose()
            await nobody.aclose()
    assert len(receiver.bodies) == 1
    assert "giving up on service:web-1: HTTP 400" in caplog.text
    assert caplog.text.count(f"webhook http://127.0.0.1:{port}/hook") == 3  # 2 retries + give up


# -- putting it together -------------------------------------------------------------------------


class Blocked:
    """A destination that never finishes: it must not hold up the others."""

    name = "blocked"

    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def deliver(self, transition: Transition) -> None:
        self.started.set()
        await asyncio.Event().wait()

    async def aclose(self) -> None:
        pass


class Collect:
    name = "collect"

    def __init__(self) -> None:
        self.seen: list[Transition] = []

    async def deliver(self, transition: Transition) -> None:
        self.seen.append(transition)

    async def aclose(self) -> None:
        pass


async def test_a_stuck_destination_delays_no_other() -> None:
    """Each destination has its own queue: one that hangs does not stop the next one."""
    blocked, collect = Blocked(), Collect()
    fanout = Fanout([blocked, collect])
    fanout.submit(_transition("one"))
    fanout.submit(_transition("two"))
    await eventually(lambda: len(collect.seen) == 2)
    assert blocked.started.is_set()
    await fanout.aclose(grace=0.05)


async def test_serve_prints_json_lines_until_stopped(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """serve() prints one JSON line per transition and returns 0 once stopped."""
    fake = FakeConsul()
    web_id = fake.add_service("web")
    fake.add_service("db")
    args = build_parser().parse_args(["--service", "web", "--json"])
    stop = asyncio.Event()
    client = Dcy(api=fake, watch_options=OPTIONS)
    caplog.set_level(logging.INFO, logger="dcy.alert")
    running = asyncio.create_task(serve(args, client, stop))
    await eventually(lambda: "watching" in caplog.text)
    fake.set_status(web_id, "critical", "down")
    await eventually(lambda: "critical" in capsys.readouterr().out or False)
    stop.set()
    assert await asyncio.wait_for(running, 10) == 0
    assert fake.closed is False  # a given seam stays open; Dcy does not own it


async def test_serve_line_has_every_field(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A printed JSON line decodes to the full transition record."""
    fake = FakeConsul()
    web_id = fake.add_service("web")
    args = build_parser().parse_args(["--json"])
    stop = asyncio.Event()
    client = Dcy(api=fake, watch_options=OPTIONS)
    caplog.set_level(logging.INFO, logger="dcy.alert")
    running = asyncio.create_task(serve(args, client, stop))
    await eventually(lambda: "watching" in caplog.text)
    fake.set_status(web_id, "warning", "slow")
    lines: list[str] = []

    def printed() -> bool:
        lines.extend(capsys.readouterr().out.splitlines())
        return bool(lines)

    await eventually(printed)
    stop.set()
    assert await asyncio.wait_for(running, 10) == 0
    record = json.loads(lines[0])
    assert record == {
        "check_id": f"service:{web_id}",
        "name": "web check",
        "node": "fake-node",
        "service_id": web_id,
        "service_name": "web",
        "old_status": "passing",
        "new_status": "warning",
        "output": "slow",
        "notes": "",
        "at": record["at"],
    }
