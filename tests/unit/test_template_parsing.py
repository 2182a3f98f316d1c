"""dcy-template's inputs: -template specs, durations, perms, HCL config, writing files."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dcy._durations import parse_duration, parse_wait
from dcy.template._config import ConfigError, load_config_paths
from dcy.template._spec import parse_command, parse_perms, parse_template_flag
from dcy.template._write import render_atomically

path_text = st.text(
    alphabet=st.characters(blacklist_characters=":\x00", blacklist_categories=("Cs", "Zs", "Cc")),
    min_size=1,
    max_size=30,
)


def test_template_flag_source_and_destination() -> None:
    """src:dest gives two paths and no command."""
    spec = parse_template_flag("/in/a.j2:/out/a.conf")
    assert (spec.source, spec.destination, spec.command) == (
        Path("/in/a.j2"),
        Path("/out/a.conf"),
        (),
    )


def test_template_flag_command_keeps_its_colons() -> None:
    """Everything after the second colon is the command, colons included, split into argv."""
    spec = parse_template_flag("a.j2:/etc/a:curl -X POST http://127.0.0.1:9/reload")
    assert spec.command == ("curl", "-X", "POST", "http://127.0.0.1:9/reload")


def test_template_flag_relative_paths_use_base(tmp_path: Path) -> None:
    """Relative paths are taken from the given base folder."""
    spec = parse_template_flag("in.j2:out/x", base=tmp_path)
    assert spec.source == tmp_path / "in.j2" and spec.destination == tmp_path / "out/x"


@pytest.mark.parametrize("bad", ["", "only-source", ":dest", "src:", " : "])
def test_template_flag_rejects_malformed(bad: str) -> None:
    """A spec without both paths is refused with the input quoted."""
    with pytest.raises(ValueError, match="invalid -template"):
        parse_template_flag(bad)


@given(path_text, path_text, st.text(min_size=0, max_size=40))
def test_template_flag_roundtrip(source: str, destination: str, command: str) -> None:
    """Any colon-free source and destination come back as given; the rest is the command."""
    text = f"{source}:{destination}" + (f":{command}" if command.strip() else "")
    try:
        spec = parse_template_flag(text)
    except ValueError as exc:
        # Only an unparsable command (unbalanced quotes) or blank paths may fail.
        assert "command" in str(exc) or not source.strip() or not destination.strip()
        return
    assert spec.source == _expanded(source.strip())
    assert spec.destination == _expanded(destination.strip())


def _expanded(text: str) -> Path:
    # "~user" of no known user stays literal, as in a shell.
    try:
        return Path(text).expanduser()
    except RuntimeError:
        return Path(text)


def test_commands_are_argv_not_shell() -> None:
    """A string command is split into words; shell syntax stays literal."""
    assert parse_command("echo $(touch /tmp/x); rm -rf /") == (
        "echo",
        "$(touch",
        "/tmp/x);",
        "rm",
        "-rf",
        "/",
    )
    assert parse_command(["nginx", "-s", "reload"]) == ("nginx", "-s", "reload")
    with pytest.raises(ValueError, match="invalid command"):
        parse_command("echo 'unbalanced")


@pytest.mark.parametrize(
    ("raw", "mode"), [(644, 0o644), ("0644", 0o644), ("755", 0o755), (600, 0o600), ("0", 0)]
)
def test_perms_read_as_octal(raw: object, mode: int) -> None:
    """perms = 0644 (which HCL hands over as decimal 644) means mode 0o644."""
    assert parse_perms(raw) == mode


@pytest.mark.parametrize("raw", [648, "rw-r--r--", True, "-1", 77777])
def test_perms_reject_non_octal(raw: object) -> None:
    """A mode with non-octal digits is refused."""
    with pytest.raises(ValueError, match="perms"):
        parse_perms(raw)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("5s", 5.0), ("1m30s", 90.0), ("2h", 7200.0), ("3", 3.0), ("1.5s", 1.5)],
)
def test_durations(text: str, seconds: float) -> None:
    """Go-style durations parse to seconds."""
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5 s", "five", "1x", "-1s", "s5"])
def test_bad_durations(text: str) -> None:
    """Malformed durations are refused with an example of the right form."""
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_wait_defaults_max_to_four_times_min() -> None:
    """-wait 2s means 2s:8s; a max below the min is refused."""
    assert parse_wait("2s") == (2.0, 8.0)
    assert parse_wait("1s:3s") == (1.0, 3.0)
    with pytest.raises(ValueError, match="below min"):
        parse_wait("5s:1s")


HCL = """
consul {
  address = "127.0.0.1:9999"
  token   = "abc"
  retry {
    backoff     = "100ms"
    max_backoff = "2s"
  }
}
wait {
  min = "1s"
  max = "4s"
}
template {
  source      = "in.j2"
  destination = "out/app.conf"
  command     = ["nginx", "-s", "reload"]
  perms       = 0640
  backup      = true
  wait {
    min = "500ms"
  }
}
exec {
  command       = "my-daemon --config out/app.conf"
  reload_signal = "SIGHUP"
  kill_timeout  = "3s"
}
kill_signal = "SIGQUIT"
"""


def test_hcl_config_stanzas(tmp_path: Path) -> None:
    """consul, wait, template and exec stanzas map onto the run configuration."""
    (tmp_path / "in.j2").write_text("x")
    (tmp_path / "app.hcl").write_text(HCL)
    config = load_config_paths([str(tmp_path)])
    assert config.consul.address == "127.0.0.1:9999" and config.consul.token == "abc"
    assert (config.consul.retry_backoff, config.consul.retry_max_backoff) == (0.1, 2.0)
    assert config.wait == (1.0, 4.0)
    (spec,) = config.templates
    assert spec.source == tmp_path / "in.j2" and spec.destination == tmp_path / "out/app.conf"
    assert spec.command == ("nginx", "-s", "reload")
    assert spec.perms == 0o640 and spec.backup and spec.wait == (0.5, 2.0)
    assert config.exec.command == ("my-daemon", "--config", "out/app.conf")
    assert config.exec.reload_signal == signal.SIGHUP and config.exec.kill_timeout == 3.0
    assert config.kill_signal == signal.SIGQUIT


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bogus = 1", "unknown setting"),
        ('template {\n source = "a"\n}', "destination is required"),
        ('template {\n destination = "a"\n colour = "red"\n}', "unknown field"),
        ('kill_signal = "SIGNOPE"', "unknown signal"),
        ("template {", "not valid HCL"),
    ],
)
def test_hcl_config_errors_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    """A bad config file is refused with the file name and the reason."""
    path = tmp_path / "bad.hcl"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config_paths([str(path)])
    assert str(path) in str(caught.value)


def test_write_only_when_content_differs(tmp_path: Path) -> None:
    """The same content twice writes once: the file keeps its inode and mtime."""
    target = tmp_path / "out.conf"
    assert render_atomically(target, "a\n") is True
    before = target.stat()
    assert render_atomically(target, "a\n") is False
    after = target.stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert render_atomically(target, "b\n") is True and target.read_text() == "b\n"


def test_write_keeps_existing_mode_or_applies_perms(tmp_path: Path) -> None:
    """An existing file keeps its mode; perms, when given, win; new files default to 0644."""
    target = tmp_path / "out.conf"
    render_atomically(target, "a")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    os.chmod(target, 0o600)
    render_atomically(target, "b")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    render_atomically(target, "c", perms=0o640)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_write_after_own_write_skips_the_read_but_not_the_checks(tmp_path: Path) -> None:
    """Knowing what it wrote last, the renderer replaces the file without reading it when the
    content moved on, still keeps the file's mode and .bak; unchanged content is compared
    with the file, so an edit made meanwhile is undone."""
    target = tmp_path / "out.conf"
    assert render_atomically(target, "one") is True
    os.chmod(target, 0o600)
    assert render_atomically(target, "two", last_written=b"one", backup=True) is True
    assert target.read_text() == "two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert (tmp_path / "out.conf.bak").read_text() == "one"

    target.write_text("edited by hand")
    assert render_atomically(target, "two", last_written=b"two") is True
    assert target.read_text() == "two"
    assert render_atomically(target, "two", last_written=b"two") is False

    target.unlink()  # gone behind our back: written again, with the default mode
    assert render_atomically(target, "three", last_written=b"two", backup=True) is True
    assert target.read_text() == "three"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_write_backup_and_parent_dirs(tmp_path: Path) -> None:
    """Parent folders are created; backup keeps exactly one .bak with the previous content."""
    target = tmp_path / "deep" / "er" / "out.conf"
    render_atomically(target, "one", backup=True)
    assert not (target.parent / "out.conf.bak").exists()
    render_atomically(target, "two", backup=True)
    render_atomically(target, "three", backup=True)
    assert (target.parent / "out.conf.bak").read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.conf", "out.conf.bak"]


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    """Content that cannot be encoded fails before the old file is touched."""
    target = tmp_path / "out.conf"
    render_atomically(target, "good")
    with pytest.raises(UnicodeEncodeError):
        render_atomically(target, "bad \ud800")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["out.conf"]


def test_the_connection_budget_from_config_and_flag(tmp_path: Path) -> None:
    from dcy._cli import ConsulFlags
    from dcy.template.cli import _dcy_for, build_parser, config_from_args

    source = tmp_path / "in.tpl"
    source.write_text("x")
    config = tmp_path / "c.hcl"
    config.write_text("consul {\n  max_connections = 48\n}\n")
    template = f"-template={source}:{tmp_path / 'out'}"
    parser = build_parser()
    from_file = config_from_args(parser.parse_args([f"-config={config}", template]))
    assert from_file.consul.max_connections == 48
    from_flag = config_from_args(
        parser.parse_args([f"-config={config}", "-max-connections", "20", template])
    )
    assert from_flag.consul.max_connections == 20  # the flag wins
    assert config_from_args(parser.parse_args([template])).consul.max_connections == 32
    # What the renderer's client is given; dcy-alert's client gets the default budget.
    assert _dcy_for(from_flag.consul).watch_options.max_connections == 20
    assert ConsulFlags().client().watch_options.max_connections == 32
    for bad in ("15", "many", "-1"):
        with pytest.raises(ConfigError, match="-max-connections"):
            config_from_args(parser.parse_args(["-max-connections", bad, template]))
    config.write_text('consul {\n  max_connections = "lots"\n}\n')
    with pytest.raises(ConfigError, match=r"consul\.max_connections"):
        load_config_paths([str(config)])
