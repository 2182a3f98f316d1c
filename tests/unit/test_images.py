"""images/Dockerfile, its entrypoint and health checks, .dockerignore: checked offline with the
official Dockerfile parser and by running the pieces that run inside the images."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from dcy.template.cli import build_parser, config_from_args
from svc._runtime import base_parser, settings_from
from tasks._dockerfile_rules import (
    BASE_IMAGE,
    check_dockerfile,
    effective,
    parse_stages,
)
from tasks._images import TARGETS

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "images" / "Dockerfile"
SERVICE_PORTS = {"sensor": 9001, "worker": 9002, "app": 9000}  # the Procfile's ports


def _scripts() -> dict[str, str]:
    """The console scripts of both distributions: dcy's programs and the services'."""
    scripts: dict[str, str] = {}
    for pyproject in (ROOT / "pyproject.toml", ROOT / "svc" / "pyproject.toml"):
        scripts |= tomllib.loads(pyproject.read_text())["project"]["scripts"]
    return scripts


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "Dockerfile"
    path.write_text(text)
    return path


def test_dockerfile_follows_every_image_rule() -> None:
    """The real parser finds no broken rule in images/Dockerfile for any of the four targets."""
    assert check_dockerfile(DOCKERFILE, TARGETS) == []


def test_every_stage_starts_from_the_pinned_python_image() -> None:
    """Builder and runtime both start from python:3.11-slim-bookworm; the rest derive from them."""
    stages = parse_stages(DOCKERFILE)
    external = {s.base for s in stages} - {s.name for s in stages}
    assert external == {BASE_IMAGE}
    assert len([s for s in stages if s.base == BASE_IMAGE]) == 2


def test_service_targets_run_their_console_script_through_the_entrypoint() -> None:
    """sensor, worker and app exec their pyproject console script via dcy-entry, on the
    Procfile's port, which they also expose and health-check through SVC_PORT."""
    stages = parse_stages(DOCKERFILE)
    scripts = _scripts()
    for target, port in SERVICE_PORTS.items():
        entrypoint = effective(stages, target, "ENTRYPOINT")
        assert entrypoint is not None and entrypoint.exec_form
        assert entrypoint.value == ("dcy-entry", f"dcy-{target}")
        assert f"dcy-{target}" in scripts
        env = effective(stages, target, "ENV")
        assert env is not None and env.value == ("SVC_PORT", str(port))
        exposed = effective(stages, target, "EXPOSE")
        assert exposed is not None and exposed.value == (str(port),)
        health = effective(stages, target, "HEALTHCHECK")
        assert health is not None and "SVC_PORT" in health.value[-1]


def test_renderer_target_is_a_valid_dcy_template_command_line() -> None:
    """The renderer's ENTRYPOINT + CMD parse as dcy-template flags, render the nginx template the
    image copies in, and serve /health where its HEALTHCHECK looks."""
    stages = parse_stages(DOCKERFILE)
    entrypoint = effective(stages, "renderer", "ENTRYPOINT")
    cmd = effective(stages, "renderer", "CMD")
    health = effective(stages, "renderer", "HEALTHCHECK")
    assert entrypoint is not None and cmd is not None and health is not None
    assert entrypoint.value[0] == "dcy-template" and "dcy-template" in _scripts()
    copy = next(i for i in stages[-1].instructions if i.cmd == "COPY")
    assert copy.value == ("templates/", "/etc/dcy/templates/")
    # What the COPY puts in the image is the repository's templates/ folder.
    argv = [a.replace(copy.value[1], f"{ROOT}/{copy.value[0]}") for a in cmd.value]
    config = config_from_args(build_parser().parse_args([*entrypoint.value[1:], *argv]))
    assert config.status_addr == "127.0.0.1:9100"
    assert f"http://{config.status_addr}/health" in health.value[-1]
    (template,) = config.templates
    assert template.source == ROOT / "templates" / "nginx.conf.j2"
    assert str(template.destination) == "/srv/rendered/nginx.conf"


def test_service_image_settings_make_services_listen_on_every_interface() -> None:
    """With the image's SVC_HOST and a target's SVC_PORT, svc listens on 0.0.0.0 at that port."""
    stages = parse_stages(DOCKERFILE)
    runtime_env = [i.value for i in stages[1].instructions if i.cmd == "ENV"]
    assert ("SVC_HOST", "0.0.0.0") in runtime_env
    env = {"SVC_HOST": "0.0.0.0", "SVC_PORT": "9001", "SVC_ADVERTISE": "10.0.0.5"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        parser = base_parser("sensor", "test")
        settings = settings_from("sensor", parser.parse_args([]), parser)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert (settings.host, settings.port, settings.advertise) == ("0.0.0.0", 9001, "10.0.0.5")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("FROM python:3.12-slim AS builder\n", "starts from python:3.12-slim"),
        ("FROM python:3.11-slim-bookworm AS r\nADD https://x.example/a.tgz /a\n", "ADD of a URL"),
        (
            "FROM python:3.11-slim-bookworm AS sensor\nRUN pip install --no-index "
            "--only-binary=:all: x\nUSER root\nENTRYPOINT dcy-sensor\n",
            "runs as root",
        ),
        (
            "FROM python:3.11-slim-bookworm AS sensor\nRUN pip install x\nUSER 1000\n",
            "other than the builder's wheels",
        ),
        (
            "FROM python:3.11-slim-bookworm AS sensor\nUSER 1000\nENTRYPOINT dcy-sensor\n",
            "exec-form ENTRYPOINT",
        ),
        (
            'FROM python:3.11-slim-bookworm AS sensor\nUSER 1000\nENTRYPOINT ["dcy-sensor"]\n',
            "HEALTHCHECK",
        ),
        (
            "FROM python:3.11-slim-bookworm AS sensor\nCOPY --from=later /w /w\n"
            "FROM python:3.11-slim-bookworm AS later\n",
            "not an earlier stage",
        ),
    ],
)
def test_rule_checker_reports_each_broken_rule(tmp_path: Path, text: str, expected: str) -> None:
    """Each rule, broken on its own in a small Dockerfile, is reported."""
    problems = check_dockerfile(_write(tmp_path, text), ["sensor"])
    assert any(expected in p for p in problems), problems


