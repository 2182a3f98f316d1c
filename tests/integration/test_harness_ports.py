"""The harness starts daemons again on other ports when the free ports it chose were taken."""

from __future__ import annotations

import socket
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.harness import HarnessError, ManagedProcess, start_on_free_ports


def _http_server(port: int, log: Path) -> ManagedProcess:
    proc = ManagedProcess(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)], log
    )
    proc.spawn()
    return proc


def _answers(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as response:
        return bool(response.status == 200)


def test_a_daemon_whose_port_was_taken_starts_on_other_ports(tmp_path: Path) -> None:
    """The first attempt's port is bound by someone else before the daemon starts: it exits
    with 'Address already in use', and the harness starts it again on a new free port."""
    squatters: list[socket.socket] = []
    tried: list[int] = []

    def launch(ports: list[int]) -> ManagedProcess:
        tried.append(ports[0])
        if len(tried) == 1:
            squatter = socket.socket()
            squatter.bind(("127.0.0.1", ports[0]))
            squatter.listen()
            squatters.append(squatter)
        return _http_server(ports[0], tmp_path / "server.log")

    try:
        proc, (port,) = start_on_free_ports(1, launch, lambda p: _answers(p[0]), "http.server")
        try:
            assert len(tried) == 2 and port == tried[1] != tried[0]
            assert _answers(port)
        finally:
            proc.stop()
    finally:
        for squatter in squatters:
            squatter.close()


def test_a_daemon_failing_for_another_reason_is_not_started_again(tmp_path: Path) -> None:
    """Only a port clash is worth another attempt: any other early exit is raised at once."""
    tried: list[int] = []

    def launch(ports: list[int]) -> ManagedProcess:
        tried.append(ports[0])
        proc = ManagedProcess([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "x.log")
        proc.spawn()
        return proc

    with pytest.raises(HarnessError, match="exited early"):
        start_on_free_ports(1, launch, lambda p: _answers(p[0]), "failing daemon")
    assert len(tried) == 1
