"""The rules every image of images/Dockerfile follows, checked on the parse of the official
Dockerfile parser (BuildKit's, through the ``dockerfile`` package): no engine needed.

- every stage starts from ``python:3.11-slim-bookworm`` or from an earlier stage;
- wheels are built in a builder stage (``pip wheel``); the images install only wheels
  (``pip install --no-index --only-binary=:all:``) and never derive from the builder;
- each target runs as a non-root user, starts with an exec-form ENTRYPOINT (so SIGTERM reaches
  the program, not a shell), has an exec-form HEALTHCHECK and an exec-form CMD if any;
- no ADD of URLs (unpinned downloads), no COPY --from a stage that comes later.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

BASE_IMAGE = "python:3.11-slim-bookworm"
ROOT_USERS = ("root", "0")


@dataclass(frozen=True, slots=True)
class Instruction:
    cmd: str  # upper case: FROM, RUN, ...
    flags: tuple[str, ...]
    value: tuple[str, ...]
    exec_form: bool
    line: int


@dataclass(slots=True)
class Stage:
    name: str
    base: str  # an image or the name of an earlier stage
    line: int
    instructions: list[Instruction] = field(default_factory=list)


def parse_stages(path: Path) -> list[Stage]:
    import dockerfile  # the official parser; a dev dependency

    stages: list[Stage] = []
    for command in dockerfile.parse_file(str(path)):
        item = Instruction(
            command.cmd.upper(),
            tuple(command.flags),
            tuple(command.value),
            bool(command.json),
            command.start_line,
        )
        if item.cmd == "FROM":
            value = item.value
            name = value[2] if len(value) >= 3 and value[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=value[0], line=item.line))
        elif stages:
            stages[-1].instructions.append(item)
    return stages


def chain(stages: Sequence[Stage], target: str) -> list[Stage]:
    """``target`` and the stages it derives from, base first."""
    by_name = {s.name: s for s in stages}
    result: list[Stage] = []
    stage = by_name.get(target)
    while stage is not None:
        result.insert(0, stage)
        stage = by_name.get(stage.base)
    return result


def effective(stages: Sequence[Stage], target: str, cmd: str) -> Instruction | None:
    """The instruction of kind ``cmd`` that is in force in ``target`` (the last one inherited)."""
    found = None
    for stage in chain(stages, target):
        for item in stage.instructions:
            if item.cmd == cmd:
                found = item
    return found


def check_dockerfile(path: Path, targets: Sequence[str]) -> list[str]:
    """Every rule broken, as "line N: problem"; empty when the Dockerfile is fine."""
    stages = parse_stages(path)
    problems: list[str] = []
    seen: list[str] = []
    for stage in stages:
        if stage.base not in seen and stage.base != BASE_IMAGE:
            problems.append(
                f"line {stage.line}: stage {stage.name} starts from {stage.base}, "
                f"neither {BASE_IMAGE} nor an earlier stage"
            )
        for item in stage.instructions:
            problems += _instruction_problems(item, seen)
        seen.append(stage.name)
    builders = [s.name for s in stages if any(_runs(i, "pip wheel") for i in s.instructions)]
    if not builders:
        problems.append("no stage builds wheels with `pip wheel`")
    for target in targets:
        problems += _target_problems(stages, target, builders)
    return problems


def _instruction_problems(item: Instruction, earlier: Sequence[str]) -> list[str]:
    problems = []
    if item.cmd == "ADD" and any("://" in v or v.startswith("git@") for v in item.value[:-1]):
        problems.append(f"line {item.line}: ADD of a URL; download in a RUN step with a checksum")
    for flag in item.flags:
        if item.cmd in ("COPY", "RUN") and "from=" in flag:
            source = flag.split("from=", 1)[1].split(",", 1)[0]
            if source not in earlier:
                problems.append(
                    f"line {item.line}: {item.cmd} from {source!r}, not an earlier stage"
                )
    return problems


def _target_problems(stages: Sequence[Stage], target: str, builders: Sequence[str]) -> list[str]:
    names = [s.name for s in chain(stages, target)]
    if target not in names:
        return [f"no target {target!r}"]
    problems = []
    if set(names) & set(builders):
        problems.append(f"{target}: derives from the builder stage; copy only its wheels")
    installs = [i for s in chain(stages, target) for i in s.instructions if _runs(i, "pip install")]
    for item in installs:
        text = " ".join(item.value)
        if "--no-index" not in text or "--only-binary=:all:" not in text:
            problems.append(
                f"line {item.line}: {target} installs with pip from somewhere "
                "other than the builder's wheels (--no-index --only-binary=:all:)"
            )
    if not installs:
        problems.append(f"{target}: installs nothing with pip")
    user = effective(stages, target, "USER")
    if user is None or user.value[0].split(":")[0] in ROOT_USERS:
        problems.append(f"{target}: runs as root; set a non-root USER")
    entrypoint = effective(stages, target, "ENTRYPOINT")
    if entrypoint is None or not entrypoint.exec_form:
        problems.append(f'{target}: needs an exec-form ENTRYPOINT ["program", ...]')
    cmd = effective(stages, target, "CMD")
    if cmd is not None and not cmd.exec_form:
        problems.append(f"line {cmd.line}: {target}: CMD in shell form")
    health = effective(stages, target, "HEALTHCHECK")
    if health is None or not health.exec_form or health.value[:1] != ("CMD",):
        problems.append(f"{target}: needs an exec-form HEALTHCHECK CMD [...]")
    return problems


def _runs(item: Instruction, words: str) -> bool:
    return item.cmd == "RUN" and words in " ".join(item.value)
