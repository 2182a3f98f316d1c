"""Least privilege on a default-deny agent: every component works with a token holding exactly
its policy from ``consul/policies/``, and a token missing any one rule of it fails at once
with the refused operation named (``AclDenied.operation``; the programs exit non-zero saying
it), never waiting or retrying."""

from __future__ import annotations

import asyncio
import json
import os
import re
import string
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import IO, Any

import pytest

from dcy import AclDenied, Dcy, TtlCheck, WatchOptions
from tests.harness import ConsulAgent, NsqCluster, http_json
from tests.programs import (
    consul_env,
    ended_within,
    fails_fast,
    passing,
    program,
    start,
    stop,
    wait_for,
    wait_for_stderr,
)
from tests.system import System

pytestmark = pytest.mark.integration

POLICIES = Path(__file__).resolve().parents[2] / "consul" / "policies"
ROOT = "root-secret"
ACL_HCL = (
    'acl { enabled = true\n default_policy = "deny"\n down_policy = "deny"\n '
    f'tokens {{ initial_management = "{ROOT}"\n agent = "{ROOT}" }} }}'
)
FAST = WatchOptions(wait=2.0, first_answer_timeout=5.0)
# A refusal is not transient: a program that meets one ends long before this.
FAIL_FAST = 20.0
_RULE = re.compile(r'^\w+ "[^"]*" \{ policy = "\w+" \}')


def rules(component: str, **params: str) -> list[str]:
    """The rules of ``consul/policies/<component>.hcl``, one per line, parameters filled."""
    text = string.Template((POLICIES / f"{component}.hcl").read_text()).substitute(params)
    return [line for line in text.splitlines() if _RULE.match(line)]


def rule_id(rule: str) -> str:
    return rule.split("{")[0].replace('"', "").strip()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsulAgent]:
    consul = ConsulAgent(tmp_path_factory.mktemp("consul-acl"), hcl=[ACL_HCL], token=ROOT)
    consul.start()
    try:
        yield consul
    finally:
        consul.stop()


_tokens = iter(range(1_000_000))


def token(agent: ConsulAgent, policy: list[str]) -> str:
    return agent.create_token(f"test-{os.getpid()}-{next(_tokens)}", "\n".join(policy))


def revoke(agent: ConsulAgent, secret: str) -> None:
    """Delete the token ``secret`` (as an operator would, with the management token)."""
    accessor = http_json(f"{agent.url}/v1/acl/token/self", token=secret)["AccessorID"]
    agent.api(f"/v1/acl/token/{accessor}", method="DELETE")


def without(policy: list[str], index: int) -> list[str]:
    return policy[:index] + policy[index + 1 :]


def register_as_root(agent: ConsulAgent, name: str, port: int) -> None:
    definition = {"Name": name, "ID": f"{name}-{port}", "Port": port, "Address": "127.0.0.1"}
    agent.api("/v1/agent/service/register", method="PUT", data=json.dumps(definition).encode())


def env_with(agent: ConsulAgent, secret: str) -> dict[str, str]:
    return consul_env(CONSUL_HTTP_ADDR=agent.http_addr, CONSUL_HTTP_TOKEN=secret)


def fails_naming(argv: list[str], env: dict[str, str], *needles: str) -> str:
    """Run a program that must give up on an ACL refusal: non-zero, fast, naming it."""
    return fails_fast(argv, env, FAIL_FAST, "Consul denied", *needles)


# -- a service using the library -------------------------------------------------------------
SERVICE_DENIALS = {
    "agent_prefix ": "GET /v1/agent/self",
    "service {service}": "PUT /v1/agent/service/register",
    "service {peer}": "GET /v1/health/service/{peer}",
    "node_prefix ": "GET /v1/health/service/{peer}",
}


async def _service_work(agent: ConsulAgent, secret: str, name: str, peer: str) -> None:
    async with Dcy(agent.http_addr, token=secret, watch_options=FAST) as dcy:
        await dcy.register(name, 7000, check="ttl")
        assert (await dcy.pick(peer)).port == 7100


