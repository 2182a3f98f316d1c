"""dcy-register's command line and config files, without processes or Consul."""

from __future__ import annotations

from pathlib import Path

import pytest

from dcy import HttpCheck, TcpCheck, TtlCheck
from dcy._register_cli._args import parse_plan
from dcy._register_cli._command_check import status_of
from dcy._register_cli._config_file import load_services
from dcy._register_cli._plan import CommandCheck, UsageError
from dcy._register_cli._process import exit_code_of


def test_flags_build_one_service_with_tags_meta_and_the_command() -> None:
    """--tags and --tag combine in order; --meta pairs; everything after -- is the command."""
    plan, level = parse_plan(
        ["--name", "redis", "--port", "6379", "--tags", "a,b", "--tag", "c", "--meta", "k=v=w",
         "--log-level", "debug", "--", "redis-server", "--port", "6379"]
    )  # fmt: skip
    (service,) = plan.services
    assert (service.name, service.port, service.tags) == ("redis", 6379, ("c", "a", "b"))
    assert service.meta == {"k": "v=w"}
    assert isinstance(service.check, TcpCheck)
    assert plan.command == ("redis-server", "--port", "6379")
    assert level == "debug"


def test_check_url_implies_http_with_interval_and_timeout() -> None:
    """--check-url makes an HTTP check of exactly that URL with the given durations."""
    plan, _ = parse_plan(
        ["--name", "nsqd", "--port", "14150", "--check-url", "http://127.0.0.1:14151/ping",
         "--interval", "2s", "--timeout", "500ms", "--", "nsqd"]
    )  # fmt: skip
    assert plan.services[0].check == HttpCheck(
        url="http://127.0.0.1:14151/ping", interval=2.0, timeout=0.5
    )


def test_check_cmd_is_split_into_words_and_fed_to_a_ttl_check() -> None:
    """--check-cmd keeps quoted words whole and never expands anything; Consul sees a TTL."""
    plan, _ = parse_plan(
        ["--name", "db", "--port", "5432", "--check-cmd", "pg_isready -d '$DB name'",
         "--interval", "10s", "--", "postgres"]
    )  # fmt: skip
    check = plan.services[0].check
    assert check == CommandCheck(("pg_isready", "-d", "$DB name"), interval=10.0, timeout=10.0)
    assert plan.services[0].dcy_check == TtlCheck(ttl=40.0)


def test_consul_flags_are_read_like_consuls_own_cli() -> None:
    """-http-addr and -token (single dash, as Consul writes them) and --consul-addr work."""
    plan, _ = parse_plan(
        ["-http-addr", "10.0.0.1:18500", "-token=s3cret", "--name", "x", "--port", "1",
         "--", "true"]
    )  # fmt: skip
    assert (plan.consul.http_addr, plan.consul.token) == ("10.0.0.1:18500", "s3cret")
    plan, _ = parse_plan(["--consul-addr", "unix:///run/c.sock", "--name", "x", "--port", "1",
                          "--", "true"])  # fmt: skip
    assert plan.consul.http_addr == "unix:///run/c.sock"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--name", "x", "--port", "1"], "nothing to run"),
        (["--port", "1", "--", "true"], "--name and --port"),
        (["--name", "x", "--port", "1", "--check", "ttl", "--check-url", "http://h/"], "conflicts"),
        (["--name", "x", "--port", "1", "--ttl", "5s", "--", "true"], "only fits a ttl check"),
        (["--name", "x", "--port", "1", "--check-cmd", "'open", "--", "true"], "quotation"),
        (["--name", "x", "--port", "1", "--bogus", "--", "true"], "unrecognized"),
        (["--name", "x", "--port", "1", "--deregister-after", "5s", "--", "true"], "at least 60"),
    ],
)
def test_bad_flags_raise_usage_errors_that_name_the_problem(argv: list[str], message: str) -> None:
    """Each bad input is a UsageError (exit 2) whose message points at the cause."""
    with pytest.raises(UsageError, match=message):
        parse_plan(argv)


HCL = """
service {
  name = "nsqd"
  id   = "nsqd"
  port = 14150
  tags = ["tcp"]
  meta = { "http_port" = "4151" }
  check {
    http     = "http://127.0.0.1:14151/ping"
    interval = "5s"
  }
}
service {
  name  = "probe"
  port  = 9
  check = "ttl"
}
"""


def test_hcl_config_describes_several_services(tmp_path: Path) -> None:
    """HCL service blocks become services in file order, checks and meta included."""
    path = tmp_path / "services.hcl"
    path.write_text(HCL)
    nsqd, probe = load_services(path)
    assert (nsqd.service_id, nsqd.port, nsqd.tags, nsqd.meta) == (
        "nsqd",
        14150,
        ("tcp",),
        {"http_port": "4151"},
    )
    assert nsqd.check == HttpCheck(url="http://127.0.0.1:14151/ping", interval=5.0, timeout=2.0)
    assert isinstance(probe.check, TtlCheck)


def test_yaml_config_with_a_command_check(tmp_path: Path) -> None:
    """YAML's services list reads like the HCL blocks; args make a command check."""
    path = tmp_path / "services.yml"
    path.write_text("services:\n  - {name: redis, port: 6379, check: {args: [redis-cli, ping]}}\n")
    (redis,) = load_services(path)
    assert redis.check == CommandCheck(("redis-cli", "ping"), interval=5.0, timeout=5.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('service {\n  name = "a"\n  port = 1\n  colour = "red"\n}\n', "unknown key"),
        ('service {\n  name = "a"\n  port = "80"\n}\n', "integer port"),
        ('service {\n  name = "a"\n  port = 1\n  check {\n    tcp = true\n    ttl = "5s"\n  }\n}\n',
         "one of tcp, http, ttl or args"),
        ("service {\n  name = \n", "not valid HCL"),
        ("backend {}\n", "unknown top-level"),
    ],
)  # fmt: skip
def test_bad_config_files_raise_usage_errors(tmp_path: Path, text: str, message: str) -> None:
    """Typos and wrong types in a config file are refused, not turned into odd services."""
    path = tmp_path / "bad.hcl"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        load_services(path)


def test_config_and_service_flags_do_not_mix(tmp_path: Path) -> None:
    """--config describes the services; a --name beside it is an error, not a merge."""
    path = tmp_path / "s.hcl"
    path.write_text(HCL)
    with pytest.raises(UsageError, match="drop --name"):
        parse_plan(["--config", str(path), "--name", "x", "--", "true"])


def test_two_services_with_one_id_are_refused(tmp_path: Path) -> None:
    """Two services that would share an ID would overwrite each other in Consul."""
    path = tmp_path / "s.yaml"
    path.write_text(
        "services:\n  - {name: a, id: same, port: 1}\n  - {name: b, id: same, port: 2}\n"
    )
    with pytest.raises(UsageError, match="share the ID 'same'"):
        parse_plan(["--config", str(path), "--", "true"])


def test_exit_codes_and_check_states_follow_shell_and_consul_conventions() -> None:
    """128+N for a death by signal N; script exit 0/1/other → passing/warning/critical."""
    assert [exit_code_of(rc) for rc in (0, 7, -15, -9)] == [0, 7, 143, 137]
    assert [status_of(rc) for rc in (0, 1, 2, 127, None)] == [
        "passing",
        "warning",
        "critical",
        "critical",
        "critical",
    ]
