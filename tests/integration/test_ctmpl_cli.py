"""dcy-template running consul-template (Go syntax) templates against a real agent: live
updates through dcy's watches, errors with positions, the sandbox and what is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import ConsulAgent, ManagedProcess, until

pytestmark = pytest.mark.integration

DCY_TEMPLATE = str(Path(sys.executable).with_name("dcy-template"))


def register(agent: ConsulAgent, service_id: str, port: int, name: str) -> None:
    body = json.dumps({"ID": service_id, "Name": name, "Port": port, "Tags": ["t"]}).encode()
    request = urllib.request.Request(
        f"{agent.url}/v1/agent/service/register", data=body, method="PUT"
    )
    urllib.request.urlopen(request, timeout=5).close()


def put_key(agent: ConsulAgent, key: str, value: str) -> None:
    request = urllib.request.Request(f"{agent.url}/v1/kv/{key}", data=value.encode(), method="PUT")
    urllib.request.urlopen(request, timeout=5).close()


def read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def run_once(agent: ConsulAgent, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DCY_TEMPLATE, "-once", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, CONSUL_HTTP_ADDR=agent.http_addr, **env),
    )


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., ManagedProcess]]:
    started: list[ManagedProcess] = []

    def spawn(agent: ConsulAgent, *args: str, **env: str) -> ManagedProcess:
        proc = ManagedProcess(
            [DCY_TEMPLATE, "-log-level", "debug", *args],
            tmp_path / f"dcy-template-{len(started)}.log",
            env=dict(os.environ, CONSUL_HTTP_ADDR=agent.http_addr, **env),
        )
        proc.spawn()
        started.append(proc)
        return proc

    yield spawn
    for proc in started:
        proc.stop()


def log_of(proc: ManagedProcess) -> str:
    return proc.log_path.read_text(errors="replace")


def test_a_ctmpl_follows_consul_and_survives_a_syntax_error(
    consul: ConsulAgent, unique_name: str, tmp_path: Path, start: Callable[..., ManagedProcess]
) -> None:
    """A .ctmpl is rendered in Go syntax and kept in step with Consul through dcy's watches;
    a syntax error is reported at file:line and keeps the previous output; fixed, it renders."""
    register(consul, f"{unique_name}-1", 7001, unique_name)
    src, out = tmp_path / "upstreams.ctmpl", tmp_path / "out.conf"
    src.write_text(
        f'{{{{ range service "{unique_name}" }}}}server {{{{ .Address }}}}:{{{{ .Port }}}};\n'
        "{{ end }}"
    )
    proc = start(consul, "-template", f"{src}:{out}")
    until(lambda: read(out) == "server 127.0.0.1:7001;\n", timeout=15, what="first render")
    register(consul, f"{unique_name}-2", 7002, unique_name)
    until(
        lambda: read(out) == "server 127.0.0.1:7001;\nserver 127.0.0.1:7002;\n",
        timeout=10,
        what="the new instance in the file",
    )
    src.write_text("line one\n{{ if }}\n")
    until(lambda: f"{src}:2: missing value for if" in log_of(proc), timeout=10, what="error")
    assert read(out) == "server 127.0.0.1:7001;\nserver 127.0.0.1:7002;\n"
    assert proc.running
    src.write_text('{{ range service "' + unique_name + '" }}{{ .Port }} {{ end }}')
    until(lambda: read(out) == "7001 7002 ", timeout=10, what="render after the fix")


def test_key_waits_for_its_key(
    consul: ConsulAgent, unique_name: str, tmp_path: Path, start: Callable[..., ManagedProcess]
) -> None:
    """``key`` of a key that does not exist holds the file back, as under consul-template."""
    src, out = tmp_path / "in.ctmpl", tmp_path / "out"
    src.write_text(f'value={{{{ key "{unique_name}/k" }}}}')
    result = run_once(consul, "-missing-key-timeout", "1s", "-template", f"{src}:{out}")
    assert result.returncode == 1
    assert f"still waiting after 1s for key 'kv.block({unique_name}/k)'" in result.stderr
    assert read(out) is None
    start(consul, "-template", f"{src}:{out}")
    put_key(consul, f"{unique_name}/k", "v1")
    until(lambda: read(out) == "value=v1", timeout=10, what="render once the key exists")


def test_syntax_flag_and_stanza_select_go(consul: ConsulAgent, tmp_path: Path) -> None:
    """``-syntax go`` and ``syntax = "go"`` make any file Go syntax; jinja stays the default
    for other suffixes."""
    go_src, jinja_src = tmp_path / "a.tmpl", tmp_path / "b.tmpl"
    go_src.write_text('{{ printf "%05.1f|%v" 3.14159 (parseJSON "[1,2]") }}')
    jinja_src.write_text("{{ '%05.1f' | format(3.14159) }}")
    result = run_once(consul, "-syntax", "go", "-template", f"{go_src}:{tmp_path / 'a.out'}")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "a.out").read_text() == "003.1|[1 2]"
    config = tmp_path / "config.hcl"
    config.write_text(
        f'template {{\n  source = "{go_src}"\n  destination = "{tmp_path / "c.out"}"\n'
        '  syntax = "go"\n}\n'
        f'template {{\n  source = "{jinja_src}"\n  destination = "{tmp_path / "d.out"}"\n}}\n'
    )
    result = run_once(consul, "-config", str(config))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "c.out").read_text() == "003.1|[1 2]"
    assert (tmp_path / "d.out").read_text() == "003.1"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (
            '{{ plugin "/bin/echo" "x" }}',
            ':1:3: at <plugin "/bin/echo" "x">: error calling '
            "plugin: plugin is not supported by dcy-template",
        ),
        ('{{ writeToFile "/tmp/x" "" "" "0644" "data" }}', "writeToFile is not supported"),
        ('{{ with secret "secret/x" }}{{ .Data }}{{ end }}', "secret is not supported"),
        ("{{ range nomadServices }}{{ end }}", "nomadServices is not supported"),
        ('{{ sprig_env "HOME" }}', "sprig_env is not supported"),
        (
            '{{ define "a" }}{{ executeTemplate "a" }}{{ end }}{{ executeTemplate "a" }}',
            "executeTemplate is not supported by dcy-template: its recursion is unbounded",
        ),
        ('{{ env "CONSUL_HTTP_TOKEN" }}', "env('CONSUL_HTTP_TOKEN') is denied"),
        ('{{ env "DB_PASSWORD" }}', "env('DB_PASSWORD') is denied"),
        ('{{ file "/etc/passwd" }}', "file() is disabled"),
        ('{{ range service "web~node1" }}{{ end }}', "~near) is not supported"),
        ("a\n  {{ nosuchfunc 1 }}", ':2: function "nosuchfunc" not defined'),
    ],
)
def test_refused_with_a_clear_error(
    consul: ConsulAgent, tmp_path: Path, template: str, message: str
) -> None:
    """What dcy-template does not do is an error naming it, at the template's position;
    nothing is written."""
    src, out = tmp_path / "t.ctmpl", tmp_path / "out"
    src.write_text(template)
    result = run_once(consul, "-template", f"{src}:{out}", DB_PASSWORD="hunter2")
    assert result.returncode == 1
    assert f"{src}" in result.stderr and message in result.stderr
    assert "hunter2" not in result.stderr
    assert not out.exists()


def test_file_reads_inside_the_sandbox_only(consul: ConsulAgent, tmp_path: Path) -> None:
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    (sandbox / "motd.txt").write_text("hello")
    src, out = tmp_path / "t.ctmpl", tmp_path / "out"
    src.write_text('{{ file "motd.txt" | toUpper }}')
    result = run_once(consul, "-sandbox-path", str(sandbox), "-template", f"{src}:{out}")
    assert result.returncode == 0, result.stderr
    assert out.read_text() == "HELLO"
    src.write_text('{{ file "../t.ctmpl" }}')
    result = run_once(consul, "-sandbox-path", str(sandbox), "-template", f"{src}:{out}")
    assert result.returncode == 1 and "outside the sandbox" in result.stderr


def test_the_helper_gets_no_consul_address_or_token_and_ends_with_the_renderer(
    consul: ConsulAgent, tmp_path: Path, start: Callable[..., ManagedProcess]
) -> None:
    src, out = tmp_path / "t.ctmpl", tmp_path / "out"
    src.write_text("{{ range services }}{{ .Name }} {{ end }}")
    proc = start(consul, "-template", f"{src}:{out}", CONSUL_HTTP_TOKEN="tok-123")
    until(lambda: read(out), timeout=15, what="first render")
    assert proc.process is not None
    children = Path(f"/proc/{proc.process.pid}/task/{proc.process.pid}/children").read_text()
    helpers = [
        pid
        for pid in children.split()
        if Path(f"/proc/{pid}/exe").resolve().name.startswith("dcy-ctmpl")
    ]
    assert len(helpers) == 1
    environ = Path(f"/proc/{helpers[0]}/environ").read_bytes()
    assert b"CONSUL" not in environ and b"tok-123" not in environ
    # A renderer killed outright leaves no helper behind: its stdin closes, it ends.
    proc.kill()
    until(lambda: not Path(f"/proc/{helpers[0]}").exists(), timeout=10, what="the helper ending")


def test_an_unknown_syntax_is_a_usage_error(tmp_path: Path) -> None:
    src = tmp_path / "in.tmpl"
    src.write_text("x")
    config = tmp_path / "c.hcl"
    config.write_text(
        f'template {{\n  source = "{src}"\n  destination = "{tmp_path / "out"}"\n'
        '  syntax = "perl"\n}\n'
    )
    for args, message in (
        (["-config", str(config)], "unknown syntax 'perl': use go or jinja"),
        (["-syntax", "perl", "-template", f"{src}:{tmp_path / 'out'}"], "invalid choice"),
    ):
        result = subprocess.run([DCY_TEMPLATE, *args], capture_output=True, text=True, timeout=30)
        assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "out").exists()
