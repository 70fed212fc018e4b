"""SCD training throughput on a GPU: the paper-size CT (256/8 layers/8 heads/64 RBF) at a 4,000-atom
budget, eager vs ``torch.compile``, fp32 (TF32) vs bf16 autocast. One step = both SCD passes +
backward + AdamW. Batches are real QM9 molecules made by our loader's view code (both noisy views,
two radius graphs) and moved to the GPU before timing.

Usage: ``python benchmarks/bench_gpu.py --molecules qm9.npz`` where the npz holds ``z`` (concatenated
atomic numbers), ``pos`` and ``n`` (atoms per molecule); ``--export`` writes that file from the
qm9pack CSV.
"""
from __future__ import annotations

import argparse
import ast
import csv
import time
from pathlib import Path

import numpy as np


def export(path: Path, limit: int) -> None:
    from ase.data import atomic_numbers

    from scd_train.datakit import qm9_csv

    zs, pos, ns = [], [], []
    with open(qm9_csv(1), newline="") as fh:
        for i, row in enumerate(csv.DictReader(fh)):
            if i >= limit:
                break
            z = [atomic_numbers[s] for s in ast.literal_eval(row["Elements"])]
            zs += z
            pos += ast.literal_eval(row["XYZ_Ang"])
            ns.append(len(z))
    np.savez_compressed(path, z=np.array(zs, np.uint8), pos=np.array(pos, np.float32), n=np.array(ns, np.int32))
    print(f"wrote {path}: {len(ns)} molecules")


def batches(path: Path, budget: int, count: int) -> list[dict]:
    from scd_train.views import ViewConfig, make_views
    from shards.format.schema import AtomGraph
    from shards.stream.collate import collate

    data = np.load(path)
    offs = np.r_[0, np.cumsum(data["n"])]
    graphs = [AtomGraph(key=f"qm9-{i}", domain="molecule", source="qm9", source_file="qm9", index=i,
                        atomic_numbers=data["z"][offs[i]:offs[i + 1]], positions=data["pos"][offs[i]:offs[i + 1]],
                        cell=np.zeros((3, 3)), pbc=np.zeros(3, bool)) for i in range(len(data["n"]))]
    out, items, atoms, i = [], [], 0, 0
    while len(out) < count:
        g = graphs[i % len(graphs)]
        if atoms + g.n_atoms > budget:
            out.append(collate(items))
            items, atoms = [], 0
        items.append(make_views(g, ViewConfig(), seed=0, step=i))
        atoms += g.n_atoms
        i += 1
    return out


def run(batches_np: list[dict], backbone: str, preset: str, compile_model: bool, bf16: bool, steps: int) -> dict:
    import torch

    from scd_train.dynamic import mark_dynamic
    from scd_train.objectives import ObjectiveConfig, build_objective
    from scd_train.optim import OptimConfig, build_optimizer

    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    model = build_objective(ObjectiveConfig(kind="scd", backbone=backbone, preset=preset)).to(dev)
    opt, sched = build_optimizer(model, OptimConfig(warmup_steps=10), steps + 10)
    fwd = torch.compile(model) if compile_model else model
    data = [{k: (torch.from_numpy(np.ascontiguousarray(v)).to(dev) if isinstance(v, np.ndarray) else v)
             for k, v in b.items()} for b in batches_np]
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)

    if compile_model:
        import torch._dynamo

        torch._dynamo.reset()
        for b in data:
            mark_dynamic(b)

    def step(b: dict) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss_sum, n, _ = fwd(b, generator=gen)
        loss = loss_sum.float() / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()

    t_warm = time.perf_counter()
    for b in data[:5]:
        step(b)
    torch.cuda.synchronize()
    warm = time.perf_counter() - t_warm
    torch.cuda.reset_peak_memory_stats()
    atoms = 0
    t0 = time.perf_counter()
    for i in range(steps):
        b = data[i % len(data)]
        step(b)
        atoms += int(b["z"].shape[0])
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    return {"backbone": backbone, "preset": preset, "params_M": params / 1e6, "compile": compile_model,
            "bf16": bf16, "steps_s": steps / dt, "atoms_s": atoms / dt, "warmup_s": warm,
            "peak_mem_GB": torch.cuda.max_memory_allocated() / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--molecules", type=Path, default=Path("qm9.npz"))
    ap.add_argument("--export", type=int, default=0, help="write --molecules from the first N QM9 rows and exit")
    ap.add_argument("--budget", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--backbones", default="et,painn")
    ap.add_argument("--presets", default="paper")
    ap.add_argument("--modes", default="eager-fp32,eager-bf16,compile-fp32,compile-bf16")
    args = ap.parse_args()
    if args.export:
        export(args.molecules, args.export)
        return
    import torch

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    data = batches(args.molecules, args.budget, 20)
    print(f"{len(data)} batches, mean {np.mean([b['z'].shape[0] for b in data]):.0f} atoms, "
          f"{np.mean([b['edge_index_noisy'].shape[1] for b in data]):.0f} edges per view")
    for backbone in args.backbones.split(","):
        for preset in args.presets.split(","):
            for mode in args.modes.split(","):
                comp, prec = mode.split("-")
                try:
                    r = run(data, backbone, preset, comp == "compile", prec == "bf16", args.steps)
                    print(f"{backbone:6s} {preset:6s} {r['params_M']:5.1f}M {mode:13s} {r['steps_s']:7.2f} steps/s "
                          f"{r['atoms_s']:10,.0f} atoms/s  peak {r['peak_mem_GB']:.1f} GB  "
                          f"(warm-up {r['warmup_s']:.0f}s)",
                          flush=True)
                except Exception as exc:  # noqa: BLE001 - report the failing mode and go on
                    print(f"{backbone:6s} {preset:6s} {mode:13s} FAILED: {type(exc).__name__}: {str(exc)[:200]}",
                          flush=True)


if __name__ == "__main__":
    main()
