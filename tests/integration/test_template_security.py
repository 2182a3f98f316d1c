"""dcy-template's security rules through the real CLI against a real agent: the sandbox
escape corpus, env() secrets, file() rules, and writes that a SIGKILL cannot tear."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import ConsulAgent, until
from tests.integration.test_template_cli import DCY_TEMPLATE, Renderer, read
from tests.template_escapes import CANARY_TOKEN, ESCAPES

pytestmark = pytest.mark.integration


def run_cli(
    agent: ConsulAgent, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = dict(os.environ, CONSUL_HTTP_ADDR=agent.http_addr, CONSUL_HTTP_TOKEN=CANARY_TOKEN)
    return subprocess.run(
        [DCY_TEMPLATE, *args], capture_output=True, text=True, timeout=60,
        env={**environ, **(env or {})},
    )  # fmt: skip


@pytest.fixture
def start_renderer(tmp_path: Path) -> Iterator[Callable[..., Renderer]]:
    started: list[Renderer] = []

    def start(agent: ConsulAgent, *args: str) -> Renderer:
        started.append(Renderer(tmp_path, agent, *args))
        return started[-1]

    yield start
    for renderer in started:
        renderer.proc.stop()


def put_key(agent: ConsulAgent, key: str, value: bytes) -> None:
    request = urllib.request.Request(f"{agent.url}/v1/kv/{key}", data=value, method="PUT")
    urllib.request.urlopen(request, timeout=10).close()


@pytest.mark.parametrize("reads_data", [False, True], ids=["no-data", "with-records"])
def test_escape_corpus_through_the_cli(
    consul: ConsulAgent, tmp_path: Path, reads_data: bool
) -> None:
    """Every known escape, each its own template in one -once run with the token in the
    environment: refused ones are logged with their reason and write nothing, the rest
    render harmless text; the token appears nowhere; the run exits 1. (-once stops at the
    first pass with an error, so templates that wait for Consul's answer run apart.)"""
    escapes = [e for e in ESCAPES if ("service('consul')" in e.source) == reads_data]
    args: list[str] = []
    for escape in escapes:
        source = tmp_path / f"{escape.name}.j2"
        source.write_text(escape.source)
        args += ["-template", f"{source}:{tmp_path / 'out' / escape.name}"]
    result = run_cli(consul, "-once", *args)
    assert result.returncode == 1, result.stderr[-3000:]
    for escape in escapes:
        out = read(tmp_path / "out" / escape.name)
        errors = [
            line for line in result.stderr.splitlines() if f"{tmp_path / escape.name}.j2:" in line
        ]
        if escape.refused is not None:
            assert out is None, escape.name
            assert len(errors) == 1 and escape.refused in errors[0], (escape.name, errors)
        else:
            assert errors == [] and out is not None, (escape.name, errors)
            assert escape.renders is not None and out.startswith(escape.renders), escape.name
            assert CANARY_TOKEN not in out
    assert CANARY_TOKEN not in result.stderr + result.stdout


def test_env_secrets_in_once_mode(consul: ConsulAgent, tmp_path: Path) -> None:
    """-once: a denied env() exits 1 naming the variable and the rule and writes nothing;
    -env-allowlist opens it; a config denylist wins over a config allowlist."""
    source, out = tmp_path / "in.j2", tmp_path / "out"
    source.write_text("token={{ env('CONSUL_HTTP_TOKEN') }}")
    denied = run_cli(consul, "-once", "-template", f"{source}:{out}")
    assert denied.returncode == 1 and not out.exists()
    assert "env('CONSUL_HTTP_TOKEN') is denied by the default rule" in denied.stderr
    assert "CONSUL_*TOKEN*" in denied.stderr and CANARY_TOKEN not in denied.stderr
    allowed = run_cli(
        consul, "-once", "-template", f"{source}:{out}", "-env-allowlist", "CONSUL_HTTP_TOKEN"
    )
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert out.read_text() == f"token={CANARY_TOKEN}"
    out.unlink()
    config = tmp_path / "env.hcl"
    config.write_text('env {\n  allowlist = ["CONSUL_*"]\n  denylist = ["*_TOKEN"]\n}\n')
    both = run_cli(consul, "-once", "-config", str(config), "-template", f"{source}:{out}")
    assert both.returncode == 1 and not out.exists()
    assert "denied by the env denylist pattern '*_TOKEN'" in both.stderr


def test_env_secret_in_watch_mode_keeps_the_old_file(
    consul: ConsulAgent, tmp_path: Path, start_renderer: Callable[..., Renderer]
) -> None:
    """Watching: a template edited to read a secret is a logged render error; the last good
    file stays and the renderer keeps running."""
    source, out = tmp_path / "in.j2", tmp_path / "out"
    source.write_text("home={{ env('HOME', 'none') }}")
    renderer = start_renderer(consul, "-template", f"{source}:{out}")
    until(lambda: (read(out) or "").startswith("home="), what="first render")
    good = out.read_text()
    source.write_text("pw={{ env('DB_PASSWORD') }}")
    until(lambda: "env('DB_PASSWORD') is denied" in renderer.log(), what="denial logged")
    assert "the word PASSWORD" in renderer.log()
    assert out.read_text() == good and renderer.alive


def test_file_rules_through_the_cli(consul: ConsulAgent, tmp_path: Path) -> None:
    """With -sandbox-path a file inside renders and a symlink out of it is refused; without
    it file() is refused; a -sandbox-path that is no folder is a usage error."""
    box = tmp_path / "box"
    box.mkdir()
    (box / "motd").write_text("hello")
    (tmp_path / "secret").write_text("outside")
    (box / "escape").symlink_to(tmp_path / "secret")
    inside, outside = tmp_path / "inside.j2", tmp_path / "outside.j2"
    inside.write_text("{{ file('motd') }}")
    outside.write_text("{{ file('escape') }}")
    templates = [
        "-template",
        f"{inside}:{tmp_path / 'a'}",
        "-template",
        f"{outside}:{tmp_path / 'b'}",
    ]
    result = run_cli(consul, "-once", "-sandbox-path", str(box), *templates)
    assert result.returncode == 1
    assert read(tmp_path / "a") == "hello" and read(tmp_path / "b") is None
    assert "file('escape') is outside the sandbox" in result.stderr
    disabled = run_cli(consul, "-once", "-template", f"{inside}:{tmp_path / 'c'}")
    assert disabled.returncode == 1 and "file() is disabled" in disabled.stderr
    missing = run_cli(consul, "-once", "-sandbox-path", str(tmp_path / "nope"), *templates)
    assert missing.returncode == 2 and "is not a folder" in missing.stderr


CHUNK = 256 * 1024  # one KV value; the output repeats it
REPEATS = 80  # ~20 MB of output: its write takes long enough to be killed in


def test_sigkill_mid_write_leaves_old_or_new_content(
    consul: ConsulAgent, unique_name: str, tmp_path: Path
) -> None:
    """SIGKILL the renderer, again and again, the moment its temporary file appears: the
    destination and its .bak are always one whole version, and the next run removes what
    the killed ones left behind."""
    key = f"{unique_name}/big"
    source, out = tmp_path / "in.j2", tmp_path / "out" / "big.conf"
    source.write_text(f"{{% for i in range({REPEATS}) %}}{{{{ key('{key}') }}}}{{% endfor %}}")
    config = tmp_path / "c.hcl"
    config.write_text(
        f'template {{\n source = "{source}"\n destination = "{out}"\n backup = true\n}}\n'
    )
    temp = re.compile(r"\.big\.conf\.(bak\.)?\d+\.\w+\.tmp")
    whole = {f"{c}" * CHUNK * REPEATS for c in "abcdefghijklmnop"}
    completed: str | None = None
    leftovers_seen = 0
    for attempt, fill in enumerate("abcdefghijklmnop"):
        put_key(consul, key, fill.encode() * CHUNK)
        kill = attempt % 2 == 0
        env = dict(os.environ, CONSUL_HTTP_ADDR=consul.http_addr)
        process = subprocess.Popen(
            [DCY_TEMPLATE, "-once", "-config", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while kill and process.poll() is None and time.monotonic() < deadline:
                if out.parent.is_dir() and any(temp.fullmatch(n) for n in os.listdir(out.parent)):
                    process.kill()
                    break
            status = process.wait(30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        content = read(out)
        if status == 0:
            completed = fill * CHUNK * REPEATS
            assert content == completed
            assert not [n for n in os.listdir(out.parent) if temp.fullmatch(n)]
        else:
            assert status == -9
            assert content == completed or content == fill * CHUNK * REPEATS
            if content != completed:
                completed = content  # killed after its rename: the new version is whole
            leftovers_seen += sum(1 for n in os.listdir(out.parent) if temp.fullmatch(n))
        backup = read(out.with_name("big.conf.bak"))
        assert backup is None or backup in whole
    assert leftovers_seen > 0, "no kill landed during a write: nothing was tested"


def test_sighup_rereads_the_env_lists(
    consul: ConsulAgent,
    tmp_path: Path,
    start_renderer: Callable[..., Renderer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refused env() renders once the reloaded config allowlists the name."""
    monkeypatch.setenv("DB_PASSWORD", "hunter2")
    source, out, config = tmp_path / "in.j2", tmp_path / "out", tmp_path / "c.hcl"
    source.write_text("pw={{ env('DB_PASSWORD') }}")
    stanza = f'template {{\n source = "{source}"\n destination = "{out}"\n}}\n'
    config.write_text(stanza)
    renderer = start_renderer(consul, "-config", str(config))
    until(lambda: "env('DB_PASSWORD') is denied" in renderer.log(), what="denial logged")
    assert read(out) is None
    config.write_text(stanza + 'env {\n allowlist = ["DB_PASSWORD"]\n}\n')
    renderer.signal(signal.SIGHUP)
    until(lambda: read(out) == "pw=hunter2", what="rendered after the reload")
