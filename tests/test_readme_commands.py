"""Every `scd ...` command in a fenced block of README.md and docs/*.md runs as written.

Each block's command lines run in order, with bash, in a fresh copy of a small workspace that holds
what the documents assume exists: `demo-out/shards`, `mix.yaml`, `pretrain.yaml` (the demo's
training config), `runs/pretrain-scd` (a checkpoint of the demo's model), `out/qm9` (labelled QM9 molecules),
`job.yaml`, `cifs/`, `mols.xyz`, `crystal.cif`, `finetune.yaml` (the document's own `# finetune.yaml` block)
and the datasets the `shards` examples name. Tiny inputs stand in for the real ones; the only changes
to a command line itself are in SUBSTITUTE, and the only commands not run are in SKIP, each with its reason.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:scd|torchrun|ray job submit)\b")

SKIP = {  # a command starting with KEY is not run, for the reason given
    "RAY_ADDRESS=head:6379 ": "needs a Ray cluster at head:6379 (the cluster path is tests/test_ingest_cluster.py)",
    "ray job submit ": "needs a running Ray cluster to submit to (tests/test_ingest_cluster.py submits to one)",
}
SUBSTITUTE = {  # text in a command -> replacement, with the reason
    "--nproc-per-node 8": ("--nproc-per-node 2", "two CPU processes stand in for eight GPUs"),
    "--out /data/ds": ("--out data/ds", "the output stays inside the test's folder"),
}
FRESH = {  # a command that is an alternative to the line above, not its continuation: runs in a fresh copy
    "torchrun --nproc-per-node 8 -m scd_train train pretrain.yaml": "the DDP form of the one-process line above "
                                                                    "(each form is tested from a fresh run)",
}
TINY_FINETUNE = {"split": {"train": 24, "val": 8, "test": 8, "seed": 0}, "epochs": 1, "patience": 1, "batch_size": 16}


@dataclasses.dataclass(frozen=True)
class Block:
    doc: Path
    line: int
    commands: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.doc.name}:{self.line}"


def _strip_comment(line: str) -> str:
    """The command without a trailing `# comment` (a `#` outside quotes after whitespace)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def doc_blocks(doc: Path) -> list[Block]:
    """The fenced blocks of ``doc`` with at least one command line (continuation lines joined)."""
    text = doc.read_text()
    out = []
    for m in re.finditer(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M):
        lines, cmds, i = m.group(1).split("\n"), [], 0
        while i < len(lines):
            line = lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1].rstrip() + " " + lines[i].strip()
            if COMMAND.match(line.strip()):
                cmds.append(_strip_comment(line.strip()))
            i += 1
        if cmds:
            out.append(Block(doc, text[:m.start()].count("\n") + 1, tuple(cmds)))
    return out


BLOCKS = [b for doc in DOCS for b in doc_blocks(doc)]


def _finetune_yaml(doc: Path) -> dict:
    """The document's own `# finetune.yaml` block, with the split and schedule shrunk (TINY_FINETUNE)."""
    for m in re.finditer(r"^```yaml\n(# finetune\.yaml\n.*?)^```", doc.read_text(), re.S | re.M):
        return {**yaml.safe_load(m.group(1)), **TINY_FINETUNE}
    return {}


