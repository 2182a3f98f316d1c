"""The dcy-alert console script against a real agent: TTL checks flipped through the agent
API show up as transitions on stdout, at a webhook and in a command run without a shell."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from dcy import ConsulConfig
from dcy._consul import ConsulAPI, HttpConsul
from tests.harness import ConsulAgent, eventually

pytestmark = pytest.mark.integration

DCY_ALERT = Path(sys.executable).parent / "dcy-alert"
LINE_TIMEOUT = 30.0


class AlertProcess:
    """dcy-alert as a child process: its stdout lines, its stderr kept for failures."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.stderr: list[str] = []
        assert process.stderr is not None
        self._reader = asyncio.ensure_future(self._read_stderr(process.stderr))

    @classmethod
    async def start(cls, *args: str, env: Mapping[str, str] | None = None) -> AlertProcess:
        assert DCY_ALERT.exists(), "run `.venv/bin/pip install -e .` to install dcy-alert"
        process = await asyncio.create_subprocess_exec(
            str(DCY_ALERT),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        alert = cls(process)
        await eventually(lambda: alert._watching(), what="dcy-alert watching", timeout=LINE_TIMEOUT)
        return alert

    def _watching(self) -> bool:
        if self.process.returncode is not None:
            raise AssertionError(f"dcy-alert exited early: {self.stderr}")
        return any("watching" in line for line in self.stderr)

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        async for line in stream:
            self.stderr.append(line.decode(errors="replace").rstrip())

    async def line(self) -> str:
        assert self.process.stdout is not None
        raw = await asyncio.wait_for(self.process.stdout.readline(), LINE_TIMEOUT)
        assert raw, f"dcy-alert closed stdout; stderr: {self.stderr}"
        return raw.decode().rstrip("\n")

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.returncode is None:
            self.process.send_signal(sig)
        code = await asyncio.wait_for(self.process.wait(), LINE_TIMEOUT)
        await self._reader
        return code

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


@pytest.fixture
async def api(consul: ConsulAgent) -> AsyncIterator[ConsulAPI]:
    seam = HttpConsul(ConsulConfig.from_env(consul.http_addr))
    yield seam
    await seam.aclose()


async def _register_ttl_service(api: ConsulAPI, name: str) -> str:
    """A service with a passing TTL check; the check's ID."""
    check_id = f"service:{name}-1"
    await api.register_service(
        {
            "ID": f"{name}-1",
            "Name": name,
            "Port": 7800,
            "Check": {"CheckID": check_id, "Name": f"{name} ttl", "TTL": "300s"},
        }
    )
    await api.update_ttl(check_id, "passing", "fine")
    return check_id


@pytest.fixture
async def webhook() -> AsyncIterator[tuple[str, list[Any]]]:
    """A real HTTP receiver: its URL and the JSON bodies POSTed to it."""
    received: list[Any] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(runner.addresses[-1][1])
    yield f"http://127.0.0.1:{port}/hook", received
    await runner.cleanup()


async def test_alert_reports_critical_and_recovery_as_json_lines(
    consul: ConsulAgent,
    api: ConsulAPI,
    unique_name: str,
    webhook: tuple[str, list[Any]],
) -> None:
    """A TTL check failing then passing gives two JSON lines and two webhook POSTs; SIGTERM
    ends dcy-alert with exit code 0."""
    check_id = await _register_ttl_service(api, unique_name)
    url, received = webhook
    alert = await AlertProcess.start(
        f"-http-addr={consul.http_addr}", "--service", unique_name, "--json", "--webhook", url
    )
    try:
        await api.update_ttl(check_id, "critical", "disk full")
        down = json.loads(await alert.line())
        await api.update_ttl(check_id, "passing", "fine again")
        up = json.loads(await alert.line())
        assert (down["check_id"], down["service_name"], down["node"]) == (
            check_id,
            unique_name,
            consul.node_name,
        )
        assert (down["old_status"], down["new_status"], down["output"]) == (
            "passing",
            "critical",
            "disk full",
        )
        assert (up["old_status"], up["new_status"], up["output"]) == (
            "critical",
            "passing",
            "fine again",
        )
        await eventually(lambda: len(received) == 2, what="two webhook POSTs")
        assert received == [down, up]
        assert await alert.stop(signal.SIGTERM) == 0
    finally:
        await alert.kill()


RECORDER = """
import json, os, sys
with open(sys.argv[1], "a") as out:
    out.write(json.dumps({"stdin": sys.stdin.read(), "env": {
        k: v for k, v in os.environ.items() if k.startswith("DCY_")}}) + "\\n")
"""


async def test_exec_gets_check_output_literally_without_a_shell(
    consul: ConsulAgent, api: ConsulAPI, unique_name: str, tmp_path: Path
) -> None:
    """--exec runs the command per transition with the JSON on stdin and DCY_* variables;
    output like `$(touch x); rm` arrives as text and runs nothing. SIGINT exits 0."""
    check_id = await _register_ttl_service(api, unique_name)
    script = tmp_path / "record.py"
    script.write_text(RECORDER)
    record = tmp_path / "record.jsonl"
    marker = tmp_path / "pwned"
    hostile = f'$(touch {marker}); rm -rf {tmp_path}; `touch {marker}` && echo "$HOME"'
    alert = await AlertProcess.start(
        "--service",
        unique_name,
        "--exec",
        sys.executable,
        str(script),
        str(record),
        env={"CONSUL_HTTP_ADDR": consul.http_addr},
    )
    try:
        await api.update_ttl(check_id, "warning", hostile)
        line = await alert.line()  # text form: one human-readable line
        assert "passing -> warning" in line and unique_name in line
        await eventually(
            lambda: record.exists() and record.read_text().endswith("\n"),
            what="the command's record",
        )
        (entry,) = [json.loads(raw) for raw in record.read_text().splitlines()]
        assert json.loads(entry["stdin"])["output"] == hostile
        assert entry["env"]["DCY_OUTPUT"] == hostile
        assert (entry["env"]["DCY_CHECK_ID"], entry["env"]["DCY_STATUS"]) == (check_id, "warning")
        assert not marker.exists() and script.exists()
        assert await alert.stop(signal.SIGINT) == 0
    finally:
        await alert.kill()


async def test_malformed_service_name_is_a_usage_error(consul: ConsulAgent) -> None:
    """--service with a name that is no service query exits with code 2 and says why."""
    process = await asyncio.create_subprocess_exec(
        str(DCY_ALERT),
        f"-http-addr={consul.http_addr}",
        "--service",
        "not a name!",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), LINE_TIMEOUT)
    assert process.returncode == 2
    assert "malformed service query 'not a name!'" in stderr.decode()