async def test_service_policy_registers_and_resolves(agent: ConsulAgent, unique_name: str) -> None:
    """dcy-service.hcl: the library opens, registers itself (TTL heartbeats) and resolves a
    peer with nothing more."""
    peer = f"{unique_name}-peer"
    register_as_root(agent, peer, 7100)
    secret = token(agent, rules("dcy-service", service=unique_name, peer=peer))
    await _service_work(agent, secret, unique_name, peer)


@pytest.mark.parametrize("dropped", range(len(SERVICE_DENIALS)), ids=list(SERVICE_DENIALS))
async def test_service_policy_missing_a_rule_is_denied_naming_the_operation(
    agent: ConsulAgent, unique_name: str, dropped: int
) -> None:
    """Without any one rule, the library raises AclDenied for the request it needed."""
    peer = f"{unique_name}-peer"
    register_as_root(agent, peer, 7100)
    policy = rules("dcy-service", service=unique_name, peer=peer)
    expected = list(SERVICE_DENIALS.values())[dropped].format(peer=peer)
    started = time.monotonic()
    with pytest.raises(AclDenied) as denied:
        await _service_work(agent, token(agent, without(policy, dropped)), unique_name, peer)
    assert denied.value.operation == expected
    assert expected in str(denied.value)
    assert time.monotonic() - started < 5


# -- dcy-template ------------------------------------------------------------------------------
TEMPLATE = (
    '{% for s in service("NAME") %}{{ s.Address }}:{{ s.Port }}{% endfor %}\n'
    'db={{ key("cfg/NAME/db") }}\n'
)
TEMPLATE_DENIALS = [
    "GET /v1/agent/self",
    "GET /v1/health/service/NAME",
    "GET /v1/health/service/NAME",
    "GET /v1/kv/cfg/NAME/db",
]


def _template_run(agent: ConsulAgent, tmp_path: Path, name: str, body: str) -> list[str]:
    source = tmp_path / "in.j2"
    source.write_text(body.replace("NAME", name))
    return [program("dcy-template"), "-once", "-template", f"{source}:{tmp_path / 'out'}"]


def _template_policy(agent: ConsulAgent, name: str) -> list[str]:
    register_as_root(agent, name, 7200)
    agent.api(f"/v1/kv/cfg/{name}/db", method="PUT", data=b"postgres://db")
    return rules("dcy-template", service_prefix=name, key_prefix=f"cfg/{name}/")


