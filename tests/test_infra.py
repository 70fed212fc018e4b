"""The launch configs in infra/ parse, name the example configs, and every ``scd ...`` / ``torchrun -m
scd_train ...`` command they run is accepted by the real argument parsers. Nothing is built or fetched."""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[1] / "infra"
YAMLS = sorted(p for p in INFRA.rglob("*.yaml"))
LAUNCHERS = ("ray/cluster.yaml", "k8s/rayjob-ingest.yaml", "k8s/pytorchjob-pretrain.yaml",
             "slurm/pretrain.sbatch", "docker/Dockerfile", "README.md")
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
        return _from_script(argv[2], where)
    for i, word in enumerate(argv):
        name = Path(word).name
        if name in ("scd", "torchrun"):
            return found + [Command(where, (name, *argv[i + 1:]))]
        if " " in word:
            found += _from_script(word, where)
    return found


def _from_script(script: str, where: str) -> list[Command]:
    return [c for argv in _simple_commands(script) for c in _from_argv(argv, where)]


def _walk_yaml(node: Any, where: str) -> list[Command]:
    found: list[Command] = []
    if isinstance(node, dict):
        cmd = node.get("command")
        if isinstance(cmd, list) and all(isinstance(x, str) for x in cmd):
            found += _from_argv([*cmd, *node.get("args", [])], where)
        for key, value in node.items():
            if not (key in ("command", "args") and isinstance(cmd, list)):
                found += _walk_yaml(value, where)
    elif isinstance(node, list):
        for item in node:
            found += _walk_yaml(item, where)
    elif isinstance(node, str):
        found += _from_script(node, where)
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
            found += _from_argv(argv, path.name) if argv else _from_script(rest, path.name)
        elif instr == "ENTRYPOINT":
            entry = argv or shlex.split(rest)
        else:
            found += _from_argv([*entry, *(argv or shlex.split(rest))], f"{path.name} ENTRYPOINT+CMD")
    return found


def commands_in(path: Path) -> list[Command]:
    """Every ``scd``/``torchrun`` invocation in one infra file."""
    rel = str(path.relative_to(INFRA))
    if path.suffix == ".yaml":
        return [c for doc in yaml.safe_load_all(path.read_text()) for c in _walk_yaml(doc, rel)]
    if path.name == "Dockerfile":
        return _dockerfile_commands(path)
    if path.suffix == ".md":
        blocks = re.findall(r"```bash\n(.*?)```", path.read_text(), re.S)
        return [c for b in blocks for c in _from_script(b, rel)]
    return _from_script(path.read_text(), rel)


def _scd_parser() -> Any:
    from shards.cli import build_parser

    return build_parser()


class _Unregistered(Exception):
    """A command group the checkout does not register yet (ingest/train are added by other modules)."""


def _check_scd(argv: tuple[str, ...], where: str) -> None:
    parser = _scd_parser()
    groups = set(parser._subparsers._group_actions[0].choices)  # noqa: SLF001 - argparse has no public API
    if argv and argv[0] not in groups and not argv[0].startswith("-"):
        raise _Unregistered(f"{where}: command group `scd {argv[0]}` is not registered in this checkout yet")
    try:
        parser.parse_args(list(argv))
    except SystemExit as exc:
        assert exc.code == 0, f"{where}: `scd {shlex.join(argv)}` is rejected by the scd parser"


def _check_torchrun(argv: tuple[str, ...], where: str) -> None:
    from torch.distributed.run import get_args_parser

    try:
        args = get_args_parser().parse_args(list(argv))
    except SystemExit:
        pytest.fail(f"{where}: `torchrun {shlex.join(argv)}` has flags torchrun does not accept")
    assert args.module and args.training_script == "scd_train", f"{where}: torchrun must run -m scd_train"
    _check_scd(tuple(args.training_script_args), where)


