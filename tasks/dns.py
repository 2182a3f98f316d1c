"""`inv dns`: every program on this host resolves `*.service.sd` (see tasks/_dns_setup.py)."""

from __future__ import annotations

from pathlib import Path

from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

from tasks._dns_setup import DnsPaths, DnsSetupError, ForwarderSettings, setup, undo

_PATHS = DnsPaths()
_SETTINGS = ForwarderSettings()


@task(
    help={
        "undo": "put the resolver file back exactly as it was and stop dnsmasq",
        "consul-dns": f"the agent's DNS as host#port (default {_SETTINGS.consul_dns})",
        "listen": f"address dnsmasq answers on, port 53 (default {_SETTINGS.listen})",
        "cache-size": "dnsmasq's cache entries; 0 sends every lookup to Consul",
        "resolv-conf": f"the resolver file to point at dnsmasq (default {_PATHS.resolv_conf})",
        "state-dir": f"backup, dnsmasq config and pid (default {_PATHS.state_dir})",
    }
)
def dns(
    c: Context,
    undo_: bool = False,
    consul_dns: str = _SETTINGS.consul_dns,
    listen: str = _SETTINGS.listen,
    cache_size: int = _SETTINGS.cache_size,
    resolv_conf: str = str(_PATHS.resolv_conf),
    state_dir: str = str(_PATHS.state_dir),
) -> None:
    """Resolve *.service.sd system-wide: dnsmasq sends `sd` to Consul, the rest upstream."""
    paths = DnsPaths(Path(resolv_conf), Path(state_dir))
    try:
        if undo_:
            actions = undo(paths)
        else:
            settings = ForwarderSettings(
                consul_dns=consul_dns, listen=listen, cache_size=cache_size
            )
            actions = setup(paths, settings)
    except DnsSetupError as exc:
        raise Exit(f"dns: {exc}", code=1) from exc
    for action in actions:
        print(action)
    if not undo_:
        print("try: getent hosts consul.service.sd   (undo: inv dns --undo)")