def test_template_policy_renders(agent: ConsulAgent, unique_name: str, tmp_path: Path) -> None:
    """dcy-template.hcl: a template reading a service and a key renders with it."""
    secret = token(agent, _template_policy(agent, unique_name))
    argv = _template_run(agent, tmp_path, unique_name, TEMPLATE)
    done = subprocess.run(argv, env=env_with(agent, secret), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out").read_text() == "127.0.0.1:7200\ndb=postgres://db\n"


@pytest.mark.parametrize("dropped", range(4), ids=["agent", "service", "node", "key"])
def test_template_policy_missing_a_rule_fails_naming_the_operation(
    agent: ConsulAgent, unique_name: str, tmp_path: Path, dropped: int
) -> None:
    """Without any one rule, dcy-template exits 1 naming the refused request and writes
    nothing (no empty config)."""
    policy = _template_policy(agent, unique_name)
    secret = token(agent, without(policy, dropped))
    argv = _template_run(agent, tmp_path, unique_name, TEMPLATE)
    expected = TEMPLATE_DENIALS[dropped].replace("NAME", unique_name)
    fails_naming(argv, env_with(agent, secret), expected)
    assert not (tmp_path / "out").exists()


def test_template_reading_a_forbidden_key_reports_it(
    agent: ConsulAgent, unique_name: str, tmp_path: Path
) -> None:
    """A template reading a key outside the token's prefix fails on that key, by name, with
    its line, and nothing is written."""
    policy = _template_policy(agent, unique_name)
    agent.api(f"/v1/kv/secret/{unique_name}", method="PUT", data=b"hunter2")
    body = TEMPLATE + 'password={{ key("secret/NAME") }}\n'
    argv = _template_run(agent, tmp_path, unique_name, body)
    stderr = fails_naming(
        argv,
        env_with(agent, token(agent, policy)),
        f"GET /v1/kv/secret/{unique_name}",
        f'key:read\' on "secret/{unique_name}"',
        "in.j2:3",
    )
    assert "hunter2" not in stderr
    assert not (tmp_path / "out").exists()


CTMPL = (
    '{{ range service "NAME" }}{{ .Address }}:{{ .Port }}{{ end }}\ndb={{ key "cfg/NAME/db" }}\n'
)


def test_ctmpl_needs_the_same_policy_and_fails_naming_a_refused_key(
    agent: ConsulAgent, unique_name: str, tmp_path: Path
) -> None:
    """A consul-template (.ctmpl) template reads through dcy's watches: dcy-template.hcl
    renders it; a key outside the token's prefix ends the run naming the request, with
    nothing written."""
    policy = _template_policy(agent, unique_name)
    source = tmp_path / "in.ctmpl"
    source.write_text(CTMPL.replace("NAME", unique_name))
    argv = [program("dcy-template"), "-once", "-template", f"{source}:{tmp_path / 'out'}"]
    env = env_with(agent, token(agent, policy))
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out").read_text() == "127.0.0.1:7200\ndb=postgres://db\n"
    (tmp_path / "out").unlink()
    source.write_text(
        CTMPL.replace("cfg/NAME/db", f"secret/{unique_name}").replace("NAME", unique_name)
    )
    fails_naming(argv, env, f"GET /v1/kv/secret/{unique_name}", "in.ctmpl")
    assert not (tmp_path / "out").exists()


# -- dcy-register --------------------------------------------------------------------------
def _register_argv(name: str) -> list[str]:
    return [program("dcy-register"), "--name", name, "--port", "1", "--check", "ttl"]


def test_register_policy_registers_the_program(agent: ConsulAgent, unique_name: str) -> None:
    """dcy-register.hcl: the program is registered and its TTL check passes."""
    secret = token(agent, rules("dcy-register", service=unique_name))
    proc = start([*_register_argv(unique_name), "--", "sleep", "60"], env_with(agent, secret))
    try:
        wait_for(lambda: passing(agent, unique_name), proc, "registered and passing")
    finally:
        stderr = stop(proc)
    assert not agent.api(f"/v1/health/checks/{unique_name}"), stderr


@pytest.mark.parametrize(
    ("dropped", "operation"),
    [(0, "GET /v1/agent/self"), (1, "PUT /v1/agent/service/register")],
    ids=["agent", "service"],
)
def test_register_policy_missing_a_rule_stops_the_program(
    agent: ConsulAgent, unique_name: str, dropped: int, operation: str
) -> None:
    """Without either rule, dcy-register stops its program and exits non-zero, naming the
    refused request."""
    policy = rules("dcy-register", service=unique_name)
    argv = [*_register_argv(unique_name), "--", "sleep", "60"]
    fails_naming(argv, env_with(agent, token(agent, without(policy, dropped))), operation)


# -- dcy-alert -------------------------------------------------------------------------------
def test_alert_policy_watches_a_service(agent: ConsulAgent, unique_name: str) -> None:
    """dcy-alert.hcl: dcy-alert --service watches with it."""
    register_as_root(agent, unique_name, 7300)
    secret = token(agent, rules("dcy-alert", service_prefix=unique_name))
    proc = start([program("dcy-alert"), "--service", unique_name], env_with(agent, secret))
    try:
        wait_for_stderr(proc, f"watching service {unique_name}")
    finally:
        stop(proc)
    assert proc.returncode == 0


@pytest.mark.parametrize("dropped", range(3), ids=["agent", "service", "node"])
def test_alert_policy_missing_a_rule_exits_naming_the_operation(
    agent: ConsulAgent, unique_name: str, dropped: int
) -> None:
    """Without any one rule, dcy-alert exits 1 naming the refused request."""
    register_as_root(agent, unique_name, 7300)
    policy = rules("dcy-alert", service_prefix=unique_name)
    operation = "GET /v1/agent/self" if dropped == 0 else f"GET /v1/health/service/{unique_name}"
    argv = [program("dcy-alert"), "--service", unique_name]
    fails_naming(argv, env_with(agent, token(agent, without(policy, dropped))), operation)


# -- the services in nsq and push mode -------------------------------------------------------
# These run before the http-mode section: its sensor and worker (module fixture `peers`)
# would otherwise be among the instances a push-mode sensor pushes to (pytest runs a file's
# tests in order, on one xdist worker with --dist loadfile).
_MODE_MARK = re.compile(r"\(--mode ([a-z, ]+)\)")


def mode_rules(component: str, mode: str) -> list[str]:
    """The rules ``mode`` uses: the unmarked ones and those marked for it."""
    policy = []
    for rule in rules(component):
        marked = _MODE_MARK.search(rule)
        if marked is None or mode in marked.group(1).replace(" ", "").split(","):
            policy.append(rule)
    return policy


# The first peer each component resolves in each mode: what a missing node rule hides.
FIRST_PEER = {
    ("sensor", "nsq"): "nsqd",
    ("worker", "nsq"): "nsqd",
    ("sensor", "push"): "worker",
    ("worker", "push"): "app",
}


def mode_only_denials(mode: str) -> list[tuple[str, str, int, str]]:
    """(component, mode, index of a rule only ``mode`` needs, the request refused without it),
    read from the policy files so that a rule added there is tested here."""
    cases = []
    for component in ("sensor", "worker", "app"):
        for index, rule in enumerate(mode_rules(component, mode)):
            marked = _MODE_MARK.search(rule)
            if marked is None or marked.group(1).strip() == "http":
                continue
            ident = rule_id(rule)
            peer = ident.split()[1] if ident.startswith("service ") else None
            peer = peer or FIRST_PEER[component, mode]
            cases.append((component, mode, index, f"GET /v1/health/service/{peer}"))
    return cases


def _case_id(case: tuple[str, str, int, str]) -> str:
    component, mode, index, _ = case
    return f"{component}-without-{rule_id(mode_rules(component, mode)[index])}".replace(" ", "-")


class _AclSystem(System):
    """tests.system's NSQ registrations, sent with the management token."""

    def register(self, definition: dict[str, Any]) -> None:
        assert self.consul is not None
        self.consul.api(
            "/v1/agent/service/register", method="PUT", data=json.dumps(definition).encode()
        )


def _service(agent: ConsulAgent, name: str, mode: str, policy: list[str], *args: str,
             stdout: int | IO[Any] = subprocess.DEVNULL) -> subprocess.Popen[str]:  # fmt: skip
    argv = [program(f"dcy-{name}"), "--mode", mode, "--check-interval", "0.5", *args]
    return start(argv, env_with(agent, token(agent, policy)), stdout)


def _first_result(proc: subprocess.Popen[str], log: Path) -> dict[str, Any]:
    wait_for(lambda: log.read_text().startswith("{"), proc, "a result logged by the app")
    return dict(json.loads(log.read_text().splitlines()[0]))


@pytest.fixture(scope="class")
def nsq(agent: ConsulAgent, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """nsqd and nsqlookupd, registered in Consul as the Procfile registers them."""
    system = _AclSystem(tmp_path_factory.mktemp("nsq"), consul=agent)
    system.nsq = NsqCluster(system.workdir / "nsq").start()
    try:
        system.register_nsq()
        system.wait_passing("nsqd", 1)
        system.wait_passing("nsqlookupd", 1)
        yield
    finally:
        system.nsq.stop()


class TestNsqMode:
    def test_nsq_mode_policies_carry_readings_to_the_app(
        self, agent: ConsulAgent, nsq: None, tmp_path: Path
    ) -> None:
        """sensor → nsqd → worker → nsqd → app, each with exactly its nsq-mode rules."""
        log = tmp_path / "app.out"
        with log.open("w") as out:
            app = _service(agent, "app", "nsq", mode_rules("app", "nsq"), stdout=out)
        procs = [app, _service(agent, "worker", "nsq", mode_rules("worker", "nsq"))]
        try:
            for name, proc in (("app", app), ("worker", procs[1])):
                wait_for(partial(passing, agent, name), proc, f"{name} passing")
            procs.append(
                _service(agent, "sensor", "nsq", mode_rules("sensor", "nsq"), "--rate", "5")
            )
            assert set(_first_result(app, log)) >= {"id", "values", "result", "worker"}
        finally:
            stderr = [stop(proc) for proc in reversed(procs)]
        assert [proc.returncode for proc in procs] == [0, 0, 0], stderr

    @pytest.mark.parametrize("case", mode_only_denials("nsq"), ids=_case_id)
    def test_nsq_mode_policy_missing_a_rule_exits_naming_the_operation(
        self, agent: ConsulAgent, nsq: None, case: tuple[str, str, int, str]
    ) -> None:
        """Without any one nsq-mode rule, the service exits 1 at once naming the refused
        lookup, instead of waiting for an nsqd or nsqlookupd it may never see."""
        component, _, dropped, operation = case
        policy = without(mode_rules(component, "nsq"), dropped)
        argv = [program(f"dcy-{component}"), "--mode", "nsq", "--check-interval", "0.5"]
        fails_naming(argv, env_with(agent, token(agent, policy)), operation)


@pytest.fixture(scope="class")
def pipeline(
    agent: ConsulAgent, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """An app and a worker in push mode with exactly their push-mode rules; the app
    and where it logs results."""
    log = tmp_path_factory.mktemp("push") / "app.out"
    with log.open("w") as out:
        app = _service(agent, "app", "push", mode_rules("app", "push"), stdout=out)
    worker = _service(agent, "worker", "push", mode_rules("worker", "push"))
    try:
        for name, proc in (("app", app), ("worker", worker)):
            wait_for(partial(passing, agent, name), proc, f"{name} passing")
        yield app, log
    finally:
        for proc in (worker, app):
            stop(proc)


class TestPushMode:
    def test_push_mode_policies_carry_readings_to_the_app(
        self, agent: ConsulAgent, pipeline: tuple[subprocess.Popen[str], Path]
    ) -> None:
        """sensor → worker → app over HTTP pushes, each with exactly its push-mode rules."""
        app, log = pipeline
        sensor = _service(agent, "sensor", "push", mode_rules("sensor", "push"), "--rate", "5")
        try:
            assert set(_first_result(app, log)) >= {"id", "values", "result", "worker"}
        finally:
            stderr = stop(sensor)
        assert sensor.returncode == 0, stderr

    @pytest.mark.parametrize("case", mode_only_denials("push"), ids=_case_id)
    def test_push_mode_policy_missing_a_rule_exits_naming_the_operation(
        self,
        agent: ConsulAgent,
        pipeline: tuple[subprocess.Popen[str], Path],
        case: tuple[str, str, int, str],
    ) -> None:
        """Without any one push-mode rule, the service exits 1 naming the refused lookup
        at its first push, instead of serving on while every push fails."""
        component, _, dropped, operation = case
        policy = without(mode_rules(component, "push"), dropped)
        if component == "sensor":
            argv = [program("dcy-sensor"), "--mode", "push", "--rate", "5"]
            fails_naming(argv, env_with(agent, token(agent, policy)), operation)
            return
        # A worker pushes what it is sent: a sensor with all its rules sends it readings.
        worker = _service(agent, component, "push", policy)
        sensor = _service(agent, "sensor", "push", mode_rules("sensor", "push"), "--rate", "10")
        try:
            ended_within(worker, FAIL_FAST, "Consul denied", operation)
        finally:
            stop(sensor)
            if worker.poll() is None:
                stop(worker)


# -- the services (http mode) ----------------------------------------------------------------
def http_mode_rules(component: str) -> list[str]:
    """The rules the http mode uses: those not marked for another mode only."""
    return [r for r in rules(component) if "(--mode" not in r]


@pytest.fixture(scope="module")
def peers(agent: ConsulAgent) -> Iterator[None]:
    """A sensor and a worker running with exactly their policies (which proves those work)."""
    procs = []
    try:
        for name in ("sensor", "worker"):
            secret = token(agent, http_mode_rules(name))
            procs.append(
                start([program(f"dcy-{name}"), "--check-interval", "0.5"], env_with(agent, secret))
            )
        for name, proc in zip(("sensor", "worker"), procs, strict=True):
            wait_for(partial(passing, agent, name), proc, f"{name} passing")
        yield
    finally:
        for proc in procs:
            stop(proc)


def test_app_policy_leads_and_orchestrates(agent: ConsulAgent, peers: None) -> None:
    """app.hcl: the app registers, wins the leadership and logs results of sensor and worker
    (each running with its own policy)."""
    proc = subprocess.Popen(
        [program("dcy-app"), "--check-interval", "0.5", "--interval", "0.2"],
        env=env_with(agent, token(agent, http_mode_rules("app"))),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.communicate(timeout=10)[1]
        assert set(json.loads(line)) >= {"id", "values", "result", "worker"}
        wait_for(lambda: passing(agent, "app"), proc, "app passing")
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr


APP_DENIALS = {
    "agent_prefix ": "GET /v1/agent/self",
    "service app": "PUT /v1/agent/service/register",
    "node_prefix ": "GET /v1/health/service/sensor",
    "session_prefix ": "PUT /v1/session/create",
    "key dcy/leader/app": "/v1/kv/dcy/leader/app",
    "service sensor": "GET /v1/health/service/sensor",
    "service worker": "GET /v1/health/service/worker",
}


@pytest.mark.parametrize("dropped", list(APP_DENIALS), ids=list(APP_DENIALS))
def test_app_policy_missing_a_rule_exits_naming_the_operation(
    agent: ConsulAgent, peers: None, dropped: str
) -> None:
    """Without any one rule, the app exits 1 naming the refused request instead of
    contending or cycling forever."""
    policy = http_mode_rules("app")
    index = [rule_id(r) + " " for r in policy].index(dropped.strip() + " ")
    fails_naming(
        [program("dcy-app"), "--check-interval", "0.5", "--interval", "0.2"],
        env_with(agent, token(agent, without(policy, index))),
        APP_DENIALS[dropped],
    )


@pytest.mark.parametrize("service", ["sensor", "worker"])
@pytest.mark.parametrize(
    ("dropped", "operation"),
    [(0, "GET /v1/agent/self"), (1, "PUT /v1/agent/service/register")],
    ids=["agent", "own-service"],
)
def test_sensor_and_worker_policies_missing_a_rule_exit(
    agent: ConsulAgent, service: str, dropped: int, operation: str
) -> None:
    """Without either rule of the http mode, sensor and worker exit 1 naming the request."""
    policy = http_mode_rules(service)
    fails_naming(
        [program(f"dcy-{service}")],
        env_with(agent, token(agent, without(policy, dropped))),
        operation,
    )


def test_every_policy_file_is_valid_for_consul(agent: ConsulAgent) -> None:
    """Consul accepts every policy file as it is (parameters filled)."""
    params = {"service": "s", "peer": "p", "service_prefix": "s", "key_prefix": "k/"}
    for path in sorted(POLICIES.glob("*.hcl")):
        text = string.Template(path.read_text()).safe_substitute(params)
        assert "${" not in text, path
        assert token(agent, [text]), path
        assert len(rules(path.stem, **params)) >= 2, path


# -- a token deleted while a component runs ------------------------------------------------
# Consul answers a blocking query already under way with the token it started with: a
# deleted token is refused from the next query on. Changing what is watched ends the query
# under way at once, as a real change would, instead of waiting out its `wait`.
REVOKED = 30.0


def _touch(agent: ConsulAgent, name: str, port: int) -> None:
    register_as_root(agent, name, port)


def _instance_of(agent: ConsulAgent, pid: int) -> dict[str, Any] | None:
    """The agent's entry of the instance process ``pid`` registered (its meta names it)."""
    services = agent.api("/v1/agent/services").values()
    return next((s for s in services if s["Meta"].get("pid") == str(pid)), None)


def _touch_instance(agent: ConsulAgent, entry: dict[str, Any]) -> None:
    """Tag an instance: its registration changes."""
    definition = {k: entry[k] for k in ("ID", "Address", "Port", "Meta")}
    definition |= {"Name": entry["Service"], "Tags": [*entry["Tags"], "touched"]}
    agent.api("/v1/agent/service/register", method="PUT", data=json.dumps(definition).encode())


async def test_library_registration_is_lost_when_its_token_is_deleted(
    agent: ConsulAgent, unique_name: str
) -> None:
    """A TTL registration whose token is deleted: the next heartbeat (or query of its entry)
    is refused, wait_lost() returns that AclDenied and on_lost is called."""
    secret = token(agent, rules("dcy-register", service=unique_name))
    told: list[str] = []
    async with Dcy(agent.http_addr, token=secret, watch_options=FAST) as dcy:
        registration = await dcy.register(
            unique_name,
            7400,
            check=TtlCheck(ttl=1.5),
            on_lost=lambda r: told.append(r.service_id),
        )
        revoke(agent, secret)
        error = await asyncio.wait_for(registration.wait_lost(), REVOKED)
    # The heartbeat or the watch of its entry, whichever asks first after the deletion.
    assert isinstance(error, AclDenied)
    assert error.operation in (
        f"PUT /v1/agent/check/update/service:{registration.service_id}",
        f"GET /v1/agent/service/{registration.service_id}",
    )
    assert told == [registration.service_id]


def test_alert_exits_when_its_token_is_deleted(agent: ConsulAgent, unique_name: str) -> None:
    """dcy-alert watching with a token that is deleted later exits 1, naming the refused
    watch, instead of watching nothing."""
    register_as_root(agent, unique_name, 7300)
    secret = token(agent, rules("dcy-alert", service_prefix=unique_name))
    proc = start([program("dcy-alert"), "--service", unique_name], env_with(agent, secret))
    try:
        wait_for_stderr(proc, f"watching service {unique_name}")
        revoke(agent, secret)
        _touch(agent, unique_name, 7301)
        ended_within(proc, REVOKED, f"Consul denied GET /v1/health/service/{unique_name}")
    finally:
        if proc.poll() is None:
            stop(proc)


def test_register_stops_its_program_when_its_token_is_deleted(
    agent: ConsulAgent, unique_name: str, tmp_path: Path
) -> None:
    """dcy-register whose token is deleted while its program runs: the next heartbeat is
    refused, it stops the program and exits 1 naming the refused request."""
    secret = token(agent, rules("dcy-register", service=unique_name))
    pid_file = tmp_path / "pid"
    child = ["sh", "-c", f'echo $$ > "{pid_file}"; exec sleep 60']
    argv = [*_register_argv(unique_name), "--ttl", "1.5s", "--", *child]
    proc = start(argv, env_with(agent, secret))
    try:
        wait_for(lambda: passing(agent, unique_name), proc, "registered and passing")
        revoke(agent, secret)
        ended_within(proc, REVOKED, "Consul denied PUT /v1/agent/check/update/", "stopping")
    finally:
        if proc.poll() is None:
            stop(proc)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


@pytest.mark.parametrize("service", ["sensor", "worker"])
def test_service_exits_when_its_token_is_deleted(agent: ConsulAgent, service: str) -> None:
    """A service whose token is deleted stops (exit 1, naming the refused request) once
    Consul refuses to keep it registered, instead of serving on unregistrable."""
    secret = token(agent, http_mode_rules(service))
    proc = start([program(f"dcy-{service}"), "--check-interval", "0.5"], env_with(agent, secret))
    try:
        wait_for(lambda: _instance_of(agent, proc.pid), proc, f"{service} registered")
        entry = _instance_of(agent, proc.pid)
        assert entry is not None
        revoke(agent, secret)
        _touch_instance(agent, entry)
        ended_within(proc, REVOKED, "Consul denied GET /v1/agent/service/")
    finally:
        if proc.poll() is None:
            stop(proc)
