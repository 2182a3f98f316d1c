"""``inv images``: build every target of images/Dockerfile with whichever engine can build,
tag it with the git commit, optionally push it (the CI builder of the original system)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tasks._dockerfile_rules import check_dockerfile
from tasks._engines import Probe, find_build_engine

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "images" / "Dockerfile"
TARGETS = ("sensor", "worker", "app", "renderer")
LOCAL_PREFIX = "dcy"  # image names without --push: dcy/sensor, dcy/worker, ...
# What goes into the images (images/Dockerfile's COPY lines): uncommitted changes there make
# the tag "<commit>-dirty", so a tag never claims a commit it was not built from.
BUILD_INPUTS = ("pyproject.toml", "README.md", "dcy", "svc", "templates", "images")

EXIT_BUILD_FAILED = 1
EXIT_NO_ENGINE = 3


class ImagesError(RuntimeError):
    """Nothing could be built; the message says why and what to do."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class BuildStep:
    target: str
    image: str  # name:tag
    argv: tuple[str, ...]  # the build command
    push: tuple[str, ...] | None  # the push command, when pushing


def git_commit(root: Path = ROOT) -> str:
    result = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise ImagesError(f"cannot tag with the git commit: {result.stderr.strip()}; pass --tag", 2)
    return result.stdout.strip()


def default_tag(root: Path = ROOT) -> str:
    """The git commit, with ``-dirty`` when the build inputs have uncommitted changes."""
    commit = git_commit(root)
    status = subprocess.run(
        ["git", "status", "--porcelain", "--", *BUILD_INPUTS],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    return f"{commit}-dirty" if status.stdout.strip() else commit


def plan_builds(
    engine: str, tag: str, commit: str, registry: str = "", root: Path = ROOT
) -> list[BuildStep]:
    prefix = registry.rstrip("/") if registry else LOCAL_PREFIX
    steps = []
    for target in TARGETS:
        image = f"{prefix}/{target}:{tag}"
        argv = (
            engine, "build",
            "--file", str(root / "images" / "Dockerfile"),
            "--target", target,
            "--tag", image,
            "--label", f"org.opencontainers.image.revision={commit}",
            str(root),
        )  # fmt: skip
        steps.append(BuildStep(target, image, argv, (engine, "push", image) if registry else None))
    return steps


def no_engine_message(probes: Sequence[Probe]) -> str:
    lines = ["inv images: no container engine can build images on this machine:"]
    lines += [f"  {p.engine}: {p.reason}" for p in probes]
    lines.append(
        "Start a Docker engine (or install podman) and run `inv images` again; "
        "the compose files can still be checked offline with `inv infra.check`."
    )
    return "\n".join(lines)


def build_images(
    tag: str = "",
    registry: str = "",
    root: Path = ROOT,
    run: Callable[[Sequence[str]], int] | None = None,
    say: Callable[[str], None] = print,
) -> list[str]:
    """Build (and push) every target; return the images made. Raises ImagesError with
    EXIT_NO_ENGINE when no engine can build, EXIT_BUILD_FAILED when a build or push failed
    (after trying every target)."""
    problems = check_dockerfile(root / "images" / "Dockerfile", TARGETS)
    if problems:
        raise ImagesError(
            "inv images: images/Dockerfile breaks the image rules:\n  " + "\n  ".join(problems),
            EXIT_BUILD_FAILED,
        )
    engine, probes = find_build_engine()
    if engine is None:
        raise ImagesError(no_engine_message(probes), EXIT_NO_ENGINE)
    for probe in probes[:-1]:
        say(f"{probe.engine}: {probe.reason}; using {engine}")
    commit = git_commit(root)
    tag = tag or default_tag(root)
    runner = run or _run
    built, failed = [], []
    for step in plan_builds(shutil.which(engine) or engine, tag, commit, registry, root):
        say(f"building {step.image} (target {step.target}) with {engine}")
        if runner(step.argv) != 0:
            failed.append(f"build of {step.target}")
            continue
        if step.push is not None:
            say(f"pushing {step.image}")
            if runner(step.push) != 0:
                failed.append(f"push of {step.image}")
                continue
        built.append(step.image)
    if failed:
        made = ", ".join(built) or "none"
        raise ImagesError(
            f"inv images: {engine} failed: {', '.join(failed)} (built: {made})", EXIT_BUILD_FAILED
        )
    return built


def _run(argv: Sequence[str]) -> int:
    sys.stdout.flush()
    return subprocess.run(list(argv), check=False).returncode