def test_every_infra_yaml_parses():
    assert {str(p.relative_to(INFRA)) for p in YAMLS} >= {"ray/cluster.yaml", "k8s/rayjob-ingest.yaml",
                                                         "k8s/pytorchjob-pretrain.yaml", "configs/ingest.yaml",
                                                         "configs/pretrain.yaml"}
    for path in YAMLS:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_extractor_finds_commands_in_all_forms():
    script = 'set -e\nhead=$(scontrol show hostnames "$X" | head -n 1)  # scd nope\nsrun -N1 \\\n  torchrun ' \
             '--nnodes 2 -m scd_train train "$CONFIG" && echo done; bash -c "scd shards verify /d"\n'
    got = [c.argv for c in _from_script(script, "t")]
    assert got == [("torchrun", "--nnodes", "2", "-m", "scd_train", "train", "$CONFIG"),
                   ("scd", "shards", "verify", "/d")]
    pod = {"containers": [{"command": ["scd"], "args": ["ingest", "run", "/c.yaml"]}]}
    assert [c.argv for c in _walk_yaml(pod, "p")] == [("scd", "ingest", "run", "/c.yaml")]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_commands_are_valid(name):
    commands = commands_in(INFRA / name)
    assert commands, f"{name}: runs no scd or torchrun command"
    unregistered = []
    for c in commands:
        try:
            if c.argv[0] == "torchrun":
                _check_torchrun(c.argv[1:], c.where)
            else:
                _check_scd(c.argv[1:], c.where)
        except _Unregistered as exc:
            unregistered.append(str(exc))
    if unregistered:
        pytest.skip("; ".join(unregistered) + " (every other command in the file was checked)")


def test_launchers_name_the_example_configs():
    expected = {"ray/cluster.yaml": "infra/configs/ingest.yaml", "k8s/rayjob-ingest.yaml": "/config/ingest.yaml",
                "slurm/pretrain.sbatch": "infra/configs/pretrain.yaml",
                "k8s/pytorchjob-pretrain.yaml": "/config/pretrain.yaml"}
    for name, cfg in expected.items():
        assert cfg in (INFRA / name).read_text(), f"{name} should name {cfg}"
    for name in ("k8s/rayjob-ingest.yaml", "k8s/pytorchjob-pretrain.yaml"):
        text = (INFRA / name).read_text()
        assert f"infra/configs/{Path(expected[name]).name}" in text, f"{name}: document the ConfigMap source"


def test_slurm_rendezvous_on_first_node_and_preemption():
    cmds = [c.argv for c in commands_in(INFRA / "slurm/pretrain.sbatch")]
    (tr,) = [c for c in cmds if c[0] == "torchrun"]
    args = __import__("torch.distributed.run", fromlist=["get_args_parser"]).get_args_parser().parse_args(list(tr[1:]))
    assert args.rdzv_backend == "c10d" and args.rdzv_endpoint == "$head:$port" and args.rdzv_id == "$SLURM_JOB_ID"
    assert args.nnodes == "$SLURM_NNODES" and args.nproc_per_node == "$GPUS"
    assert "SIGUSR1" in args.signals_to_handle.split(",") and "SIGTERM" in args.signals_to_handle.split(",")
    text = (INFRA / "slurm/pretrain.sbatch").read_text()
    assert re.search(r"^srun .*\\\n\s+torchrun", text, re.M) and "scontrol show hostnames" in text
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    assert directives["signal"].startswith("B:USR1@") and "requeue" in directives
    assert directives["open-mode"] == "append"
    assert re.search(r"^port=\$\(\(.*SLURM_JOB_ID", text, re.M), "the rendezvous port comes from the job id"
    assert re.search(r"^export SRUN_CPUS_PER_TASK=\$SLURM_CPUS_PER_TASK", text, re.M)
    assert re.search(r"^GPUS=\$\{SLURM_GPUS_ON_NODE", text, re.M), "GPUs per node from the allocation"
    assert "scontrol requeue" in text and re.search(r"^trap .*USR1", text, re.M)


def test_example_configs_load_into_the_real_config_classes():
    from ingest.job import JobConfig
    from scd_train.config import TrainConfig
    from shards.config import load_yaml

    j = load_yaml(JobConfig, INFRA / "configs/ingest.yaml")
    t = load_yaml(TrainConfig, INFRA / "configs/pretrain.yaml")
    assert j.sources and t.data.datasets and t.steps > 0


def test_rayjob_entrypoint_and_config_mount():
    (doc,) = yaml.safe_load_all((INFRA / "k8s/rayjob-ingest.yaml").read_text())
    assert doc["kind"] == "RayJob" and doc["spec"]["entrypoint"].startswith("scd ingest run /config/ingest.yaml")
    head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    vols = {v["name"]: v for v in head["volumes"]}
    assert "configMap" in vols[mounts["/config"]]