@pytest.fixture(scope="module")
def workspace(real_graphs, tmp_path_factory) -> Path:
    """What the documents assume exists, tiny."""
    import ase.io

    from scd_train.config import load_train_config
    from scd_train.datakit import package_dir, qm9_csv
    from scd_train.demo import pretrain_config
    from scd_train.trainer import Trainer
    from shards.format.manifest import write_dataset
    from shards.format.qm9 import iter_qm9_csv
    from shards.tools.compact import compact

    ws = tmp_path_factory.mktemp("docs") / "ws"
    ws.mkdir()
    mols = [g for g in real_graphs if g.domain == "molecule" and g.n_atoms > 1]
    crystals = [g for g in real_graphs if g.domain == "crystal"]
    protein = [g for g in real_graphs if g.domain == "protein"]
    write_dataset([*mols[:30], *crystals, *protein], ws / "demo-out/shards")
    write_dataset(iter_qm9_csv(qm9_csv(1), 60), ws / "out/qm9")
    write_dataset(mols[30:50], ws / "out/molecules")
    write_dataset(protein, ws / "out/proteins")
    write_dataset(mols[50:60], ws / "out/ds2")
    write_dataset(crystals[:5], ws / "out/more")
    compact([str(ws / "out/molecules"), str(ws / "out/proteins")], ws / "out/all")
    (ws / "mix.yaml").write_text(yaml.safe_dump({"strategy": "temperature", "temperature": 2.0}))
    # the demo's training config, stopped after two steps (the schedule keeps its length)
    cfg = pretrain_config(Path("demo-out/shards"), Path("runs/pretrain"), 2000)
    cfg.update(stop_after=2, log_every=1, tensorboard=False)
    (ws / "pretrain.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    ckpt = pretrain_config(ws / "demo-out/shards", ws / "runs/pretrain-scd", 2)
    ckpt.update(stop_after=1, tensorboard=False, progress=False)
    (ws / "ckpt.yaml").write_text(yaml.safe_dump(ckpt))
    Trainer(load_train_config(ws / "ckpt.yaml")).fit()  # a checkpoint of the demo's model
    (ws / "cifs").mkdir()
    for cif in sorted((package_dir("ase") / "test/testdata/minerals").glob("cod_*.cif"))[:2]:
        shutil.copy(cif, ws / "cifs" / cif.name)
    shutil.copy(next(iter(sorted((ws / "cifs").iterdir()))), ws / "crystal.cif")
    ase.io.write(ws / "mols.xyz", [g.to_ase() for g in mols[:3]], format="extxyz")
    (ws / "job.yaml").write_text(yaml.safe_dump({"output": "out/ds", "sources": [
        {"source": "cod", "converter": "auto", "paths": ["cifs/*.cif"]},
        {"source": "mols", "converter": "xyz", "paths": ["mols.xyz"]}]}))
    return ws


def _env() -> dict[str, str]:
    with socket.socket() as s:  # torchrun's rendezvous port (PET_MASTER_PORT is its --master-port)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RANK", "WORLD_SIZE")}
    bindir = str(Path(sys.executable).parent)
    return {**env, "PATH": f"{bindir}{os.pathsep}{env.get('PATH', '')}", "OMP_NUM_THREADS": "1",
            "PET_MASTER_PORT": str(port)}


def _prepared(cmd: str) -> str:
    for old, (new, _why) in SUBSTITUTE.items():
        cmd = cmd.replace(old, new)
    return cmd


def test_every_documented_block_is_found_and_skips_are_used() -> None:
    cmds = [c for b in BLOCKS for c in b.commands]
    assert {d.name for d in (b.doc for b in BLOCKS)} >= {"README.md", "ingest.md", "downstream.md"}
    for key in (*SKIP, *FRESH):
        assert any(c.startswith(key) for c in cmds), f"stale entry: {key!r} matches no documented command"
    for old in SUBSTITUTE:
        assert any(old in c for c in cmds), f"stale substitution: {old!r}"
    assert any(c.startswith("scd shards preview") and "--state-in" in c for c in cmds)


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_documented_commands_run(block: Block, workspace: Path, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws)
    finetune = _finetune_yaml(block.doc)
    if finetune:
        (ws / "finetune.yaml").write_text(yaml.safe_dump(finetune, sort_keys=False))
    for cmd in block.commands:
        if any(cmd.startswith(key) for key in SKIP):
            continue
        cwd = ws
        if any(cmd.startswith(key) for key in FRESH):
            cwd = tmp_path / f"fresh-{len(list(tmp_path.glob('fresh-*')))}"
            shutil.copytree(workspace, cwd)
        res = subprocess.run(["bash", "-c", _prepared(cmd)], cwd=cwd, env=_env(), capture_output=True, text=True,
                             timeout=600, stdin=subprocess.DEVNULL)
        out = (res.stdout + res.stderr)[-3000:]
        assert res.returncode == 0, f"{block.id}: `{cmd}` failed (exit {res.returncode}):\n{out}"
        assert "Token authentication" not in out and "Traceback" not in out, f"{block.id}: `{cmd}`:\n{out}"
