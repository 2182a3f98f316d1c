"""`inv infra.render`, `inv infra.check`: the datacenters → hosts tree as source.

datacenters/inventory.yml says what runs where; render turns it into one compose file per host
(datacenters/<dc>/<host>/docker-compose.yml, committed); check validates them offline.
"""

from __future__ import annotations

from pathlib import Path

from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

from tasks._engines import compose_cli
from tasks._infra_check import check_all, consul_binary
from tasks._infra_render import INVENTORY, ROOT, RenderError, read_pins, render_all, write_rendered
from tasks._inventory import InventoryError, load_inventory


@task
def render(c: Context) -> None:
    """Render datacenters/<dc>/<host>/docker-compose.yml from datacenters/inventory.yml."""
    try:
        inventory = load_inventory(INVENTORY)
        changes = write_rendered(render_all(inventory, read_pins()))
    except (InventoryError, RenderError) as exc:
        raise Exit(f"infra.render: {exc}", code=1) from exc
    for change in changes:
        print(change)
    hosts = len(inventory.hosts)
    print(f"{hosts} host compose files {'rendered' if changes else 'already current'}")


@task
def check(c: Context) -> None:
    """Validate every host's compose file (docker-compose config, consul validate) and the
    cross-host facts: odd server counts >= 3, a local agent per host, no port bound twice."""
    compose = compose_cli(prefer="docker-compose")
    if compose is None:
        raise Exit(
            "infra.check: no compose CLI: install docker-compose (scripts/install does)", code=1
        )
    try:
        inventory = load_inventory(INVENTORY)
        consul = consul_binary()
        findings, valid = check_all(inventory, read_pins(), compose, consul)
    except (InventoryError, RenderError, FileNotFoundError) as exc:
        raise Exit(f"infra.check: {exc}", code=1) from exc
    for finding in findings:
        print(finding)
    if findings:
        raise Exit(f"infra.check: {len(findings)} problem(s)", code=1)
    dcs = ", ".join(
        f"{dc.name}: {len(dc.servers)} servers / {len(dc.hosts)} hosts"
        for dc in inventory.datacenters
    )
    print(f"{valid} compose files valid ({' '.join(compose)}), Consul configs valid; {dcs}")


LOCAL_HELP = {
    "local": "run the inventory on this machine: one network namespace per host (needs root)",
    "inventory": "the inventory to run (default datacenters/inventory.yml)",
    "mode": "SVC_MODE of every service: http, nsq or push (default: the inventory's mode)",
}


@task(help=LOCAL_HELP)
def up(c: Context, local: bool = False, inventory: str = "", mode: str = "") -> None:
    """Start the inventory as a local cluster (--local): every host a network namespace on a
    private fabric, running its Consul agent, NSQ daemons and services as processes; returns
    once every service passes, with the UIs' addresses. Stop it with `inv infra.down --local`."""
    from tasks._cluster import ClusterError
    from tasks._cluster import up as cluster_up
    from tasks._inventory import MODES

    if not local:
        raise Exit("infra.up: only --local is supported (hosts deploy with `inv deploy`)", code=2)
    if mode and mode not in MODES:
        raise Exit(f"infra.up: invalid --mode {mode!r}: choose from {', '.join(MODES)}", code=2)
    path = Path(inventory).resolve() if inventory else INVENTORY
    try:
        cluster = cluster_up(load_inventory(path), mode=mode or None)
    except InventoryError as exc:
        raise Exit(f"infra.up: {exc}", code=1) from exc
    except ClusterError as exc:
        raise Exit(f"infra.up: {exc}", code=exc.code) from exc
    for what, url in cluster.state.urls.items():
        print(f"  {what:<16} {url}")
    print("  stop it with   inv infra.down --local")


@task(help={"local": "stop the local cluster started by `inv infra.up --local`"})
def down(c: Context, local: bool = False) -> None:
    """Stop every process of the local cluster and remove its namespaces (idempotent)."""
    from tasks._cluster import ClusterError
    from tasks._cluster import down as cluster_down

    if not local:
        raise Exit("infra.down: only --local is supported", code=2)
    try:
        if not cluster_down():
            print(f"no local cluster running (no {ROOT / '.data/cluster/state.json'})")
    except ClusterError as exc:
        raise Exit(f"infra.down: {exc}", code=exc.code) from exc
