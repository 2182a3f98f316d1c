"""docker-compose.yml runs what the Procfile runs, with the same settings; Debian's
docker-compose accepts it; the pinned images are the versions built locally; Consul accepts
its agent configuration; the nginx sidecar's reload loop works. All offline."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from dcy._durations import parse_duration
from dcy._register import HttpCheck
from dcy._register_cli._args import parse_plan
from tasks._dockerfile_rules import effective, parse_stages
from tasks._infra_check import parse_agent_hcl
from tools.build import _program, pinned_version, require_binary

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "images" / "Dockerfile"
# svc's flags and the environment variables that are their defaults (svc/_runtime.py).
SVC_FLAG_ENV = {"--mode": "SVC_MODE", "--port": "SVC_PORT", "--host": "SVC_HOST",
                "--advertise": "SVC_ADVERTISE"}  # fmt: skip
LISTEN_FLAGS = ("--tcp-address", "--http-address")  # the NSQ daemons' own listen addresses
# Services compose adds on top of the Procfile's processes.
COMPOSE_ONLY = {"nginx", "renderer"}


def _procfile() -> dict[str, str]:
    processes = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, command = line.partition(":")
            processes[name.strip()] = command.strip()
    return processes


def _expand(command: str, mode: str) -> list[str]:
    """The argv a shell makes of a Procfile line (honcho runs each line with a shell)."""
    result = subprocess.run(
        ["sh", "-c", f'set -- {command}; printf "%s\\n" "$@"'],
        env={"PATH": os.environ["PATH"], "SVC_MODE": mode},
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.splitlines()


def _compose_service_of(process: str) -> str:
    """The Procfile's worker2 is the second replica of compose's worker."""
    return process.rstrip("0123456789")


@pytest.fixture(scope="module")
def config() -> Callable[[str | None], dict[str, Any]]:
    """docker-compose's normalized view of docker-compose.yml, per SVC_MODE (None: unset)."""
    cache: dict[str | None, dict[str, Any]] = {}

    def load(mode: str | None) -> dict[str, Any]:
        if mode not in cache:
            env = {k: v for k, v in os.environ.items() if k not in ("SVC_MODE", "DCY_TAG")}
            if mode is not None:
                env["SVC_MODE"] = mode
            result = subprocess.run(
                ["docker-compose", "--file", str(COMPOSE), "config"],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=False,
            )
            assert result.returncode == 0, result.stderr
            cache[mode] = yaml.safe_load(result.stdout)
        return cache[mode]

    return load


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def test_debian_docker_compose_accepts_the_file_quietly() -> None:
    """`docker-compose config -q` (Debian's 1.29) exits 0 and prints nothing, in both modes."""
    for extra in ({}, {"SVC_MODE": "nsq"}):
        result = subprocess.run(
            ["docker-compose", "--file", str(COMPOSE), "config", "-q"],
            env={**os.environ, **extra},
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_pinned_consul_and_nsq_images_are_the_versions_built_locally(raw: dict[str, Any]) -> None:
    """x-images names hashicorp/consul and nsqio/nsq at the versions tools/*/go.mod pin."""
    consul = pinned_version(_program("consul"))
    nsq = pinned_version(_program("nsqd"))
    assert (consul, nsq) == ("v1.14.11", "v1.3.0")
    assert raw["x-images"]["consul"] == f"hashicorp/consul:{consul.removeprefix('v')}"
    assert raw["x-images"]["nsq"] == f"nsqio/nsq:{nsq}"


def test_every_third_party_service_uses_a_pinned_image(
    config: Callable[..., Any], raw: dict[str, Any]
) -> None:
    """Every service not built from images/Dockerfile runs one of the x-images tags."""
    pinned = set(raw["x-images"].values())
    for name, service in config(None)["services"].items():
        if "build" not in service:
            assert service["image"] in pinned, name


def test_every_procfile_process_has_a_compose_service(config: Callable[..., Any]) -> None:
    """Each Procfile process maps to a compose service (worker2: worker's second replica), and
    compose adds only nginx and its renderer."""
    services = set(config(None)["services"])
    mapped = {_compose_service_of(name) for name in _procfile()}
    assert mapped <= services
    assert services - mapped == COMPOSE_ONLY


@pytest.mark.parametrize("mode", [None, "http", "nsq", "push"])
def test_services_run_the_procfile_program_mode_and_port(
    config: Callable[..., Any], mode: str | None
) -> None:
    """sensor, worker and app: the image runs the Procfile's program, SVC_* carry the same
    --mode (SVC_MODE reaches both the same way) and --port, and the workers' replicas are the
    Procfile's worker processes."""
    stages = parse_stages(DOCKERFILE)
    services = config(mode)["services"]
    svc_processes = {n: c for n, c in _procfile().items() if "dcy-" in c and "register" not in c}
    assert {_compose_service_of(n) for n in svc_processes} == {"sensor", "worker", "app"}
    for process, command in svc_processes.items():
        argv = _expand(command, mode or "")
        service = services[_compose_service_of(process)]
        entrypoint = effective(stages, service["build"]["target"], "ENTRYPOINT")
        assert entrypoint is not None
        assert entrypoint.value[-1] == Path(argv[0]).name
        flags = dict(zip(argv[1::2], argv[2::2], strict=True))
        assert set(flags) <= set(SVC_FLAG_ENV), f"{process}: compose must mirror {flags}"
        env = service["environment"]
        assert env["SVC_MODE"] == flags["--mode"] == (mode or "http")
        if flags["--port"] != "0":  # worker2: any free port; in its container 9002 is free
            assert env["SVC_PORT"] == flags["--port"]
    workers = [n for n in svc_processes if _compose_service_of(n) == "worker"]
    assert services["worker"]["deploy"]["replicas"] == len(workers) == 2


def test_services_find_each_other_only_through_consul(config: Callable[..., Any]) -> None:
    """Our containers get only Consul's address; none fixes SVC_ADVERTISE (each container
    advertises its own address, images/entrypoint.py)."""
    services = config(None)["services"]
    for name in ("sensor", "worker", "app", "renderer"):
        env = services[name]["environment"]
        assert env["CONSUL_HTTP_ADDR"] == f"consul:{_dev_agent_ports()[0]}", name
        assert "SVC_ADVERTISE" not in env, name
        assert not {k for k in env if k.startswith("SVC_")} - {"SVC_MODE", "SVC_PORT"}, name


def test_dependencies_wait_for_healthy_services(config: Callable[..., Any]) -> None:
    """Every depends_on waits for service_healthy, and every dependency has a health check:
    in the compose file, or the HEALTHCHECK of its images/Dockerfile target."""
    stages = parse_stages(DOCKERFILE)
    services = config(None)["services"]
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert condition == {"condition": "service_healthy"}, (name, dependency)
            target = services[dependency]
            has_check = "healthcheck" in target or (
                "build" in target and effective(stages, target["build"]["target"], "HEALTHCHECK")
            )
            assert has_check, dependency
    for name in ("sensor", "worker", "app"):
        assert set(services[name]["depends_on"]) == {"consul", "nsqd"}


def test_consul_runs_the_procfile_agent_with_ui_and_dns_published(
    config: Callable[..., Any],
) -> None:
    """The consul service runs the Procfile's `agent -dev -config-file consul/dev.hcl` (mounted
    read-only), open to the other containers, publishing the HTTP (UI/API) and DNS (TCP and UDP)
    ports that consul/dev.hcl gives the agent."""
    procfile = _procfile()["consul"]
    assert "consul agent -dev -config-file consul/dev.hcl" in procfile
    consul = config(None)["services"]["consul"]
    command = consul["command"]
    assert command[:5] == ["agent", "-dev", "-config-file=/consul/dev.hcl", "-client=0.0.0.0",
                           "-hcl"]  # fmt: skip
    assert f"{ROOT}/consul/dev.hcl:/consul/dev.hcl:ro" in consul["volumes"]
    published = {(str(p["published"]), p.get("protocol", "tcp")) for p in _ports(consul)}
    http, dns = _dev_agent_ports()
    assert published == {(str(http), "tcp"), (str(dns), "tcp"), (str(dns), "udp")}
    assert parse_agent_hcl((ROOT / "consul" / "dev.hcl").read_text())["domain"] == "sd"


def _dev_agent_ports() -> tuple[int, int]:
    """(http, dns) of the dev agent, from consul/dev.hcl: the tests spell no dev port."""
    (ports,) = parse_agent_hcl((ROOT / "consul" / "dev.hcl").read_text())["ports"]
    return int(ports["http"]), int(ports["dns"])


def _ports(service: dict[str, Any]) -> list[dict[str, Any]]:
    """Ports as dicts from docker-compose 1.29's normalized short form."""
    result = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            result.append(entry)
            continue
        spec, _, proto = str(entry).partition("/")
        published, _, target = spec.rpartition(":")
        result.append({"published": published, "target": target, "protocol": proto or "tcp"})
    return result


def _agent_services(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    command = raw["services"]["consul"]["command"]
    hcl = parse_agent_hcl(command[command.index("-hcl") + 1])
    return {s["name"]: s for s in hcl["services"]}


def test_nsq_daemons_are_registered_like_the_procfile_registers_them(raw: dict[str, Any]) -> None:
    """The agent's service definitions have the names, IDs, ports, tags, meta and /ping check
    (port, path, interval, timeout) of the Procfile's dcy-register lines, at addresses the
    compose network resolves (the daemons' service names)."""
    defined = _agent_services(raw)
    registered = {}
    for name, command in _procfile().items():
        # A line may wait for something first (`until ...; done; dcy-register ...`).
        argv = shlex.split(command)
        starts = [i for i, word in enumerate(argv) if Path(word).name == "dcy-register"]
        if starts:
            registered[name] = parse_plan(argv[starts[0] + 1 :])[0].services[0]
    assert set(registered) == set(defined) == {"nsqd", "nsqlookupd", "nsqadmin"}
    for name, plan in registered.items():
        service = defined[name]
        assert service["id"] == plan.service_id
        assert service["port"] == plan.port
        assert tuple(service.get("tags", ())) == plan.tags
        assert dict(service.get("meta", {})) == dict(plan.meta)
        assert service["address"] == name and name in raw["services"]
        (check,) = service["check"]
        assert isinstance(plan.check, HttpCheck) and plan.check.url is not None
        ours, theirs = urlsplit(check["http"]), urlsplit(plan.check.url)
        assert (ours.hostname, ours.port, ours.path) == (name, theirs.port, theirs.path)
        assert parse_duration(check["interval"]) == plan.check.interval
        assert parse_duration(check["timeout"]) == plan.check.timeout


@pytest.mark.parametrize("daemon", ["nsqlookupd", "nsqd", "nsqadmin"])
def test_nsq_daemons_run_with_the_procfile_flags(config: Callable[..., Any], daemon: str) -> None:
    """Each NSQ daemon gets the Procfile's flags: listen flags on every interface at the same
    ports, peers by compose service name at the same ports, its own service name as broadcast
    address, and its data path on a volume."""
    argv = shlex.split(_procfile()[daemon]).copy()
    argv = argv[argv.index("--") + 1 :]
    services = config(None)["services"]
    service = services[daemon]
    command = service["command"]
    assert command[0] == Path(argv[0]).name == daemon
    ours = dict(a.split("=", 1) for a in command[1:])
    theirs = dict(a.split("=", 1) for a in argv[1:])
    assert set(ours) == set(theirs)
    for flag, value in theirs.items():
        if flag in LISTEN_FLAGS:
            assert ours[flag] == "0.0.0.0:" + value.rsplit(":", 1)[1]
        elif flag.startswith("--lookupd-"):
            host, port = ours[flag].rsplit(":", 1)
            assert services[host]["command"][0] == "nsqlookupd"
            assert port == value.rsplit(":", 1)[1]
        elif flag == "--broadcast-address":
            assert ours[flag] == daemon
        elif flag == "--data-path":
            assert ours[flag] in [v.split(":")[1] for v in service["volumes"]]
        elif flag == "--log-level":
            assert ours[flag] == value == "warn"  # no line per /ping of the health check
        else:
            pytest.fail(f"{daemon}: no rule for {flag}")
    listen = {v.rsplit(":", 1)[1] for f, v in theirs.items() if f in LISTEN_FLAGS}
    assert {str(p["published"]) for p in _ports(service)} == listen


def test_consul_accepts_the_compose_agent_configuration(
    raw: dict[str, Any], tmp_path: Path
) -> None:
    """`consul validate` (the pinned binary) accepts consul/dev.hcl plus the -hcl fragment."""
    command = raw["services"]["consul"]["command"]
    (tmp_path / "dev.hcl").write_text((ROOT / "consul" / "dev.hcl").read_text())
    (tmp_path / "nsq.hcl").write_text(command[command.index("-hcl") + 1])
    result = subprocess.run(
        [str(require_binary("consul")), "validate", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_renderer_feeds_nginx_through_a_shared_volume(
    config: Callable[..., Any], raw: dict[str, Any]
) -> None:
    """The renderer writes where its image's CMD renders to, on a volume nginx reads its
    NGINX_CONF from; nginx listens on the NGINX_LISTEN the template is rendered with and
    fronts the workers."""
    services = config(None)["services"]
    renderer, nginx = services["renderer"], services["nginx"]
    cmd = effective(parse_stages(DOCKERFILE), "renderer", "CMD")
    assert cmd is not None
    destination = Path(cmd.value[1].split(":")[1])
    volume, mount = renderer["volumes"][0].split(":")[:2]
    assert Path(mount) == destination.parent
    conf = Path(nginx["environment"]["NGINX_CONF"])
    assert f"{volume}:{conf.parent}:ro" in nginx["volumes"]
    assert conf.name == destination.name
    env = renderer["environment"]
    assert env["NGINX_UPSTREAM_SERVICE"] == "worker"
    assert [str(p["target"]) for p in _ports(nginx)] == [env["NGINX_LISTEN"]]
    assert nginx["command"] == [raw["x-nginx-watch"]]


# --- the nginx sidecar's reload loop, run for real with a stand-in nginx ----------------------

STAND_IN_NGINX = """#!/bin/sh
# Records every call; in the foreground it waits until `-s quit` stops it.
echo "$*" >> "$NGINX_LOG"
case "$*" in
  *"daemon off;"*) echo $$ > "$NGINX_LOG.pid"; trap 'exit 0' TERM; while :; do sleep 0.1; done ;;
  *"-s quit"*) kill -TERM "$(cat "$NGINX_LOG.pid")" ;;
  *"-t"*) ! grep -q broken "$2" ;;
esac
"""


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def watch_script(
    raw: dict[str, Any], tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[str], Path, Path]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nginx").write_text(STAND_IN_NGINX)
    (bin_dir / "nginx").chmod(0o755)
    conf, log = tmp_path / "nginx.conf", tmp_path / "nginx.log"
    conf.write_text("events {}\n")
    log.touch()
    script = raw["x-nginx-watch"].replace("$$", "$")  # compose's escape of a literal `$`
    proc = subprocess.Popen(
        ["sh", "-c", script],
        env={
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "NGINX_CONF": str(conf),
            "NGINX_LOG": str(log),
        },
        text=True,
    )
    try:
        yield proc, conf, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_nginx_watch_reloads_on_a_changed_config_and_quits_on_sigterm(
    watch_script: tuple[subprocess.Popen[str], Path, Path],
) -> None:
    """The sidecar loop starts nginx in the foreground, reloads it after `nginx -t` when the
    rendered file changes, skips a config that fails the test, and on SIGTERM quits nginx
    gracefully and exits 0."""
    proc, conf, log = watch_script
    _wait_for(lambda: "daemon off;" in log.read_text(), "nginx to start")
    conf.write_text("events {} # broken\n")
    _wait_for(lambda: "-t -q" in log.read_text(), "the broken config to be tested")
    conf.write_text("events {} # two workers\n")
    _wait_for(lambda: "-s reload" in log.read_text(), "a reload")
    calls = log.read_text().splitlines()
    assert calls[0] == f"-c {conf} -g daemon off;"
    assert calls[1:] == [f"-c {conf} -t -q", f"-c {conf} -t -q", f"-c {conf} -s reload"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert log.read_text().splitlines()[-1] == f"-c {conf} -s quit"
