"""Readers for the files under deploy/: Dockerfiles, the compose file, Kubernetes manifests.

No container engine or cluster is needed: the tests read these files and check what a
deployment depends on (the commands they run, ports, volumes, users). The central piece is
:func:`fedlora_commands`, which finds every ``fedlora`` command line a deployment file
runs, including those inside ``sh -c`` scripts, so that fedlora's real argument parser can
check it.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKER = DEPLOY / "docker"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"

#: Image name (without tag) → the Dockerfile that builds it.
IMAGES = {
    "fedlora-coordinator": DOCKER / "Dockerfile.coordinator",
    "fedlora-device": DOCKER / "Dockerfile.device",
}
SHELLS = {"sh", "bash", "/bin/sh", "/bin/bash", "/usr/bin/env sh"}

# ---------------------------------------------------------------- Dockerfiles

DOCKERFILE_INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK",
    "LABEL", "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME",
    "WORKDIR",
}  # fmt: skip


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Dockerfile:
    path: Path
    instructions: list[Instruction]
    stages: list[list[Instruction]] = field(default_factory=list)

    @property
    def final(self) -> list[Instruction]:
        return self.stages[-1]

    def all(self, keyword: str, stage: list[Instruction] | None = None) -> list[Instruction]:
        return [i for i in (stage or self.instructions) if i.keyword == keyword]

    def exec_form(self, keyword: str) -> list[str] | None:
        """The final stage's last ENTRYPOINT or CMD as a JSON list, None if absent."""
        found = self.all(keyword, self.final)
        if not found:
            return None
        value = json.loads(found[-1].args)
        assert isinstance(value, list), f"{self.path.name}: {keyword} is not exec form"
        return [str(v) for v in value]

    def arg_defaults(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for ins in self.all("ARG"):
            name, _, default = ins.args.partition("=")
            if default:
                out[name.strip()] = default.strip().strip('"')
        return out

    def env(self, stage: list[Instruction] | None = None) -> dict[str, str]:
        out: dict[str, str] = {}
        for ins in self.all("ENV", stage or self.final):
            for token in shlex.split(ins.args):
                key, sep, value = token.partition("=")
                if sep:
                    out[key] = value
        return out

    def expand(self, text: str) -> str:
        """``${NAME}`` / ``$NAME`` replaced by ARG defaults (what a plain build uses)."""
        args = self.arg_defaults()
        return re.sub(
            r"\$\{(\w+)\}|\$(\w+)",
            lambda m: args.get(m.group(1) or m.group(2), m.group(0)),
            text,
        )

    def chowned_dirs(self) -> set[str]:
        """Absolute paths a final-stage RUN hands to the image's user with ``chown``."""
        dirs: set[str] = set()
        for ins in self.all("RUN", self.final):
            tokens = shlex.split(ins.args)
            for i, tok in enumerate(tokens):
                if tok != "chown":
                    continue
                for arg in tokens[i + 2 :]:  # skip the owner
                    if not arg.startswith("/"):
                        break
                    dirs.add(arg.rstrip("/"))
        return dirs


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions with continuation lines joined and comments dropped; split into stages."""
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, args = text.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, f"{path.name}: file ends inside a continued instruction"
    parsed = Dockerfile(path, instructions)
    for ins in instructions:
        if ins.keyword == "FROM":
            parsed.stages.append([])
        if parsed.stages:
            parsed.stages[-1].append(ins)
    return parsed


@cache
def dockerfile(image: str) -> Dockerfile:
    """The parsed Dockerfile of ``image`` (a name with or without a tag)."""
    return parse_dockerfile(IMAGES[image.split(":")[0].split("/")[-1]])


def dockerignore_patterns(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, regex) per line of a .dockerignore file."""
    patterns = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = pattern.strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((negate, re.compile(regex + "(?:/.*)?")))
    return patterns


def dockerignored(patterns: list[tuple[bool, re.Pattern[str]]], rel_path: str) -> bool:
    """Whether Docker leaves ``rel_path`` out of the build context (the last match wins)."""
    excluded = False
    for negate, regex in patterns:
        if regex.fullmatch(rel_path):
            excluded = not negate
    return excluded


# ---------------------------------------------------------------- YAML


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def k8s_dirs() -> list[Path]:
    """Every kustomization directory under deploy/k8s."""
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


def k8s_manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def load_k8s_objects() -> list[tuple[Path, dict[str, Any]]]:
    objects = []
    for path in k8s_manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                objects.append((path, doc))
    return objects


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The pod spec inside a workload object (None for objects without pods)."""
    spec = obj.get("spec") or {}
    if obj.get("kind") == "Pod":
        return spec
    if obj.get("kind") == "CronJob":
        return spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
    template = spec.get("template")
    return template.get("spec") if isinstance(template, dict) else None


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


# ---------------------------------------------------------------- commands


@dataclass(frozen=True)
class Launch:
    """One ``fedlora`` command line a deployment file runs."""

    where: str  # file and place, for messages
    argv: tuple[str, ...]  # after the word ``fedlora``
    mounts: tuple[str, ...] = ()  # volume mount targets of its container

    @property
    def subcommand(self) -> str:
        return self.argv[0] if self.argv else ""

    def has(self, flag: str) -> bool:
        return any(a == flag or a.startswith(flag + "=") for a in self.argv)

    def value(self, flag: str) -> str | None:
        for i, arg in enumerate(self.argv):
            if arg == flag and i + 1 < len(self.argv):
                return self.argv[i + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
        return None

    def __str__(self) -> str:
        return f"{self.where}: fedlora {shlex.join(self.argv)}"


_SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", ";;", "{", "}"}
_KEYWORDS = {"then", "do", "else", "elif", "if", "while", "until", "exec", "!", "time"}


def _shell_lines(script: str) -> Iterator[str]:
    yield from script.replace("\\\n", " ").splitlines()


def commands_in_tokens(tokens: list[str], subcommands: set[str]) -> Iterator[list[str]]:
    """Each ``fedlora SUBCOMMAND ...`` in a token list, cut at shell separators/redirections."""
    for i, tok in enumerate(tokens):
        if tok.rsplit("/", 1)[-1] != "fedlora" or i + 1 >= len(tokens):
            continue
        if tokens[i + 1] not in subcommands or (i and tokens[i - 1] in {"-n", "--namespace"}):
            continue
        argv: list[str] = []
        for arg in tokens[i + 1 :]:
            if arg in _SEPARATORS or re.fullmatch(r"[<>&|]+", arg):
                if argv and argv[-1].isdigit():  # the 2 of 2>&1
                    argv.pop()
                break
            argv.append(arg)
        yield argv


def commands_in_script(script: str, subcommands: set[str]) -> Iterator[list[str]]:
    """``fedlora`` commands in a POSIX shell script (one per command, pipelines split)."""
    for line in _shell_lines(script):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        try:
            tokens = list(lexer)
        except ValueError as exc:  # unbalanced quotes: a real syntax error in the script
            raise AssertionError(f"cannot split shell line {line!r}: {exc}") from None
        yield from commands_in_tokens(tokens, subcommands)


def _argv_commands(
    argv: list[str], where: str, mounts: tuple[str, ...], subcommands: set[str]
) -> Iterator[Launch]:
    """A container's full argv: fedlora itself, or a shell running a script."""
    if not argv:
        return
    if argv[0].rsplit("/", 1)[-1] == "fedlora":
        yield Launch(where, tuple(argv[1:]), mounts)
        return
    if argv[0] in SHELLS:
        for i, arg in enumerate(argv[1:], 1):
            if arg.startswith("-") and "c" in arg and i + 1 < len(argv):
                for cmd in commands_in_script(argv[i + 1], subcommands):
                    yield Launch(f"{where} (sh -c)", tuple(cmd), mounts)
                return


def _as_list(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def compose_commands(subcommands: set[str]) -> Iterator[Launch]:
    """What each compose service runs: its entrypoint/command, or its image's."""
    for name, svc in load_compose()["services"].items():
        image = dockerfile(svc["image"])
        entry = _as_list(svc.get("entrypoint"))
        command = _as_list(svc.get("command"))
        if entry is None:
            entry = image.exec_form("ENTRYPOINT") or []
            if command is None:
                command = image.exec_form("CMD") or []
        # Compose reads `$$` as a literal `$` (and would interpolate `$NAME` itself).
        argv = [a.replace("$$", "$") for a in entry + (command or [])]
        mounts = tuple(str(v).split(":")[1] for v in svc.get("volumes", []))
        yield from _argv_commands(argv, f"compose.yaml services.{name}", mounts, subcommands)


def k8s_commands(subcommands: set[str]) -> Iterator[Launch]:
    """What each container runs, with Kubernetes' command/args vs ENTRYPOINT/CMD rules."""
    for path, obj in load_k8s_objects():
        pod = pod_spec(obj)
        if pod is None:
            continue
        for c in containers(pod):
            image = dockerfile(c["image"])
            command, args = c.get("command"), c.get("args")
            if command is None:
                command = image.exec_form("ENTRYPOINT") or []
                if args is None:
                    args = image.exec_form("CMD") or []
            argv = [str(a) for a in command + (args or [])]
            mounts = tuple(m["mountPath"] for m in c.get("volumeMounts", []))
            where = (
                f"{path.relative_to(DEPLOY)} {obj['kind']}/{obj['metadata']['name']} {c['name']}"
            )
            yield from _argv_commands(argv, where, mounts, subcommands)


def dockerfile_commands(subcommands: set[str]) -> Iterator[Launch]:
    """What each image runs when nothing overrides its ENTRYPOINT and CMD."""
    for name in IMAGES:
        image = dockerfile(name)
        argv = (image.exec_form("ENTRYPOINT") or []) + (image.exec_form("CMD") or [])
        yield from _argv_commands(argv, f"{image.path.name} CMD", (), subcommands)


def script_commands(path: Path, subcommands: set[str]) -> Iterator[Launch]:
    for cmd in commands_in_script(path.read_text(), subcommands):
        yield Launch(str(path.relative_to(DEPLOY)), tuple(cmd))


def readme_commands(path: Path, subcommands: set[str]) -> Iterator[Launch]:
    """``fedlora`` commands in the shell code blocks of a Markdown file."""
    blocks = re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", path.read_text(), re.S)
    for block in blocks:
        script = "\n".join(re.sub(r"^\$ ", "", line) for line in block.splitlines())
        for cmd in commands_in_script(script, subcommands):
            yield Launch(str(path.relative_to(REPO)), tuple(cmd))


def inline_scripts() -> Iterator[tuple[str, str]]:
    """(where, script) for every ``sh -c`` script in compose and the manifests.

    Kubernetes expands ``$(POD_NAME)`` before the shell runs; it is replaced by an
    example value, as the kubelet would.
    """
    for name, svc in load_compose()["services"].items():
        entry = _as_list(svc.get("entrypoint")) or []
        if entry and entry[0] in SHELLS:
            script = (_as_list(svc.get("command")) or [""])[0] if svc.get("command") else entry[-1]
            yield f"compose.yaml services.{name}", script.replace("$$", "$")
    for path, obj in load_k8s_objects():
        pod = pod_spec(obj)
        for c in containers(pod or {}):
            argv = [*(c.get("command") or []), *(c.get("args") or [])]
            if argv and argv[0] in SHELLS:
                script = argv[-1].replace("$(POD_NAME)", "device-0")
                yield f"{path.relative_to(DEPLOY)} {c['name']}", script
