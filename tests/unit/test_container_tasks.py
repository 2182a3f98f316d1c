"""`inv images` and `inv deploy`, run for real through invoke against a stand-in `docker` (and
`docker-compose`) on PATH that records every call with the environment it got."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tasks._deploy import DeployError, plan_deploy
from tasks._images import BUILD_INPUTS, TARGETS, default_tag
from tasks._infra_render import read_pins, render_all, write_rendered
from tasks._inventory import load_inventory

ROOT = Path(__file__).resolve().parents[2]
INV = ROOT / ".venv" / "bin" / "inv"
DAEMON_DOWN = (
    "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. "
    "Is the docker daemon running?"
)

STAND_IN = f"""#!{sys.executable}
# Records its argv and the deploy environment as one JSON line; behaves as STANDIN_* say.
import json, os, sys
args = sys.argv[1:]
record = {{"program": os.path.basename(sys.argv[0]), "args": args}}
record.update((k, os.environ.get(k)) for k in ("DOCKER_HOST", "DCY_TAG"))
with open(os.environ["STANDIN_LOG"], "a") as log:
    log.write(json.dumps(record) + "\\n")
env = os.environ.get
if args[:1] == ["info"]:
    if env("STANDIN_INFO_EXIT", "0") != "0":
        print("Server:", file=sys.stderr)
        print({DAEMON_DOWN!r}, file=sys.stderr)
    sys.exit(int(env("STANDIN_INFO_EXIT", "0")))
if args[:2] == ["compose", "version"]:
    sys.exit(int(env("STANDIN_COMPOSE_EXIT", "0")))
if args[:1] == ["build"] and args[args.index("--target") + 1] == env("STANDIN_FAIL_TARGET"):
    sys.exit(1)
if "up" in args:
    sys.exit(int(env("STANDIN_UP_EXIT", "0")))
sys.exit(0)
"""


class StandIn:
    def __init__(self, tmp_path: Path) -> None:
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        self.log = tmp_path / "calls.jsonl"
        self.log.touch()
        self.add("docker")

    def add(self, name: str) -> None:
        (self.bin / name).write_text(STAND_IN)
        (self.bin / name).chmod(0o755)

    def calls(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def run(
        self, *args: str, path: str | None = None, **env: str
    ) -> subprocess.CompletedProcess[str]:
        """`inv ARGS` from the repository root with the stand-ins first on PATH."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "DCY_"))}
        base.update(env, STANDIN_LOG=str(self.log))
        base["PATH"] = path if path is not None else f"{self.bin}:/usr/bin:/bin"
        return subprocess.run(
            [str(INV), *args], cwd=ROOT, env=base, capture_output=True, text=True, check=False
        )


@pytest.fixture
def stand_in(tmp_path: Path) -> StandIn:
    return StandIn(tmp_path)


def _commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
        check=True,
    ).stdout.strip()  # fmt: skip


# --- inv images ------------------------------------------------------------------------------


def test_images_without_any_engine_exits_3_and_says_why(stand_in: StandIn) -> None:
    """With a docker CLI whose `docker info` cannot reach an engine and no podman, `inv images`
    names both reasons and exits 3 without trying to build."""
    result = stand_in.run("images", path=str(stand_in.bin), STANDIN_INFO_EXIT="1")
    assert result.returncode == 3
    assert result.stderr.splitlines() == [
        "inv images: no container engine can build images on this machine:",
        f"  docker: CLI found but `docker info` failed (exit 1: {DAEMON_DOWN}); "
        "no engine is running or reachable",
        "  podman: not installed",
        "Start a Docker engine (or install podman) and run `inv images` again; the compose "
        "files can still be checked offline with `inv infra.check`.",
    ]
    assert [c["args"] for c in stand_in.calls()] == [["info"]]


def test_images_with_the_engines_of_this_machine() -> None:
    """On this machine's PATH, `inv images` exits 3 with the no-engine message exactly when
    neither `docker info` nor `podman info` succeeds; otherwise it tries to build."""
    usable = [
        engine
        for engine in ("docker", "podman")
        if shutil.which(engine)
        and subprocess.run([engine, "info"], capture_output=True, check=False).returncode == 0
    ]
    result = subprocess.run([str(INV), "images"], cwd=ROOT, capture_output=True, text=True,
                            check=False)  # fmt: skip
    if not usable:
        assert result.returncode == 3
        assert "no container engine can build images on this machine" in result.stderr
        if shutil.which("docker"):
            assert "docker: CLI found but `docker info` failed" in result.stderr
    else:
        assert result.returncode != 3
        assert f"with {usable[0]}" in result.stdout


def test_images_builds_tags_and_pushes_every_target(stand_in: StandIn) -> None:
    """With an engine, every target is built from images/Dockerfile, tagged REGISTRY/target:TAG
    with the commit as a label, and pushed."""
    result = stand_in.run("images", "--tag", "t1", "--push", "registry.example.net/dcy/")
    assert result.returncode == 0, result.stderr
    calls = [c["args"] for c in stand_in.calls()]
    assert calls[0] == ["info"]
    expected: list[list[str]] = []
    for target in TARGETS:
        image = f"registry.example.net/dcy/{target}:t1"
        expected.append([
            "build", "--file", str(ROOT / "images" / "Dockerfile"), "--target", target,
            "--tag", image, "--label", f"org.opencontainers.image.revision={_commit()}",
            str(ROOT),
        ])  # fmt: skip
        expected.append(["push", image])
    assert calls[1:] == expected
    assert result.stdout.strip().splitlines()[-1] == "built: " + " ".join(
        f"registry.example.net/dcy/{t}:t1" for t in TARGETS
    )


