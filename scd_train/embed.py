"""``scd embed``: per-structure embeddings (the pooled self-embedding c) and a ridge linear probe.

The embedding of a structure is ``c`` from one pass on its clean geometry (no noise, no rotation),
conditioned on the mask token, exactly as the first SCD pass computes it; outputs are deterministic.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from scd_train.data import to_torch
from scd_train.objectives import ObjectiveConfig, build_objective
from shards.collate import collate
from shards.config import from_dict
from shards.schema import AtomGraph
from shards.views import ViewConfig, make_views

__all__ = ["embed_graphs", "load_objective", "read_inputs", "ridge_cv"]

_PREFIX = "objective."


def load_objective(checkpoint: str | Path) -> tuple[torch.nn.Module, ObjectiveConfig]:
    """The objective (eval mode) of a pretraining checkpoint/run folder or a ``scd finetune`` output folder."""
    from scd_train.checkpoint import load_weights
    from scd_train.finetune import resolve_checkpoint

    p = Path(checkpoint)
    if (p / "result.json").is_file() and (p / "model.safetensors").is_file():
        model = json.loads((p / "result.json").read_text())["config"]["model"]
        tensors = {k[len(_PREFIX):]: v for k, v in load_file(str(p / "model.safetensors")).items()
                   if k.startswith(_PREFIX)}
        cfg = from_dict(ObjectiveConfig, model, "model")
        objective = build_objective(cfg)
        objective.load_state_dict(tensors)
        return objective.eval(), cfg
    ckpt = resolve_checkpoint(p)
    state = (ckpt if ckpt.is_dir() else ckpt.parent) / "state.json"
    if not state.is_file():
        raise ValueError(f"{ckpt}: no state.json next to the weights, so the model config is unknown")
    cfg = from_dict(ObjectiveConfig, json.loads(state.read_text())["config"]["model"], "model")
    objective = build_objective(cfg)
    load_weights(ckpt, objective)
    return objective.eval(), cfg


def read_inputs(inputs: list[str]) -> list[AtomGraph]:
    """A shard dataset folder, or structure files ASE reads (every frame; key ``<stem>-<frame>``)."""
    if len(inputs) == 1 and (Path(inputs[0]) / "manifest.json").is_file():
        from shards.reader import ShardDataset

        return list(ShardDataset(inputs[0]))
    import ase.io

    graphs = []
    for path in inputs:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: not a shard dataset (no manifest.json) nor a structure file")
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", Path(path).stem)
        for i, atoms in enumerate(ase.io.read(path, index=":")):
            domain = "crystal" if atoms.pbc.any() else "molecule"
            graphs.append(AtomGraph.from_ase(atoms, key=f"{stem}-{i}", domain=domain, source="files",
                                             source_file=str(path), index=i))
    if not graphs:
        raise ValueError(f"no structures in {inputs}")
    return graphs


@torch.no_grad()
def embed_graphs(objective: torch.nn.Module, graphs: list[AtomGraph], *, batch_size: int = 64,
                 device: str | torch.device = "cpu", progress: bool = True) -> np.ndarray:
    """float32 ``[G, F]``: the pooled embedding c of each graph, in order (one mask-token pass)."""
    from tqdm import tqdm

    device = torch.device(device)
    objective = objective.to(device).eval()
    vc = ViewConfig(noise=False, rotate=False, cutoff=objective.backbone.cfg.cutoff)
    out = []
    for i in tqdm(range(0, len(graphs), batch_size), desc="embed", unit="batch", disable=not progress):
        batch = collate([make_views(g, vc, 0, 0) for g in graphs[i:i + batch_size]])
        c, _, _ = objective.embed(to_torch(batch, device))
        out.append(c.float().cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def ridge_cv(x: np.ndarray, y: np.ndarray, *, alpha: float = 1.0, folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """k-fold CV of closed-form ridge regression on standardised features (fit on the training folds only)."""
    n = len(y)
    if n < folds or folds < 2:
        raise ValueError(f"linear probe needs at least {max(folds, 2)} labelled structures and folds >= 2, got {n}")
    parts = np.array_split(np.random.default_rng(seed).permutation(n), folds)
    errs = np.zeros(n)
    for k in range(folds):
        test = parts[k]
        train = np.concatenate([parts[j] for j in range(folds) if j != k])
        mu, sd = x[train].mean(0), x[train].std(0) + 1e-8
        xt = (x[train] - mu) / sd
        ym = y[train].mean()
        w = np.linalg.solve(xt.T @ xt + alpha * np.eye(x.shape[1]), xt.T @ (y[train] - ym))
        errs[test] = np.abs(((x[test] - mu) / sd) @ w + ym - y[test])
    return {"mae": float(errs.mean()), "folds": folds, "alpha": alpha, "n": n,
            "baseline_mae": float(np.abs(y - y.mean()).mean())}


def embed_command(args: argparse.Namespace) -> int:
    """``scd embed CHECKPOINT INPUT... --out FILE [--probe PROP]``."""
    from scd_train.finetune import select_device

    objective, _ = load_objective(args.checkpoint)
    graphs = read_inputs(list(args.inputs))
    emb = embed_graphs(objective, graphs, batch_size=args.batch_size, device=select_device(args.device))
    stem = Path(str(args.out).removesuffix(".npy"))
    stem.parent.mkdir(parents=True, exist_ok=True)
    np.save(f"{stem}.npy", emb)
    Path(f"{stem}.keys.txt").write_text("".join(g.key + "\n" for g in graphs))
    print(f"{emb.shape[0]} embeddings of width {emb.shape[1]} -> {stem}.npy, {stem}.keys.txt")
    if args.probe:
        has = [i for i, g in enumerate(graphs) if g.properties and args.probe in g.properties]
        if not has:
            raise ValueError(f"property {args.probe!r} is not in the inputs")
        y = np.array([graphs[i].properties[args.probe] for i in has])
        r = ridge_cv(emb[has].astype(np.float64), y, alpha=args.alpha, folds=args.folds)
        unit = (graphs[has[0]].property_units or {}).get(args.probe, "")
        print(f"linear probe {args.probe}: {r['folds']}-fold CV MAE {r['mae']:.4g} {unit} "
              f"(predict-the-mean {r['baseline_mae']:.4g} {unit}, n={r['n']}, alpha={r['alpha']})")
    return 0
