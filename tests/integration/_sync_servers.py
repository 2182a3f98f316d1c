"""Servers for the tests of the clients by name: echo server processes (for the aiohttp,
requests and httpx clients alike), a WSGI app served by a real server in a thread, and a
proxy in front of the agent that counts the requests it forwards."""

from __future__ import annotations

import http.client
import socketserver
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from tests.harness import ManagedProcess, until

SERVER_SCRIPT = Path(__file__).with_name("_echo_server.py")

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@dataclass
class EchoServer:
    """One ``_echo_server.py`` process."""

    id: str
    port: int
    process: ManagedProcess

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def kill(self) -> None:
        self.process.kill()


def launch_echo_server(
    folder: Path, server_id: str, extra: Iterable[str] = ()
) -> tuple[ManagedProcess, Callable[[], EchoServer | None]]:
    """Spawn one echo server; the second value is the server once it listens (None before;
    it raises if the process died)."""
    port_file = folder / f"{server_id}.port"
    argv = [sys.executable, str(SERVER_SCRIPT), "--id", server_id]
    process = ManagedProcess(
        [*argv, "--port-file", str(port_file), *extra], folder / f"{server_id}.log"
    )
    process.spawn()

    def listening() -> EchoServer | None:
        assert process.running, f"echo server {server_id} died:\n{process.log_tail()}"
        if not port_file.exists():
            return None
        return EchoServer(server_id, int(port_file.read_text()), process)

    return process, listening


@contextmanager
def echo_servers(folder: Path, *ids: str, extra: Iterable[str] = ()) -> Iterator[list[EchoServer]]:
    """Start one echo server process per id (``extra``: its options, e.g. ``--fail-status
    503``); each is stopped (only it) on exit."""
    started: list[ManagedProcess] = []
    servers: list[EchoServer] = []
    try:
        for server_id in ids:
            process, listening = launch_echo_server(folder, server_id, extra)
            started.append(process)
            servers.append(until(listening, what=f"echo server {server_id} listening"))
        yield servers
    finally:
        for process in started:
            process.stop()


class _ThreadingWsgiServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def wsgi_server(app: WsgiApp) -> Iterator[str]:
    """Serve ``app`` with wsgiref (a thread per request) on a free port; yields its URL."""
    server = make_server(
        "127.0.0.1", 0, app, server_class=_ThreadingWsgiServer, handler_class=_QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, name="wsgi-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


class CountingProxy:
    """An HTTP proxy in front of the agent that records each request's method and path:
    what the agent was asked, as seen at its door."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        proxy = self

        class Forward(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def forward(self) -> None:
                with proxy._lock:
                    proxy.requests.append((self.command, self.path))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")
                }
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=120)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    data = answer.read()
                finally:
                    upstream.close()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="counting-proxy", daemon=True
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def paths(self, start: str) -> list[str]:
        with self._lock:
            return [path for _, path in self.requests if path.startswith(start)]
