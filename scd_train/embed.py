"""``scd embed``: per-structure embeddings (the pooled self-embedding c) and a ridge linear probe.

The embedding of a structure is ``c`` from one pass on its clean geometry (no noise, no rotation),
conditioned on the mask token, exactly as the first SCD pass computes it; outputs are deterministic.
"""
from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scd_train.budget import Budget, budget_batches
from scd_train.checkpoint import load_objective
from scd_train.data import to_torch
from scd_train.views import ViewConfig, make_views
from shards.format.schema import AtomGraph
from shards.progress import Progress
from shards.stream.collate import collate

__all__ = ["DEFAULT_BUDGET", "count_inputs", "embed_graphs", "iter_inputs", "load_objective", "read_inputs",
           "ridge_cv"]

DEFAULT_BUDGET = Budget()


def iter_inputs(inputs: list[str]) -> Iterator[AtomGraph]:
    """Stream a shard dataset folder, or structure files ASE reads (every frame; key ``<stem>-<frame>``)."""
    if len(inputs) == 1 and (Path(inputs[0]) / "manifest.json").is_file():
        from shards.format.reader import ShardDataset

        yield from ShardDataset(inputs[0])
        return
    import ase.io

    for path in inputs:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: not a shard dataset (no manifest.json) nor a structure file")
    found = False
    for path in inputs:
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", Path(path).stem)
        for i, atoms in enumerate(ase.io.iread(path, index=":")):
            found = True
            domain = "crystal" if atoms.pbc.any() else "molecule"
            yield AtomGraph.from_ase(atoms, key=f"{stem}-{i}", domain=domain, source="files",
                                     source_file=str(path), index=i)
    if not found:
        raise ValueError(f"no structures in {inputs}")


def read_inputs(inputs: list[str]) -> list[AtomGraph]:
    """:func:`iter_inputs` as a list."""
    return list(iter_inputs(inputs))


def count_inputs(inputs: list[str]) -> int | None:
    """The number of structures when known without reading them (a shard dataset's manifest)."""
    if len(inputs) == 1 and (Path(inputs[0]) / "manifest.json").is_file():
        return int(json.loads((Path(inputs[0]) / "manifest.json").read_text())["n_samples"])
    return None


@torch.no_grad()
def embed_graphs(objective: Any, graphs: Iterable[AtomGraph], *, budget: Budget = DEFAULT_BUDGET,
                 device: str | torch.device = "cpu", progress: bool = True, total: int | None = None) -> np.ndarray:
    """float32 ``[G, F]``: the pooled embedding c of each graph, in order (one mask-token pass).

    ``objective`` is a denoising objective (:func:`load_objective`): it has ``backbone`` and ``embed``.

    Graphs are streamed and packed into batches within ``budget`` (atoms and edges of the radius graph),
    so memory is bounded by the budget, not by the sizes of the structures.
    """
    device = torch.device(device)
    objective = objective.to(device).eval()
    vc = ViewConfig(noise=False, rotate=False, cutoff=objective.backbone.cfg.cutoff)
    views = (make_views(g, vc, 0, 0) for g in graphs)
    out = []
    with Progress(total, "embed", "structure", enabled=progress) as bar:
        for items in budget_batches(views, budget):
            c, _, _ = objective.embed(to_torch(collate(items), device))
            out.append(c.float().cpu().numpy())
            bar.update(len(items))
    if not out:
        raise ValueError("nothing to embed: no structures")
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
    from scd_train.dist import select_device

    objective, _ = load_objective(args.checkpoint)
    inputs = list(args.inputs)
    budget = Budget(max_atoms=args.max_atoms, max_edges=args.max_edges, max_graphs=args.batch_size)
    keys: list[str] = []
    labels: dict[int, tuple[float, str]] = {}

    def record(graphs: Iterable[AtomGraph]) -> Iterator[AtomGraph]:
        for g in graphs:
            if args.probe and g.properties and args.probe in g.properties:
                labels[len(keys)] = (float(g.properties[args.probe]), (g.property_units or {}).get(args.probe, ""))
            keys.append(g.key)
            yield g

    emb = embed_graphs(objective, record(iter_inputs(inputs)), budget=budget, device=select_device(args.device),
                       total=count_inputs(inputs))
    stem = Path(str(args.out).removesuffix(".npy"))
    stem.parent.mkdir(parents=True, exist_ok=True)
    np.save(f"{stem}.npy", emb)
    Path(f"{stem}.keys.txt").write_text("".join(k + "\n" for k in keys))
    print(f"{emb.shape[0]} embeddings of width {emb.shape[1]} -> {stem}.npy, {stem}.keys.txt")
    if args.probe:
        if not labels:
            raise ValueError(f"property {args.probe!r} is not in the inputs")
        has = sorted(labels)
        y = np.array([labels[i][0] for i in has])
        r = ridge_cv(emb[has].astype(np.float64), y, alpha=args.alpha, folds=args.folds)
        unit = labels[has[0]][1]
        print(f"linear probe {args.probe}: {r['folds']}-fold CV MAE {r['mae']:.4g} {unit} "
              f"(predict-the-mean {r['baseline_mae']:.4g} {unit}, n={r['n']}, alpha={r['alpha']})")
    return 0
