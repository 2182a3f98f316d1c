"""``dcy-template``: render templates from Consul data, like consul-template, on jinja2.

Exit status: 0 clean stop (or ``-once`` rendered everything); 1 a template could not be
rendered in ``-once`` mode, or a command failed with ``-fatal-commands``; 2 usage or
configuration error; in ``-exec`` mode, the child's own status when it exits by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from dcy._backoff import Backoff
from dcy._cli import ConsulFlags, unless_stopped
from dcy._dcy import Dcy
from dcy._durations import parse_duration, parse_wait
from dcy._errors import ConsulUnavailable, DcyError
from dcy._watch import WatchOptions
from dcy.template._config import (
    ConfigError,
    ConsulSettings,
    ExecSettings,
    RunConfig,
    env_patterns,
    load_config_paths,
    parse_log_level,
    parse_max_connections,
    parse_signal,
)
from dcy.template._exec import ChildSupervisor
from dcy.template._kvspecs import TemplateSpecs
from dcy.template._metrics import RendererMetrics
from dcy.template._runner import CommandFailed, QueryRefused, Renderer, RendererOptions
from dcy.template._spec import parse_command, parse_template_flag

if TYPE_CHECKING:
    from dcy.template._sources import SourceWatcher

log = logging.getLogger("dcy.template")

# The latest moment template sources are watched for edits, when no pass has ended by then.
WATCH_SOURCES_AFTER = 1.0

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"dcy-template: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="dcy-template",
        description="Render templates from Consul data and react when the output changes.",
        epilog="Exit status: 0 ok, 1 render/command failure, 2 usage error; "
        "-exec: the child's status.",
    )
    add = p.add_argument
    add(
        "-template",
        action="append",
        default=[],
        metavar="SRC:DEST[:COMMAND]",
        help="render SRC to DEST, then run COMMAND (no shell) when DEST changed; repeatable",
    )
    add(
        "-config",
        action="append",
        default=[],
        metavar="FILE|DIR",
        help="HCL configuration (consul, template, wait, exec stanzas); repeatable",
    )
    add(
        "-syntax",
        choices=("go", "jinja"),
        help="template language of every template that names none (default: go for a "
        ".ctmpl source, consul-template's syntax; jinja otherwise)",
    )
    add("-once", action="store_true", help="render every template once, run commands, exit")
    add("-dry", action="store_true", help="print rendered output to stdout; write and run nothing")
    add("-wait", metavar="MIN[:MAX]", help="quiescence before re-rendering, e.g. 2s:10s")
    add("-consul-addr", metavar="ADDR", help="Consul address (default: CONSUL_HTTP_ADDR)")
    add("-consul-token", metavar="TOKEN", help="ACL token (default: CONSUL_HTTP_TOKEN)")
    add("-consul-ssl", action="store_true", default=None, help="use HTTPS")
    add("-consul-ssl-verify", metavar="BOOL", help="verify the agent's certificate (true)")
    add("-consul-ssl-ca-cert", metavar="FILE")
    add("-consul-ssl-ca-path", metavar="DIR")
    add("-consul-ssl-cert", metavar="FILE")
    add("-consul-ssl-key", metavar="FILE")
    add("-consul-ssl-server-name", metavar="NAME")
    add("-consul-retry-backoff", metavar="DURATION", help="first retry delay (250ms)")
    add("-consul-retry-max-backoff", metavar="DURATION", help="retry delay cap (1m)")
    add(
        "-block-query-wait",
        metavar="DURATION",
        help="how long each blocking query waits for a change (1m); a stalled agent is "
        "noticed after this + 1/16 + 10s",
    )
    add(
        "-max-connections",
        metavar="N",
        help="most connections to the agent, whatever is watched (32); past it, a few wide "
        "queries say what changed",
    )
    add("-log-level", metavar="LEVEL", help="debug, info, warn, error")
    add("-pid-file", metavar="FILE")
    add("-kill-signal", metavar="SIGNAL", help="stop gracefully on this signal (SIGTERM)")
    add("-reload-signal", metavar="SIGNAL", help="reload configuration on this signal (SIGHUP)")
    add("-exec", metavar="COMMAND", help="supervise COMMAND, reloading it on changes")
    add("-exec-reload-signal", metavar="SIGNAL", help="signal the child gets on changes")
    add("-exec-kill-signal", metavar="SIGNAL", help="signal that stops the child (SIGTERM)")
    add("-exec-kill-timeout", metavar="DURATION", help="wait before SIGKILL (30s)")
    add("-exec-splay", metavar="DURATION", help="random delay before reloading the child")
    add("-status-addr", metavar="HOST:PORT", help="serve /health and /metrics here")
    add(
        "-missing-key-timeout",
        metavar="DURATION",
        help="report templates still waiting for data after this long (30s)",
    )
    add("-sandbox-path", metavar="DIR", help="the only folder file() may read")
    add(
        "-env-allowlist",
        action="append",
        default=[],
        metavar="PATTERN",
        help="env() may read variables matching PATTERN even if they look secret; repeatable",
    )
    add(
        "-env-denylist",
        action="append",
        default=[],
        metavar="PATTERN",
        help="env() refuses variables matching PATTERN (wins over -env-allowlist); repeatable",
    )
    add("-fatal-commands", action="store_true", help="stop when a command fails")
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Config files first, then flags on top. Raises ConfigError / ValueError."""
    config = load_config_paths(args.config)
    consul = config.consul
    consul_updates = {
        "address": args.consul_addr,
        "token": args.consul_token,
        "ssl": args.consul_ssl,
        "ca_cert": args.consul_ssl_ca_cert,
        "ca_path": args.consul_ssl_ca_path,
        "cert": args.consul_ssl_cert,
        "key": args.consul_ssl_key,
        "server_name": args.consul_ssl_server_name,
    }
    if args.consul_ssl_verify is not None:
        consul_updates["ssl_verify"] = args.consul_ssl_verify.strip().lower() in ("1", "true")
    if args.consul_retry_backoff:
        consul_updates["retry_backoff"] = parse_duration(args.consul_retry_backoff)
    if args.consul_retry_max_backoff:
        consul_updates["retry_max_backoff"] = parse_duration(args.consul_retry_max_backoff)
    if args.block_query_wait:
        wait = parse_duration(args.block_query_wait)
        if not wait > 0:
            raise ConfigError(f"invalid -block-query-wait {args.block_query_wait!r}: must be > 0")
        consul_updates["block_query_wait"] = wait
    if args.max_connections is not None:
        try:
            consul_updates["max_connections"] = parse_max_connections(
                args.max_connections, what="-max-connections"
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    consul = replace(consul, **{k: v for k, v in consul_updates.items() if v is not None})
    updates: dict[str, object] = {"consul": consul}
    cwd = Path.cwd()
    templates = config.templates + tuple(parse_template_flag(t, base=cwd) for t in args.template)
    if args.syntax:
        templates = tuple(t if t.syntax else replace(t, syntax=args.syntax) for t in templates)
    if not templates:
        raise ConfigError("no templates: give -template SRC:DEST[:COMMAND] or -config")
    updates["templates"] = templates
    if args.wait:
        updates["wait"] = parse_wait(args.wait)
    if args.log_level:
        updates["log_level"] = parse_log_level(args.log_level)
    if args.pid_file:
        updates["pid_file"] = Path(args.pid_file)
    if args.kill_signal:
        updates["kill_signal"] = parse_signal(args.kill_signal)
    if args.reload_signal:
        updates["reload_signal"] = parse_signal(args.reload_signal)
    if args.status_addr:
        updates["status_addr"] = args.status_addr
    if args.missing_key_timeout:
        updates["missing_key_timeout"] = parse_duration(args.missing_key_timeout)
    if args.sandbox_path:
        updates["sandbox_path"] = Path(args.sandbox_path)
    if args.fatal_commands:
        updates["fatal_commands"] = True
    updates["env"] = config.env.merged(
        env_patterns(args.env_allowlist, "-env-allowlist"),
        env_patterns(args.env_denylist, "-env-denylist"),
    )
    updates["exec"] = _exec_settings(config.exec, args)
    sandbox = updates.get("sandbox_path", config.sandbox_path)
    if isinstance(sandbox, Path) and not sandbox.is_dir():
        raise ConfigError(f"sandbox path {sandbox} is not a folder")
    for spec in templates:
        if spec.source is not None and not spec.source.is_file():
            raise ConfigError(f"template source {spec.source} does not exist")
    return replace(config, **updates)  # type: ignore[arg-type]


def _exec_settings(current: ExecSettings, args: argparse.Namespace) -> ExecSettings:
    updates: dict[str, object] = {}
    if args.exec:
        updates["command"] = parse_command(args.exec)
    if args.exec_reload_signal:
        updates["reload_signal"] = parse_signal(args.exec_reload_signal)
    if args.exec_kill_signal:
        updates["kill_signal"] = parse_signal(args.exec_kill_signal)
    if args.exec_kill_timeout:
        updates["kill_timeout"] = parse_duration(args.exec_kill_timeout)
    if args.exec_splay:
        updates["splay"] = parse_duration(args.exec_splay)
    return replace(current, **updates)  # type: ignore[arg-type]


def _dcy_for(consul: ConsulSettings, *, give_up_after: float | None = None) -> Dcy:
    # Consul may come up after us, or be away for a while: wait for it as long as it takes,
    # never exit for it (consul-template exits after its retries: #2045). A -once run is
    # the exception (give_up_after): a job waiting for one render must end, with status 1.
    address = consul.address
    if address is not None and consul.ssl and "://" not in address:
        address = f"https://{address}"
    flags = ConsulFlags(
        http_addr=address,
        token=consul.token,
        ca_file=consul.ca_cert,
        ca_path=consul.ca_path,
        client_cert=consul.cert,
        client_key=consul.key,
        tls_server_name=consul.server_name,
        verify=consul.ssl_verify,
        wait_for_consul=give_up_after,
    )
    backoff = Backoff(
        base=max(consul.retry_backoff, 0.001),
        cap=max(consul.retry_max_backoff, consul.retry_backoff, 0.001),
    )
    return flags.client(
        WatchOptions(
            wait=consul.block_query_wait,
            backoff=backoff,
            max_connections=consul.max_connections,
        )
    )


class Application:
    """One run of the renderer with its Consul client, child, status server and signals."""

    def __init__(self, args: argparse.Namespace, config: RunConfig) -> None:
        self.args = args
        self.config = config
        self.exit_status = EXIT_OK
        self.renderer: Renderer | None = None
        self.child: ChildSupervisor | None = None
        self._stop = asyncio.Event()
        self._heap_frozen = False
        self._watcher: SourceWatcher | None = None
        self._sources_seen: dict[Path, tuple[int, int] | None] = {}

    def stop(self, status: int = EXIT_OK) -> None:
        self.exit_status = status
        self._stop.set()
        if self.renderer is not None:
            self.renderer.stop()

    async def _connect(self) -> Dcy | None:
        # -once: an agent that does not answer is given -missing-key-timeout, as missing
        # data is once it answers (then the render waits as long again at most).
        give_up = self.config.missing_key_timeout if self.args.once else None
        dcy = _dcy_for(self.config.consul, give_up_after=give_up)
        try:
            opened, _ = await unless_stopped(dcy.open(), self._stop)
        except ConsulUnavailable as exc:
            log.error("%s", exc)
            self.exit_status = EXIT_FAILED
            return None
        return dcy if opened else None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        if self.config.pid_file:
            self.config.pid_file.write_text(f"{os.getpid()}\n")
        dcy = await self._connect()
        if dcy is None:
            return self.exit_status
        status_runner = None
        try:
            assert dcy.agent is not None
            if self.config.exec.command:
                self.child = ChildSupervisor(self.config.exec, on_exit=self.stop)
            metrics = None
            if self.config.status_addr:
                metrics = RendererMetrics()
            self.renderer = Renderer(
                dcy.engine,
                self.config.templates,
                domain=dcy.agent.domain,
                specs=TemplateSpecs(local_node=dcy.agent.node_name),
                options=RendererOptions(
                    wait=self.config.wait,
                    missing_key_timeout=self.config.missing_key_timeout,
                    dry=self.args.dry,
                    fatal_commands=self.config.fatal_commands,
                    sandbox=self.config.sandbox_path,
                    env_policy=self.config.env.protecting(dcy.config.token),
                ),
                metrics=metrics,
                on_pass=self._after_pass,
            )
            if metrics is not None and self.config.status_addr:
                from dcy.template._status import start_status_server

                status_runner = await start_status_server(
                    self.renderer, metrics, self.config.status_addr
                )
            if not self.args.once:
                # Watching sources costs watchdog's import and threads: it starts after the
                # first pass (or a second), off the way to the first render. An edit made
                # before it started is caught by comparing the files with what they were.
                self._sources_seen = {p: _stat(p) for p in self.renderer.watched_paths}
                loop.call_later(WATCH_SOURCES_AFTER, self._watch_sources)
            try:
                status = await self.renderer.run(once=self.args.once)
            except CommandFailed as exc:
                log.error("%s; stopping (-fatal-commands)", exc)
                return EXIT_FAILED
            except QueryRefused as exc:
                log.error("%s", exc)
                return EXIT_FAILED
            return status if self.exit_status == EXIT_OK else self.exit_status
        finally:
            if self._watcher is not None:
                self._watcher.stop()
            if self.child is not None:
                await self.child.stop()
            if status_runner is not None:
                await status_runner.cleanup()
            await dcy.aclose()
            if self.config.pid_file:
                with contextlib.suppress(FileNotFoundError):
                    self.config.pid_file.unlink()

    def _watch_sources(self) -> None:
        if self._watcher is not None or self.renderer is None or self._stop.is_set():
            return
        from dcy.template._sources import SourceWatcher

        self._watcher = SourceWatcher(asyncio.get_running_loop(), self._source_changed)
        self._watcher.watch(self.renderer.watched_paths)
        log.debug("watching %d template source(s) for edits", len(self._sources_seen))
        for path, seen in self._sources_seen.items():
            if _stat(path) != seen:
                self._source_changed(path)

    async def _after_pass(self, written: bool) -> None:
        if (
            not self.args.once
            and self.renderer is not None
            and all(s.rendered or s.last_error for s in self.renderer.states)
        ):
            self._watch_sources()
        if (
            not self._heap_frozen
            and self.renderer is not None
            and not self.args.once
            and all(s.rendered for s in self.renderer.states)
        ):
            # What exists once every template is out (modules, compiled templates, the
            # watches) lives as long as the process: out of the collector's sight, full
            # collections stop walking it on every change. Collected first, so no garbage
            # is kept.
            self._heap_frozen = True
            gc.collect()
            gc.freeze()
        if self.child is None or self.args.dry or self.renderer is None:
            return
        if self.child.process is None:
            if all(s.rendered for s in self.renderer.states):
                await self.child.start()
        elif written:
            await self.child.reload()

    def _source_changed(self, path: Path) -> None:
        if self.renderer is not None:
            log.info("%s changed on disk; rendering again", path)
            self.renderer.source_changed(path)

    def _reload(self) -> None:
        try:
            config = config_from_args(self.args)
        except (ValueError, OSError) as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return
        self.config = replace(
            self.config, templates=config.templates, wait=config.wait, env=config.env
        )
        if self.renderer is not None:
            self.renderer.options = replace(
                self.renderer.options,
                env_policy=config.env.protecting(
                    *self.renderer.options.env_policy.protected_values
                ),
            )
            self.renderer.set_templates(config.templates)
            log.info("configuration reloaded: %d template(s)", len(config.templates))

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in {self.config.kill_signal, signal.SIGINT, signal.SIGTERM}:
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(self.config.reload_signal, self._reload)
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            if sig not in (self.config.kill_signal, self.config.reload_signal):
                loop.add_signal_handler(sig, self._forward, sig)

    def _forward(self, sig: signal.Signals) -> None:
        if self.child is not None:
            self.child.forward(sig)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except (ConfigError, ValueError) as exc:
        print(f"dcy-template: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return asyncio.run(Application(args, config).run())
    except DcyError as exc:
        print(f"dcy-template: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())


def _stat(path: Path) -> tuple[int, int] | None:
    """What tells an edited file from an untouched one: modification time and size."""
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_mtime_ns, status.st_size
