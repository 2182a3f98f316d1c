"""Point the host's resolver at a dnsmasq forwarder: the Consul domain to the agent's DNS
port, every other name to the nameservers the host used before.

``inv dns`` runs :func:`setup`, ``inv dns --undo`` runs :func:`undo`. Every path is a
parameter (:class:`DnsPaths`), so tests run the same code on files in a temporary folder or
inside a private mount namespace. ``python -m tasks._dns_setup --help`` is the same thing
without invoke.

- The first setup keeps the resolver file exactly as it was (bytes, mode, owner, or the
  symlink it was) in the state folder; undo puts it back and stops the forwarder.
- Idempotent: running setup again keeps that first backup, rewrites the forwarder's config
  and restarts it only when something changed.
- Nothing changes when the resolver file cannot be written: the check comes first.
- The old nameservers stay in the new resolv.conf after ours, so names keep resolving when
  dnsmasq is not running (after a reboot, say); ``sd`` names then fail until ``inv dns``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

MARKER = "# dcy: written by `inv dns`; `inv dns --undo` restores the previous file"
# glibc reads at most three nameservers: ours plus two of the old ones as fallbacks.
MAX_NAMESERVERS = 3


class DnsSetupError(RuntimeError):
    """The setup or undo cannot go ahead; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class DnsPaths:
    """Where the resolver file is and where the forwarder keeps its state."""

    resolv_conf: Path = Path("/etc/resolv.conf")
    state_dir: Path = Path("/var/lib/dcy-dns")

    @property
    def backup(self) -> Path:
        return self.state_dir / "resolv.conf.orig"

    @property
    def backup_info(self) -> Path:
        return self.state_dir / "resolv.conf.orig.json"

    @property
    def dnsmasq_conf(self) -> Path:
        return self.state_dir / "dnsmasq.conf"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "dnsmasq.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "dnsmasq.log"


@dataclass(frozen=True, slots=True)
class ForwarderSettings:
    """What dnsmasq does: ``consul_dns`` is ``host#port`` as dnsmasq writes servers."""

    consul_dns: str = "127.0.0.1#8600"
    domain: str = "sd"
    listen: str = "127.0.0.1"
    port: int = 53
    cache_size: int = 1000
    dnsmasq: str = "dnsmasq"

    def __post_init__(self) -> None:
        host, sep, port = self.consul_dns.partition("#")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise DnsSetupError(
                f"--consul-dns {self.consul_dns!r}: use host#port, e.g. 127.0.0.1#8600"
            )
        for what, address in (("--consul-dns", host), ("--listen", self.listen)):
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise DnsSetupError(f"{what}: {address!r} is not an IP address") from None
        if not 0 < self.port < 65536:
            raise DnsSetupError(f"--port {self.port}: use 1-65535")
        if self.cache_size < 0:
            raise DnsSetupError(f"--cache-size {self.cache_size}: use 0 (no cache) or more")
        if not self.domain or not all(part.isalnum() for part in self.domain.split(".")):
            raise DnsSetupError(f"--domain {self.domain!r} is not a DNS domain")


@dataclass(frozen=True, slots=True)
class FileState:
    """A resolver file as found: its bytes and attributes, or the symlink it was."""

    kind: Literal["file", "symlink", "absent"]
    data: bytes = b""
    link: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace")

    @classmethod
    def read(cls, path: Path) -> FileState:
        try:
            info = path.lstat()
        except FileNotFoundError:
            return cls("absent")
        if path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:
                data = b""  # a dangling link: nothing to learn upstreams from
            return cls("symlink", data, link=os.readlink(path))
        mode = info.st_mode & 0o7777
        return cls("file", path.read_bytes(), mode=mode, uid=info.st_uid, gid=info.st_gid)


# -- rendering -----------------------------------------------------------------------------
def nameservers(resolv_text: str) -> list[str]:
    """The ``nameserver`` addresses of a resolv.conf, in order."""
    found = []
    for line in resolv_text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            found.append(words[1])
    return found


