"""Operator profile (torch.profiler) of one SCD training step of our backbones: where the time goes.

Same step and batch as ``bench_backbones.py`` (``--graphs`` molecules of 18 atoms); prints the top
operators by self CPU time (forward and backward together) and the step's wall time.

    python benchmarks/profile_step.py [--backbone et] [--preset small] [--graphs 32] [--threads 2] [--top 20]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from scd_train.objectives import ObjectiveConfig, build_objective


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="et", help="backbone[+option...] as in bench_backbones (default et)")
    ap.add_argument("--preset", default="small", help="default small")
    ap.add_argument("--graphs", type=int, default=32, help="molecules of 18 atoms (default 32)")
    ap.add_argument("--threads", type=int, default=2, help="default 2")
    ap.add_argument("--top", type=int, default=20, help="operators shown (default 20)")
    args = ap.parse_args()
    from bench_backbones import qm9_like_batch, side_options  # the benchmark's batch, run from benchmarks/

    torch.set_num_threads(args.threads)
    batch = qm9_like_batch(n_graphs=args.graphs)
    torch.manual_seed(0)
    backbone, options = side_options(args.backbone)
    obj = build_objective(ObjectiveConfig(kind="scd", backbone=backbone, preset=args.preset, **options)).train()
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.05)

    def step(i: int) -> None:
        loss_sum, n, _ = obj(batch, generator=torch.Generator().manual_seed(i))
        opt.zero_grad(set_to_none=True)
        (loss_sum / n).backward()
        opt.step()

    step(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t0 = time.perf_counter()
        step(1)
        wall = time.perf_counter() - t0
    print(f"{args.backbone} {args.preset}: {batch['z'].shape[0]} atoms, {batch['edge_index_clean'].shape[1]} edges "
          f"per view, {args.threads} threads, step {wall:.3f} s (profiled)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40))


if __name__ == "__main__":
    main()
