"""``scd embed`` with its defaults: batches packed by atoms and edges, the model read from the checkpoint,
bounded memory on a dataset holding a 3,341-atom protein."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scd_train.budget import Budget, budget_batches
from scd_train.checkpoint import Checkpointer
from scd_train.objectives import ObjectiveConfig, build_objective
from scd_train.optim import OptimConfig, build_optimizer
from shards.format.manifest import write_dataset
from shards.format.schema import AtomGraph

MODEL = {"kind": "scd", "backbone": "et", "hidden": 32, "layers": 1, "heads": 4, "num_rbf": 8}


def _checkpoint(run_dir: Path) -> Path:
    """A real training checkpoint (weights, optimizer, state.json with the model config) at step 0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        obj = build_objective(ObjectiveConfig(**{k: v for k, v in MODEL.items()}))
    opt, sched = build_optimizer(obj, OptimConfig(), 10)
    path = Checkpointer(run_dir, {"model": obj, "optimizer": opt, "scheduler": sched}).save(0, {"model": MODEL})
    assert path is not None
    return path


def _rotated(g: AtomGraph, i: int) -> AtomGraph:
    """A copy of ``g`` under a seeded random rotation, with its own key."""
    q, _ = np.linalg.qr(np.random.default_rng(i).standard_normal((3, 3)))
    return dataclasses.replace(g, key=f"{g.key}-r{i}", index=i, positions=(g.positions @ q.T).astype(np.float32))


@pytest.fixture(scope="module")
def protein_set(real_graphs, tmp_path_factory) -> tuple[Path, Path]:
    """(run folder with a checkpoint, dataset): six copies of adk_open.pdb (3,341 atoms) and 20 g2 molecules."""
    root = tmp_path_factory.mktemp("embed")
    adk = next(g for g in real_graphs if g.n_atoms > 3000)
    mols = [g for g in real_graphs if g.domain == "molecule" and g.n_atoms > 1][:20]
    write_dataset([*mols[:10], *(_rotated(adk, i) for i in range(6)), *mols[10:]], str(root / "ds"))
    _checkpoint(root / "run")
    return root / "run", root / "ds"


def test_budget_batches_cover_in_order_and_respect_the_budget() -> None:
    rng = np.random.default_rng(3)
    sizes = [(int(a), int(e)) for a, e in zip(rng.integers(1, 400, 300), rng.integers(0, 9000, 300), strict=True)]
    sizes[17] = (5000, 10)  # over the atom budget alone
    sizes[90] = (10, 90_000)  # over the edge budget alone
    items = [{"n_atoms": a, "edge_index": np.zeros((2, e), np.int64), "i": i} for i, (a, e) in enumerate(sizes)]
    budget = Budget(max_atoms=1000, max_edges=20_000, max_graphs=6)
    batches = list(budget_batches(items, budget))
    assert [it["i"] for b in batches for it in b] == list(range(len(items)))  # every item once, in order
    for b, nxt in zip(batches, [*batches[1:], None], strict=True):
        atoms, edges = sum(sizes[it["i"]][0] for it in b), sum(sizes[it["i"]][1] for it in b)
        assert len(b) <= 6
        assert len(b) == 1 or (atoms <= 1000 and edges <= 20_000)
        if nxt is not None:  # greedy: the next item would not have fitted
            a, e = sizes[nxt[0]["i"]]
            assert len(b) == 6 or atoms + a > 1000 or edges + e > 20_000
    assert [it["i"] for it in next(b for b in batches if b[0]["i"] == 17)] == [17]
    assert [it["i"] for it in next(b for b in batches if b[0]["i"] == 90)] == [90]


def test_embedding_does_not_depend_on_the_budget(real_graphs, tmp_path) -> None:
    from scd_train.embed import embed_graphs, load_objective

    mols = [g for g in real_graphs if g.domain != "protein" and g.n_atoms > 1][:16]
    objective, cfg = load_objective(_checkpoint(tmp_path / "run").parent)
    assert cfg.hidden == MODEL["hidden"] and cfg.layers == MODEL["layers"]  # read from the checkpoint
    one = embed_graphs(objective, mols, budget=Budget(max_atoms=1), progress=False)  # one structure per batch
    big = embed_graphs(objective, iter(mols), progress=False)
    assert one.shape == (16, MODEL["hidden"]) and np.isfinite(one).all()
    np.testing.assert_allclose(big, one, rtol=1e-4, atol=1e-5)


_CAPPED = """
import resource, sys
import safetensors.torch, torch, scd_train.embed, scd_train.finetune, shards.tools.cli, shards.format.reader
data = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmData:")) * 1024
cap = data + int(sys.argv[1]) * 2**20  # the imports' own data plus a fixed allowance
resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
sys.exit(shards.tools.cli.main(sys.argv[2:]))
"""


def _capped_embed(allowance_mb: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CAPPED, str(allowance_mb), "embed", *args],
                          capture_output=True, text=True, timeout=600, env={**_env(), "SCD_PROGRESS_EVERY": "0"})


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmData from /proc (Linux)")
def test_embed_defaults_under_a_memory_cap(protein_set, tmp_path) -> None:
    run, ds = protein_set
    # MB over the imported libraries (VmData moves by tens of MB between runs: thread arenas). Measured with the
    # fused ET kernel: the defaults need 200-300 (one protein per batch); all 26 structures in one batch, with three
    # copies of the protein, 300-500, so the dataset holds six
    allowance = 450
    ok = _capped_embed(allowance, str(run), str(ds), "--out", str(tmp_path / "e"))
    assert ok.returncode == 0, ok.stderr[-2000:]
    emb = np.load(tmp_path / "e.npy")
    keys = (tmp_path / "e.keys.txt").read_text().split()
    assert emb.shape == (26, MODEL["hidden"]) and np.isfinite(emb).all()
    manifest_keys = [k for name in sorted(ds.glob("*.idx.json")) for k in json.loads(name.read_text())["key"]]
    assert sorted(keys) == sorted(manifest_keys)
    assert "embed: 26/26 structure" in ok.stderr  # plain progress lines (not a terminal)
    # the control: the old behaviour (one batch of every structure) does not fit under the same cap
    old = _capped_embed(allowance, str(run), str(ds), "--out", str(tmp_path / "old"),
                        "--max-atoms", "1000000000", "--max-edges", "1000000000", "--batch-size", "64")
    assert old.returncode != 0 and "allocate" in old.stderr, old.stderr[-2000:]
