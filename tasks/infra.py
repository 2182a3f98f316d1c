"""`inv infra.render`, `inv infra.check`: the datacenters → hosts tree as source.

datacenters/inventory.yml says what runs where; render turns it into one compose file per host
(datacenters/<dc>/<host>/docker-compose.yml, committed); check validates them offline.
"""

from __future__ import annotations

from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

from tasks._engines import compose_cli
from tasks._infra_check import check_all, consul_binary
from tasks._infra_render import INVENTORY, RenderError, read_pins, render_all, write_rendered
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