def render_dnsmasq_conf(
    settings: ForwarderSettings, upstreams: Sequence[str], paths: DnsPaths
) -> str:
    lines = [
        "# dcy: written by `inv dns` (regenerated on every run), removed by `inv dns --undo`.",
        f"listen-address={settings.listen}",
        f"port={settings.port}",
        "bind-interfaces",
        "# Only the servers named here: resolv.conf now points back at this forwarder.",
        "no-resolv",
        "no-hosts",
        f"server=/{settings.domain}/{settings.consul_dns}",
        *(f"server={upstream}" for upstream in upstreams),
        "# Answers are kept for the TTL Consul gives (dns_config.service_ttl); 0 = no cache.",
        f"cache-size={settings.cache_size}",
        f"pid-file={paths.pid_file}",
        f"log-facility={paths.log_file}",
    ]
    return "\n".join(lines) + "\n"


def render_resolv_conf(original: str, settings: ForwarderSettings, upstreams: Sequence[str]) -> str:
    """Our resolver first, the old nameservers after it, the old search/options kept."""
    lines = [
        MARKER,
        f"# {settings.domain} names go to Consul through dnsmasq on {settings.listen}; the old",
        "# nameservers follow as fallbacks for when dnsmasq is not running.",
        f"nameserver {settings.listen}",
        *(f"nameserver {ns}" for ns in upstreams[: MAX_NAMESERVERS - 1]),
    ]
    for line in original.splitlines():
        words = line.split()
        if not words or words[0] in ("nameserver", "#", ";") or line.startswith(("#", ";")):
            continue
        if words[0] == "options":
            # rotate would send half of the sd lookups to a fallback that cannot answer them.
            kept = [w for w in words[1:] if w != "rotate"]
            if kept:
                lines.append("options " + " ".join(kept))
            continue
        lines.append(line.strip())
    return "\n".join(lines) + "\n"


# -- setup and undo ------------------------------------------------------------------------
def setup(paths: DnsPaths, settings: ForwarderSettings) -> list[str]:
    """Start (or refresh) the forwarder and point the resolver file at it; returns what was
    done, one line per step."""
    dnsmasq = shutil.which(settings.dnsmasq)
    if dnsmasq is None:
        raise DnsSetupError(
            f"{settings.dnsmasq} not found: install Debian's dnsmasq (scripts/install does)"
        )
    current = FileState.read(paths.resolv_conf)
    original = _original_state(paths, current)
    upstreams = [ns for ns in nameservers(original.text) if ns != settings.listen]
    if settings.listen in nameservers(original.text) and settings.port == 53:
        raise DnsSetupError(
            f"{paths.resolv_conf} already uses a resolver on {settings.listen}: pick another "
            "--listen address (any 127.x.y.z works on Linux)"
        )
    _require_writable(paths)
    actions: list[str] = []
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    if original is current:
        _save_backup(paths, current)
        actions.append(f"kept the previous {paths.resolv_conf} in {paths.backup}")
    if not upstreams:
        actions.append("warning: no upstream nameserver found; only sd names will resolve")
    conf = render_dnsmasq_conf(settings, upstreams, paths)
    changed = _write_if_changed(paths.dnsmasq_conf, conf)
    running = _dnsmasq_pid(paths)
    if running is not None and changed:
        _stop_pid(running)
        running = None
    if running is None:
        _start_dnsmasq(dnsmasq, paths)
        actions.append(
            f"dnsmasq on {settings.listen}:{settings.port}: {settings.domain} → "
            f"{settings.consul_dns}, the rest → {', '.join(upstreams) or 'nothing'}"
        )
    else:
        actions.append(f"dnsmasq already running (pid {running}) with this configuration")
    resolv = render_resolv_conf(original.text, settings, upstreams)
    if current.kind != "file" or current.text != resolv:
        mode = original.mode if original.kind == "file" else 0o644
        _write_resolver(paths.resolv_conf, resolv.encode(), mode)
        actions.append(f"{paths.resolv_conf} now points at {settings.listen}")
    else:
        actions.append(f"{paths.resolv_conf} already points at {settings.listen}")
    return actions