def test_rule_checker_wants_a_wheel_building_stage(tmp_path: Path) -> None:
    """A Dockerfile without a `pip wheel` stage is reported."""
    text = (
        "FROM python:3.11-slim-bookworm AS sensor\nRUN pip install --no-index "
        '--only-binary=:all: x\nUSER 1\nHEALTHCHECK CMD ["true"]\nENTRYPOINT ["x"]\n'
    )
    assert check_dockerfile(_write(tmp_path, text), ["sensor"]) == [
        "no stage builds wheels with `pip wheel`"
    ]


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[HTTPServer]:
    server = HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_service_healthcheck_passes_on_200_and_fails_on_503(health_server: HTTPServer) -> None:
    """The services' HEALTHCHECK command (plain python + urllib) exits 0 while /health answers
    200 and non-zero on 503 (what svc answers while not ready)."""
    health = effective(parse_stages(DOCKERFILE), "sensor", "HEALTHCHECK")
    assert health is not None
    argv = [sys.executable if a == "python" else a for a in health.value[1:]]
    env = {**os.environ, "SVC_PORT": str(health_server.server_address[1])}
    _Health.status = 200
    assert subprocess.run(argv, env=env, capture_output=True, check=False).returncode == 0
    _Health.status = 503
    assert subprocess.run(argv, env=env, capture_output=True, check=False).returncode != 0


def test_entrypoint_advertises_the_container_address_and_execs_the_service() -> None:
    """dcy-entry sets SVC_ADVERTISE to the address the hostname resolves to, then replaces
    itself with the program (same PID, so the program gets the container's signals)."""
    env = {k: v for k, v in os.environ.items() if k != "SVC_ADVERTISE"}
    program = "import os; print(os.getpid(), os.environ['SVC_ADVERTISE'])"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "images" / "entrypoint.py"), sys.executable, "-c", program],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = proc.communicate(timeout=30)
    pid, address = out.split()
    assert proc.returncode == 0
    assert int(pid) == proc.pid
    assert address == socket.gethostbyname(socket.gethostname())


def test_entrypoint_keeps_a_given_advertise_address() -> None:
    """An SVC_ADVERTISE from the compose file (the per-host files set the host's) is kept."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "images" / "entrypoint.py"), "printenv", "SVC_ADVERTISE"],
        env={**os.environ, "SVC_ADVERTISE": "10.1.0.11"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stdout.strip()) == (0, "10.1.0.11")


def test_entrypoint_reports_a_missing_program() -> None:
    """A program that does not exist fails with 127 and its name, like a shell would."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "images" / "entrypoint.py"), "no-such-program-dcy"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 127 and "no-such-program-dcy" in result.stderr


def _ignored(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore matching for the plain patterns used here: a pattern matches the
    path or one of its parent folders; `**/` matches any depth."""
    from fnmatch import fnmatch

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        for prefix in prefixes:
            if fnmatch(prefix, pattern) or (
                pattern.startswith("**/") and fnmatch(prefix.split("/")[-1], pattern[3:])
            ):
                return True
    return False


def test_dockerignore_keeps_local_state_out_and_build_inputs_in() -> None:
    """.dockerignore excludes the venv, binaries, data, tests, bench, git and caches, but not
    a file the Dockerfile copies."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns)
    for path in (
        ".venv/bin/python", ".bin/consul", ".data/nsqd/x", "tests/unit/test_x.py",
        "bench/x.py", ".git/HEAD", ".mypy_cache/x", ".pytest_cache/x", ".ruff_cache/x",
        ".hypothesis/x", "dcy/__pycache__/x.pyc", "dcy.egg-info/PKG-INFO",
    ):  # fmt: skip
        assert _ignored(patterns, path), path
    copied = [
        v
        for stage in parse_stages(DOCKERFILE)
        for i in stage.instructions
        if i.cmd == "COPY" and not any(f.startswith("--from") for f in i.flags)
        for v in i.value[:-1]
    ]
    assert copied
    for source in copied:
        assert not _ignored(patterns, source.rstrip("/")), source
        assert (ROOT / source).exists(), source
