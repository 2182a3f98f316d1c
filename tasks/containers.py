"""`inv images` (build every image) and `inv deploy` (run one host's compose file on it)."""

from __future__ import annotations

import sys

from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

from tasks._deploy import DeployError, plan_deploy, run_deploy
from tasks._engines import compose_cli
from tasks._images import ImagesError, build_images, default_tag
from tasks._infra_render import INVENTORY, RenderError, read_pins
from tasks._inventory import InventoryError, load_inventory


@task(
    help={
        "tag": "image tag (default: the git commit, -dirty with uncommitted build inputs)",
        "push": "registry to tag for and push to, e.g. registry.example.net/dcy",
    }
)
def images(c: Context, tag: str = "", push: str = "") -> None:
    """Build sensor, worker, app and renderer from images/Dockerfile with docker or podman
    (whichever can build). Exit 3: no engine can build here; 1: a build or push failed."""
    try:
        built = build_images(tag=tag, registry=push)
    except ImagesError as exc:
        print(exc, file=sys.stderr)
        raise Exit(code=exc.code) from exc
    print("built: " + " ".join(built))


@task(
    help={
        "dc": "datacenter, as in datacenters/inventory.yml",
        "host": "host of that datacenter",
        "tag": "image tag to run (default: the git commit, as `inv images` tags it)",
        "dry-run": "print the command instead of running it",
    }
)
def deploy(c: Context, dc: str, host: str, tag: str = "", dry_run: bool = False) -> None:
    """Run `docker compose up` with datacenters/<dc>/<host>/docker-compose.yml against that
    host's engine (DOCKER_HOST=ssh://... from the inventory)."""
    compose = compose_cli(prefer="docker compose")
    if compose is None:
        raise Exit(
            "deploy: neither `docker compose` nor `docker-compose` runs here: install one",
            code=1,
        )
    try:
        inventory = load_inventory(INVENTORY)
        plan = plan_deploy(inventory, read_pins(), dc, host, tag or default_tag(), compose)
    except (InventoryError, RenderError, DeployError, ImagesError) as exc:
        raise Exit(f"deploy: {exc}", code=1) from exc
    print(plan.shell(), flush=True)
    if dry_run:
        return
    status = run_deploy(plan)
    if status != 0:
        raise Exit(f"deploy: {plan.argv[0]} exited {status}", code=status)