def undo(paths: DnsPaths) -> list[str]:
    """Put the resolver file back exactly as setup found it and stop the forwarder."""
    if not paths.backup_info.exists():
        pid = _dnsmasq_pid(paths)
        if pid is not None:
            _stop_pid(pid)
            return [f"no backup to restore; stopped a leftover dnsmasq (pid {pid})"]
        return ["nothing to undo: `inv dns` has not changed this host"]
    current = FileState.read(paths.resolv_conf)
    if MARKER not in current.text:
        raise DnsSetupError(
            f"{paths.resolv_conf} was changed by something else since `inv dns`: not "
            f"overwriting it. The file `inv dns` replaced is {paths.backup}; put it back by "
            f"hand if you want it, then delete {paths.state_dir}"
        )
    original = _load_backup(paths)
    _require_writable(paths)
    actions = [_restore(paths.resolv_conf, original)]
    pid = _dnsmasq_pid(paths)
    if pid is not None:
        _stop_pid(pid)
        actions.append(f"stopped dnsmasq (pid {pid})")
    for path in (
        paths.backup,
        paths.backup_info,
        paths.dnsmasq_conf,
        paths.pid_file,
        paths.log_file,
    ):
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        paths.state_dir.rmdir()
    return actions


def _original_state(paths: DnsPaths, current: FileState) -> FileState:
    """The resolver file as it was before dcy: the backup once setup has run, else now."""
    ours = MARKER in current.text
    if paths.backup_info.exists():
        if ours:
            return _load_backup(paths)
        # Something (DHCP, an admin) rewrote the file since: that is the new truth.
        return current
    if ours:
        raise DnsSetupError(
            f"{paths.resolv_conf} was written by `inv dns` but no backup is in "
            f"{paths.state_dir}: restore the resolver file by hand first"
        )
    return current


# -- files ---------------------------------------------------------------------------------
def _require_writable(paths: DnsPaths) -> None:
    target = paths.resolv_conf
    in_place = target.exists() and not target.is_symlink() and os.access(target, os.W_OK)
    # A mount point (a container's bind-mounted resolv.conf) can only be written in place.
    replace = os.access(target.parent, os.W_OK) and not _is_mount_point(target)
    if not (in_place or replace):
        reason = "read-only file system" if _read_only(target) else "permission denied"
        raise DnsSetupError(
            f"cannot write {target} ({reason}); nothing was changed. Run as root (sudo inv "
            "dns); in a container the runtime owns this file (e.g. docker run --dns 127.0.0.1)"
        )


def _is_mount_point(path: Path) -> bool:
    try:
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    # Field 5 is the mount point, with spaces and the like escaped as octal.
    wanted = str(path.resolve()) if not path.is_symlink() else str(path.absolute())
    return any(
        len(fields) > 4 and fields[4].encode().decode("unicode_escape") == wanted
        for fields in (line.split() for line in mounts)
    )


def _read_only(path: Path) -> bool:
    probe = path if path.exists() else path.parent
    try:
        return bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _write_resolver(path: Path, data: bytes, mode: int) -> None:
    """Atomically where possible; in place when the file is a mount point (a container's
    bind-mounted resolv.conf cannot be renamed over: EBUSY)."""
    try:
        _replace(path, data, mode)
    except OSError as exc:
        if exc.errno not in (errno.EBUSY, errno.EXDEV, errno.EACCES, errno.EROFS, errno.EPERM):
            raise
        if path.is_symlink() or not path.exists():
            raise DnsSetupError(f"cannot write {path}: {exc.strerror}") from exc
        try:
            with path.open("r+b") as handle:
                handle.write(data)
                handle.truncate()
        except OSError as inner:
            raise DnsSetupError(f"cannot write {path}: {inner.strerror}") from inner


def _replace(
    path: Path, data: bytes, mode: int, uid: int | None = None, gid: int | None = None
) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, mode)
        if uid is not None and gid is not None:
            with contextlib.suppress(PermissionError):
                os.chown(tmp, uid, gid)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_if_changed(path: Path, text: str) -> bool:
    if path.exists() and path.read_text() == text:
        return False
    _replace(path, text.encode(), 0o644)
    return True


