"""Helpers shared by the infra tests: the infra/ folder and an extractor of every ``scd ...`` / ``torchrun ...``
command its launch files (YAML, shell, Dockerfile, Markdown) run."""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

INFRA = Path(__file__).resolve().parents[1] / "infra"
SHELLS = ("sh", "bash", "/bin/sh", "/bin/bash")
_PUNCT = ";&|()`"
_REDIRECT = re.compile(r"(?<![\w$])\d*(>>?|<)&?\s*[^\s;&|]+")


@dataclass(frozen=True)
class Command:
    """One ``scd`` or ``torchrun`` invocation found in an infra file."""

    where: str
    argv: tuple[str, ...]


def _simple_commands(script: str) -> list[list[str]]:
    """Split a shell script into simple commands (words between separators), comments removed."""
    out: list[list[str]] = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(_REDIRECT.sub(" ", line), posix=True, punctuation_chars=_PUNCT)
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError:
            tokens = line.split()
        cur: list[str] = []
        for tok in tokens:
            if set(tok) <= set(_PUNCT):
                out.append(cur)
                cur = []
            else:
                cur.append(tok)
        out.append(cur)
    return [c for c in out if c]


def _from_argv(argv: list[str], where: str) -> list[Command]:
    """Invocations in one simple command: ``scd``/``torchrun`` anywhere in it, ``sh -c`` scripts recursed."""
    found: list[Command] = []
    if len(argv) >= 3 and Path(argv[0]).name in [Path(s).name for s in SHELLS] and argv[1] == "-c":
        return from_script(argv[2], where)
    for i, word in enumerate(argv):
        name = Path(word).name
        if name == "torchrun" or (name == "scd" and _runs_next(argv[:i])):
            return found + [Command(where, (name, *argv[i + 1:]))]
        if " " in word:
            found += from_script(word, where)
    return found


def _runs_next(before: list[str]) -> bool:
    """Whether the word after ``before`` is run as a command: the first word after variable assignments, or
    the command of ``--``/``exec``/``env`` (``ray job submit -- scd ...``), not an argument (``useradd ... scd``)."""
    words = [w for w in before if not re.match(r"^[A-Za-z_]\w*=", w)]
    return not words or words[-1] in ("--", "exec", "env", "nohup")


def from_script(script: str, where: str) -> list[Command]:
    return [c for argv in _simple_commands(script) for c in _from_argv(argv, where)]


def walk_yaml(node: Any, where: str) -> list[Command]:
    found: list[Command] = []
    if isinstance(node, dict):
        cmd = node.get("command")
        if isinstance(cmd, list) and all(isinstance(x, str) for x in cmd):
            found += _from_argv([*cmd, *node.get("args", [])], where)
        for key, value in node.items():
            if not (key in ("command", "args") and isinstance(cmd, list)):
                found += walk_yaml(value, where)
    elif isinstance(node, list):
        for item in node:
            found += walk_yaml(item, where)
    elif isinstance(node, str):
        found += from_script(node, where)
    return found


def _dockerfile_commands(path: Path) -> list[Command]:
    text = path.read_text().replace("\\\n", " ")
    found: list[Command] = []
    entry: list[str] = []
    for line in text.splitlines():
        m = re.match(r"^\s*(RUN|CMD|ENTRYPOINT)\s+(.*)$", line)
        if not m:
            continue
        instr, rest = m.groups()
        argv = json.loads(rest) if rest.lstrip().startswith("[") else None
        if instr == "RUN":
            found += _from_argv(argv, path.name) if argv else from_script(rest, path.name)
        elif instr == "ENTRYPOINT":
            entry = argv or shlex.split(rest)
        else:
            found += _from_argv([*entry, *(argv or shlex.split(rest))], f"{path.name} ENTRYPOINT+CMD")
    return found


def commands_in(path: Path) -> list[Command]:
    """Every ``scd``/``torchrun`` invocation in one infra file."""
    rel = str(path.relative_to(INFRA))
    if path.suffix == ".yaml":
        return [c for doc in yaml.safe_load_all(path.read_text()) for c in walk_yaml(doc, rel)]
    if path.name == "Dockerfile":
        return _dockerfile_commands(path)
    if path.suffix == ".md":
        blocks = re.findall(r"```bash\n(.*?)```", path.read_text(), re.S)
        return [c for b in blocks for c in from_script(b, rel)]
    return from_script(path.read_text(), rel)