def test_images_are_tagged_with_the_git_commit_by_default(stand_in: StandIn) -> None:
    """Without --tag, images are named dcy/<target> and tagged with the current commit."""
    result = stand_in.run("images")
    assert result.returncode == 0, result.stderr
    tags = [c["args"][c["args"].index("--tag") + 1] for c in stand_in.calls()[1:]]
    assert tags == [f"dcy/{t}:{default_tag()}" for t in TARGETS]
    assert default_tag().split("-")[0] == _commit()


def test_a_failed_build_fails_the_task_after_building_the_rest(stand_in: StandIn) -> None:
    """A target that fails to build is named, the others are still built, and the exit is 1."""
    result = stand_in.run("images", "--tag", "t1", STANDIN_FAIL_TARGET="worker")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "inv images: docker failed: build of worker "
        "(built: dcy/sensor:t1, dcy/app:t1, dcy/renderer:t1)"
    )


def test_default_tag_is_dirty_only_for_uncommitted_build_inputs(tmp_path: Path) -> None:
    """The tag is the commit; `-dirty` is added when an image input has uncommitted changes,
    not when an unrelated file does."""
    git = ["git", "-c", "user.email=t@example.net", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q", str(tmp_path)], check=True)
    for name in BUILD_INPUTS:
        path = tmp_path / name / "x" if "." not in name else tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("1\n")
    (tmp_path / "notes.txt").write_text("1\n")
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "one"], cwd=tmp_path, check=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], cwd=tmp_path, capture_output=True, text=True,
        check=True,
    ).stdout.strip()  # fmt: skip
    (tmp_path / "notes.txt").write_text("2\n")
    assert default_tag(tmp_path) == commit
    (tmp_path / "svc" / "x").write_text("2\n")
    assert default_tag(tmp_path) == f"{commit}-dirty"


# --- inv deploy ------------------------------------------------------------------------------


def _up_line(program: list[str]) -> list[str]:
    compose_file = ROOT / "datacenters" / "dc1" / "h1" / "docker-compose.yml"
    return [*program, "--project-name", "dcy", "--file", str(compose_file), "up", "--detach",
            "--remove-orphans"]  # fmt: skip


def test_deploy_dry_run_prints_exactly_what_it_would_run(stand_in: StandIn) -> None:
    """--dry-run prints the one command line, with DOCKER_HOST from the inventory and the tag,
    and runs nothing but the probe for `docker compose`."""
    result = stand_in.run("deploy", "--dc", "dc1", "--host", "h1", "--tag", "t1", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "DOCKER_HOST=ssh://deploy@h1.dc1.example.net DCY_TAG=t1 " + " ".join(_up_line(["docker",
                                                                                    "compose"]))
    ]  # fmt: skip
    assert [c["args"] for c in stand_in.calls()] == [["compose", "version"]]


def test_deploy_runs_compose_against_the_host_over_ssh(stand_in: StandIn) -> None:
    """Without --dry-run, `docker compose ... up` runs with DOCKER_HOST=ssh://... and DCY_TAG."""
    result = stand_in.run("deploy", "--dc", "dc1", "--host", "h1", "--tag", "t1")
    assert result.returncode == 0, result.stderr
    up = stand_in.calls()[-1]
    assert [up["program"], *up["args"]] == _up_line(["docker", "compose"])
    assert (up["DOCKER_HOST"], up["DCY_TAG"]) == ("ssh://deploy@h1.dc1.example.net", "t1")


def test_deploy_passes_the_compose_exit_status_on(stand_in: StandIn) -> None:
    """A failing `compose up` fails the task with the same status and says which program."""
    result = stand_in.run("deploy", "--dc", "dc1", "--host", "h1", "--tag", "t1",
                          STANDIN_UP_EXIT="7")  # fmt: skip
    assert result.returncode == 7
    assert "deploy: docker exited 7" in result.stderr


def test_deploy_falls_back_to_docker_compose_v1(stand_in: StandIn) -> None:
    """Without the compose plugin, Debian's docker-compose runs the same deploy."""
    stand_in.add("docker-compose")
    result = stand_in.run("deploy", "--dc", "dc1", "--host", "h1", "--tag", "t1",
                          STANDIN_COMPOSE_EXIT="1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    up = stand_in.calls()[-1]
    assert [up["program"], *up["args"]] == _up_line(["docker-compose"])
    assert up["DOCKER_HOST"] == "ssh://deploy@h1.dc1.example.net"


def test_deploy_to_an_unknown_host_names_the_known_ones(stand_in: StandIn) -> None:
    """A host that is not in the inventory fails with the hosts that are."""
    result = stand_in.run("deploy", "--dc", "dc1", "--host", "h9", "--dry-run")
    assert result.returncode == 1
    assert "no host 'h9' in datacenter 'dc1' (known: h1, h2, h3)" in result.stderr


def test_deploy_refuses_a_file_that_drifted_from_the_inventory(tmp_path: Path) -> None:
    """A hand-edited host file is not deployed: render, review and commit first."""
    inventory, pins = load_inventory(ROOT / "datacenters" / "inventory.yml"), read_pins()
    write_rendered(render_all(inventory, pins), tmp_path)
    plan = plan_deploy(inventory, pins, "dc2", "h3", "t1", ["docker", "compose"], tmp_path)
    assert plan.env == {"DOCKER_HOST": "ssh://deploy@h3.dc2.example.net", "DCY_TAG": "t1"}
    path = tmp_path / "dc2" / "h3" / "docker-compose.yml"
    path.write_text(path.read_text() + "# local tweak\n")
    with pytest.raises(DeployError, match="differs from what the inventory renders: run `inv"):
        plan_deploy(inventory, pins, "dc2", "h3", "t1", ["docker", "compose"], tmp_path)