def _save_backup(paths: DnsPaths, state: FileState) -> None:
    _replace(paths.backup, state.data, 0o600)
    info = {k: v for k, v in asdict(state).items() if k != "data"}
    _replace(paths.backup_info, json.dumps(info, indent=2).encode() + b"\n", 0o600)


def _load_backup(paths: DnsPaths) -> FileState:
    try:
        info = json.loads(paths.backup_info.read_text())
        data = paths.backup.read_bytes() if info["kind"] == "file" else b""
        if info["kind"] == "symlink":
            with contextlib.suppress(OSError):
                data = (paths.resolv_conf.parent / info["link"]).read_bytes()
        return FileState(info["kind"], data, info["link"], info["mode"], info["uid"], info["gid"])
    except (OSError, ValueError, KeyError) as exc:
        raise DnsSetupError(f"the backup in {paths.state_dir} is unreadable: {exc}") from exc


def _restore(path: Path, original: FileState) -> str:
    if original.kind == "absent":
        path.unlink(missing_ok=True)
        return f"removed {path} (there was none before `inv dns`)"
    if original.kind == "symlink":
        tmp = path.with_name(f".{path.name}.dcy-link")
        tmp.unlink(missing_ok=True)
        os.symlink(original.link, tmp)
        os.replace(tmp, path)
        return f"{path} is again a symlink to {original.link}"
    try:
        _replace(path, original.data, original.mode, original.uid, original.gid)
    except OSError as exc:
        if exc.errno not in (errno.EBUSY, errno.EXDEV):
            raise DnsSetupError(f"cannot restore {path}: {exc.strerror}") from exc
        with path.open("r+b") as handle:  # a bind mount: same inode, old bytes
            handle.write(original.data)
            handle.truncate()
        os.chmod(path, original.mode)
    return f"restored {path} as it was before `inv dns`"


# -- the dnsmasq process -------------------------------------------------------------------
def _start_dnsmasq(binary: str, paths: DnsPaths) -> None:
    # dnsmasq binds its sockets before it forks into the background, so a zero exit means it
    # is answering; anything else (port 53 taken, no permission) is on stderr.
    result = subprocess.run(
        [binary, f"--conf-file={paths.dnsmasq_conf}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        raise DnsSetupError(
            f"dnsmasq did not start (exit {result.returncode}): {result.stderr.strip()}"
        )


def _dnsmasq_pid(paths: DnsPaths) -> int | None:
    """The pid of the dnsmasq this state folder started, if it still runs."""
    try:
        pid = int(paths.pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    # A stale pid file after a reboot may name an unrelated process: only ours counts.
    if f"--conf-file={paths.dnsmasq_conf}".encode() not in cmdline or not _alive(pid):
        return None
    return pid


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _stop_pid(pid: int, timeout: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# -- command line --------------------------------------------------------------------------
_PATHS = DnsPaths()
_SETTINGS = ForwarderSettings()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tasks._dns_setup", description=__doc__.split("\n\n")[0] if __doc__ else ""
    )
    parser.add_argument("--undo", action="store_true", help="restore the previous state")
    parser.add_argument("--resolv-conf", type=Path, default=_PATHS.resolv_conf)
    parser.add_argument("--state-dir", type=Path, default=_PATHS.state_dir)
    parser.add_argument("--consul-dns", default=_SETTINGS.consul_dns)
    parser.add_argument("--domain", default=_SETTINGS.domain)
    parser.add_argument("--listen", default=_SETTINGS.listen)
    parser.add_argument("--port", type=int, default=_SETTINGS.port)
    parser.add_argument("--cache-size", type=int, default=_SETTINGS.cache_size)
    args = parser.parse_args(argv)
    paths = DnsPaths(args.resolv_conf, args.state_dir)
    try:
        if args.undo:
            actions = undo(paths)
        else:
            settings = ForwarderSettings(
                consul_dns=args.consul_dns,
                domain=args.domain,
                listen=args.listen,
                port=args.port,
                cache_size=args.cache_size,
            )
            actions = setup(paths, settings)
    except DnsSetupError as exc:
        print(f"dns: {exc}", file=sys.stderr)
        return 1
    for action in actions:
        print(action)
    return 0


if __name__ == "__main__":
    sys.exit(main())
