"""``inv deploy --dc DC --host HOST``: bring one host to what its compose file describes.

Runs ``docker compose up`` (or Debian's ``docker-compose``) on this machine against the host's
engine over SSH (``DOCKER_HOST=ssh://...`` from the inventory), with the host's rendered
compose file and the image tag in DCY_TAG. Refuses a compose file that no longer matches what
the inventory renders: what runs on a host is always what was reviewed and committed.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tasks._infra_render import COMPOSE_FILE, DATACENTERS, Pins, render_all
from tasks._inventory import Inventory

PROJECT = "dcy"


class DeployError(RuntimeError):
    """The deploy cannot go ahead; the message says why."""


@dataclass(frozen=True, slots=True)
class DeployPlan:
    argv: tuple[str, ...]
    env: Mapping[str, str]  # set on top of this process's environment

    def shell(self) -> str:
        """The command as one shell line: what `--dry-run` prints."""
        assignments = [f"{key}={shlex.quote(value)}" for key, value in self.env.items()]
        return " ".join([*assignments, shlex.join(self.argv)])


def plan_deploy(
    inventory: Inventory,
    pins: Pins,
    datacenter: str,
    host_name: str,
    tag: str,
    compose: Sequence[str],
    root: Path = DATACENTERS,
) -> DeployPlan:
    host = inventory.host(datacenter, host_name)
    relative = Path(host.datacenter, host.name, COMPOSE_FILE)
    path = root / relative
    expected = render_all(inventory, pins)[relative]
    if not path.is_file() or path.read_text() != expected:
        state = "is missing" if not path.is_file() else "differs from what the inventory renders"
        raise DeployError(
            f"{path} {state}: run `inv infra.render`, review and commit it, then deploy"
        )
    argv = (
        *compose,
        "--project-name", PROJECT,
        "--file", str(path.resolve()),
        "up", "--detach", "--remove-orphans",
    )  # fmt: skip
    return DeployPlan(argv, {"DOCKER_HOST": host.docker_host, "DCY_TAG": tag})


def run_deploy(plan: DeployPlan) -> int:
    return subprocess.run(list(plan.argv), env={**os.environ, **plan.env}, check=False).returncode
