"""CPU training throughput of the SCD objective for every registered backbone and size preset.

One step = pass 1 (clean) + pass 2 (noisy) + backward + AdamW on a batch of 32 QM9-size molecules
(18 atoms, all pairs within 5 A, graphs precomputed). Reference (authors' code, this machine class):
~295 atoms/s at 128/6 and ~105 atoms/s at 256/8; the target is 1.5x that.

    python benchmarks/bench_backbones.py [--steps 5] [--threads 2] [--backbones et painn] [--presets small paper]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time

import numpy as np
import torch

from scd_train.models import BACKBONE_CONFIGS, PRESETS
from scd_train.objectives import ObjectiveConfig, build_objective
from shards.graph import radius_graph

REFERENCE_ATOMS_PER_S = {"small": 295.0, "paper": 105.0}


def qm9_like_batch(n_graphs: int = 32, n_atoms: int = 18, seed: int = 0) -> dict[str, torch.Tensor]:
    """Compact random molecules (H/C/N/O/F) with clean and noisy views and 5 A radius graphs."""
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {k: [] for k in ("z", "pos_clean", "pos_noisy", "noise", "edge_index_clean",
                                            "edge_shift_clean", "edge_index_noisy", "edge_shift_noisy")}
    for g in range(n_graphs):
        pos = rng.normal(scale=1.1, size=(n_atoms, 3))
        eps = rng.normal(scale=0.04, size=(n_atoms, 3))
        views = {"_clean": pos + rng.normal(scale=0.005, size=(n_atoms, 3)), "_noisy": pos + eps}
        out["z"].append(rng.choice([1, 6, 7, 8, 9], size=n_atoms, p=[0.5, 0.35, 0.06, 0.08, 0.01]))
        out["noise"].append(eps)
        for v, p in views.items():
            ei, sh = radius_graph(p, cutoff=5.0)
            out["pos" + v].append(p)
            out["edge_index" + v].append(ei + g * n_atoms)
            out["edge_shift" + v].append(sh)
    batch = {k: torch.as_tensor(np.concatenate(v, axis=1 if k.startswith("edge_index") else 0))
             for k, v in out.items()}
    for k in ("pos_clean", "pos_noisy", "noise", "edge_shift_clean", "edge_shift_noisy"):
        batch[k] = batch[k].float()
    batch["n_atoms"] = torch.full((n_graphs,), n_atoms, dtype=torch.int64)
    batch["batch"] = torch.repeat_interleave(torch.arange(n_graphs), batch["n_atoms"])
    return batch


def bench(backbone: str, preset: str, steps: int, warmup: int, threads: int) -> dict[str, float]:
    """Time ``steps`` full SCD training steps after ``warmup`` untimed ones (run in a fresh process)."""
    torch.set_num_threads(threads)
    batch = qm9_like_batch()
    torch.manual_seed(0)
    obj = build_objective(ObjectiveConfig(kind="scd", backbone=backbone, preset=preset)).train()
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.05)
    n_atoms = int(batch["z"].shape[0])
    times = []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        loss_sum, n, _ = obj(batch, generator=torch.Generator().manual_seed(step))
        opt.zero_grad(set_to_none=True)
        (loss_sum / n).backward()
        opt.step()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    dt = float(np.median(times))
    return {"params_M": sum(p.numel() for p in obj.parameters()) / 1e6, "s_per_step": dt, "best_s": min(times),
            "steps_per_s": 1.0 / dt, "atoms_per_s": n_atoms / dt,
            "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backbones", nargs="+", default=sorted(BACKBONE_CONFIGS))
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    args = ap.parse_args()
    batch = qm9_like_batch()
    n_edges = int(batch["edge_index_clean"].shape[1])
    print(f"torch {torch.__version__}, {args.threads} threads; batch: {batch['z'].shape[0]} atoms, "
          f"{n_edges} edges per view; median of {args.steps} steps after {args.warmup} warm-up; "
          f"peak RSS of the row's process; load = 1-min load average after the row (others' jobs)")
    print(f"{'backbone':9} {'preset':6} {'params':>8} {'s/step':>7} {'steps/s':>8} {'atoms/s':>8} "
          f"{'vs ref':>7} {'best s':>7} {'peak RSS':>9} {'load':>5}")
    for name in args.backbones:
        for preset in args.presets:
            with mp.get_context("spawn").Pool(1) as pool:  # own process: per-row peak RSS
                r = pool.apply(bench, (name, preset, args.steps, args.warmup, args.threads))
            ref = REFERENCE_ATOMS_PER_S.get(preset)
            speedup = f"{r['atoms_per_s'] / ref:6.2f}x" if ref else "     -"
            print(f"{name:9} {preset:6} {r['params_M']:7.2f}M {r['s_per_step']:7.3f} {r['steps_per_s']:8.3f} "
                  f"{r['atoms_per_s']:8.0f} {speedup:>7} {r['best_s']:7.3f} {r['peak_rss_MB']:8.0f}M "
                  f"{os.getloadavg()[0]:5.2f}", flush=True)


if __name__ == "__main__":
    main()
