"""CPU training throughput and peak memory of one SCD step, ours and (optionally) the SCD authors' model.

One step = pass 1 (clean) + pass 2 (noisy, conditioned on pass 1) + backward + AdamW on a batch of
32 QM9-size molecules (18 atoms, all pairs within 5 A, no self-loops, graphs precomputed). Every
measurement runs in a fresh child process (its own peak RSS) with the same threads and the same batch,
saved once by the parent.

    python benchmarks/bench_backbones.py [--rounds 2] [--steps 4] [--threads 2] [--backbones et painn]
        [--presets small paper] [--ref REF --ref-python PY --ref-path STUBS]

A backbone name may carry model options after ``+`` (:data:`SIDE_OPTIONS`), each measured as one more side:
``et`` runs its fused edge kernel (the default), ``et+plain`` the plain PyTorch path (``fused_edges: false``),
``et+plain+ckpt`` that path with ``checkpoint_edges`` (activation checkpointing of the per-edge part), and
``et+compile`` ET under ``torch.compile`` (which traces the plain path; compiled during the warm-up steps, which
are not timed; the batch has the same shapes every step, the case most favourable to compiling).

Without ``--ref`` it prints our figures only. With ``--ref REF`` (a checkout of
github.com/TyJPerez/SelfConditionedDenoisingAtoms, fetched by the user, never copied here) it alternates
our backbones and the authors' ``CET`` (``configs/model_configs/scd_small.yaml`` for ``small``,
``scd.yaml`` for ``paper``) in every round, run by ``--ref-python`` (a venv with torch, torch_geometric,
pyyaml, ase, lightning_utilities) with ``--ref-path`` prepended to its PYTHONPATH (stand-ins for the
compiled PyG extensions and wandb), and prints both, their ratio per round and both peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REF_CONFIGS = {"small": "configs/model_configs/scd_small.yaml", "paper": "configs/model_configs/scd.yaml"}
SIDE_OPTIONS: dict[str, dict[str, Any]] = {"ckpt": {"checkpoint_edges": True}, "compile": {},
                                           "plain": {"fused_edges": False}}
BATCH_KEYS = ("z", "pos_clean", "pos_noisy", "noise", "edge_index_clean", "edge_shift_clean",
              "edge_index_noisy", "edge_shift_noisy", "n_atoms", "batch")


def qm9_like_batch(n_graphs: int = 32, n_atoms: int = 18, seed: int = 0) -> dict[str, torch.Tensor]:
    """Compact random molecules (H/C/N/O/F) with clean and noisy views and 5 A radius graphs."""
    from shards.stream.graph import radius_graph

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


def load_batch(path: str) -> dict[str, torch.Tensor]:
    """The batch saved by the parent (plain arrays, no pickle)."""
    with np.load(path, allow_pickle=False) as f:
        return {k: torch.from_numpy(f[k]) for k in BATCH_KEYS}


def side_options(side: str) -> tuple[str, dict[str, Any]]:
    """``"et+ckpt"`` -> ``("et", {"checkpoint_edges": True})``: the backbone and its model options."""
    backbone, *names = side.split("+")
    unknown = set(names) - set(SIDE_OPTIONS)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)} in {side!r}; known: {sorted(SIDE_OPTIONS)}")
    return backbone, {k: v for n in names for k, v in SIDE_OPTIONS[n].items()}


def ours_step(batch: dict[str, torch.Tensor], side: str, preset: str, compile_: bool
              ) -> tuple[Callable[[int], None], int]:
    """Our SCD objective (``side``: backbone[+option...]) + AdamW; returns ``(step(i), n_params)``."""
    from scd_train.objectives import ObjectiveConfig, build_objective

    backbone, options = side_options(side)
    compile_ = compile_ or "compile" in side.split("+")[1:]
    torch.manual_seed(0)
    obj = build_objective(ObjectiveConfig(kind="scd", backbone=backbone, preset=preset, **options)).train()
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.05)
    fwd = torch.compile(obj) if compile_ else obj

    def step(i: int) -> None:
        loss_sum, n, _ = fwd(batch, generator=torch.Generator().manual_seed(i))
        opt.zero_grad(set_to_none=True)
        (loss_sum / n).backward()
        opt.step()

    return step, sum(p.numel() for p in obj.parameters())


def ref_step(batch: dict[str, torch.Tensor], ref: str, preset: str) -> tuple[Callable[[int], None], int]:
    """The authors' CET (their SCD step as in their trainer) + AdamW; needs their checkout on ``sys.path``."""
    import yaml  # in the reference venv
    sys.path.insert(0, ref)
    from models.ET_models.scd_model import CET

    torch.manual_seed(0)
    cfg = yaml.safe_load(Path(ref, REF_CONFIGS[preset]).read_text())
    cfg.pop("model", None)
    m = CET(**cfg).train()
    m.pretrain()  # frozen element embeddings, as ours
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.05)
    z, b = batch["z"], batch["batch"]
    noise = batch["noise"]
    target = (noise - noise.mean(0)) / noise.std(0)

    def graph(view: str) -> Any:
        ei = batch["edge_index" + view]
        vec = batch["pos" + view][ei[0]] - batch["pos" + view][ei[1]] + batch["edge_shift" + view]
        return ei, vec

    graphs = {v: graph(v) for v in ("_clean", "_noisy")}

    class Graph:  # their model reads these three attributes of a PyG batch
        def __init__(self, view: str) -> None:
            ei, vec = graphs[view]
            self.edge_index, self.edge_distance_vec = ei, vec.clone()  # they normalise it in place
            self.edge_distance = vec.norm(dim=-1)

    def step(i: int) -> None:
        out_c = m(z, batch["pos_clean"], b, cond=None, graph_batch=Graph("_clean"))
        out_n = m(z, batch["pos_noisy"], b, cond=out_c["mol_emb"], graph_batch=Graph("_noisy"))
        loss = torch.nn.functional.mse_loss(out_n["noise_pred"], target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, sum(p.numel() for p in m.parameters())


def child(args: argparse.Namespace) -> None:
    """Measure one side in this process; print one JSON line."""
    torch.set_num_threads(args.threads)
    batch = load_batch(args.batch)
    if args.child == "ref":
        step, n_params = ref_step(batch, args.ref, args.preset)
    else:
        step, n_params = ours_step(batch, args.child, args.preset, args.compile)
    times, cpu = [], []
    for i in range(args.warmup + args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step(i)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    dt, n = float(np.median(times)), int(batch["z"].shape[0])
    print(json.dumps({"params_M": n_params / 1e6, "s_per_step": dt, "best_s": min(times),
                      "atoms_per_s": n / dt, "atoms_per_cpu_s": n / float(np.median(cpu)),
                      "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_child(args: argparse.Namespace, side: str, preset: str, batch_path: str) -> dict[str, float]:
    """One fresh process per measurement (ours with this interpreter, theirs with ``--ref-python``)."""
    cmd = [__file__, "--child", side, "--preset", preset, "--batch", batch_path, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if side == "ref":
        cmd = [args.ref_python, *cmd, "--ref", args.ref]
        env["PYTHONPATH"] = os.pathsep.join([*args.ref_path, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    else:
        cmd = [sys.executable, *cmd, *(["--compile"] if args.compile else [])]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(f"{side} {preset} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="alternations of all sides (default 2)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per measurement (default 4)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of every side (default 2)")
    ap.add_argument("--backbones", nargs="+", default=["et", "painn"],
                    help="ours, each backbone[+option...] with options from SIDE_OPTIONS (default et painn)")
    ap.add_argument("--presets", nargs="+", default=list(REF_CONFIGS), help="default small paper")
    ap.add_argument("--compile", action="store_true", help="torch.compile our objective (default eager)")
    ap.add_argument("--ref", help="checkout of the authors' code: run their CET beside ours (default off)")
    ap.add_argument("--ref-python", default=sys.executable, help="interpreter for theirs (default this one)")
    ap.add_argument("--ref-path", nargs="*", default=[], help="PYTHONPATH entries for theirs (default none)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    ap.add_argument("--batch", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    unknown = set(args.presets) - set(REF_CONFIGS)
    if unknown:
        ap.error(f"unknown presets {sorted(unknown)}; known: {sorted(REF_CONFIGS)}")
    for side in args.backbones:
        try:
            side_options(side)
        except ValueError as exc:
            ap.error(str(exc))
    sides = list(args.backbones) + (["ref"] if args.ref else [])
    with tempfile.TemporaryDirectory() as tmp:
        batch = qm9_like_batch()
        batch_path = str(Path(tmp, "batch.npz"))
        np.savez(batch_path, **{k: batch[k].numpy() for k in BATCH_KEYS})
        print(f"torch {torch.__version__}, {args.threads} threads; batch: {batch['z'].shape[0]} atoms, "
              f"{batch['edge_index_clean'].shape[1]} edges per view; median of {args.steps} steps after "
              f"{args.warmup} warm-up, {args.rounds} rounds alternating {' / '.join(sides)}; "
              f"load = 1-min load average after the row; {'compiled' if args.compile else 'eager'}")
        print("atoms/cpu-s = atoms per second of the process's own CPU time (all threads): robust to others' load")
        print(f"{'round':>5} {'side':8} {'preset':6} {'params':>8} {'s/step':>7} {'atoms/s':>8} {'best s':>7} "
              f"{'atoms/cpu-s':>11} {'peak RSS':>9} {'load':>5}")
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        for rnd in range(args.rounds):
            for preset in args.presets:
                order = sides if rnd % 2 == 0 else sides[::-1]  # alternate who goes first
                for side in order:
                    r = run_child(args, side, preset, batch_path)
                    results.setdefault((side, preset), []).append(r)
                    print(f"{rnd:5d} {side:8} {preset:6} {r['params_M']:7.2f}M {r['s_per_step']:7.3f} "
                          f"{r['atoms_per_s']:8.0f} {r['best_s']:7.3f} {r['atoms_per_cpu_s']:11.0f} "
                          f"{r['peak_rss_MB']:8.0f}M "
                          f"{os.getloadavg()[0]:5.2f}", flush=True)
    print("summary (median over rounds; ratios = ours / theirs within each round, min-max):")
    for preset in args.presets:
        for side in args.backbones:
            ours = results[(side, preset)]
            line = (f"  {side:8} {preset:6} {np.median([r['atoms_per_s'] for r in ours]):7.0f} atoms/s "
                    f"{np.median([r['atoms_per_cpu_s'] for r in ours]):6.0f} atoms/cpu-s, "
                    f"peak RSS {max(r['peak_rss_MB'] for r in ours):6.0f}M")
            if args.ref:
                ref = results[("ref", preset)]
                ratios = [o["atoms_per_s"] / t["atoms_per_s"] for o, t in zip(ours, ref, strict=True)]
                cpu_ratios = [o["atoms_per_cpu_s"] / t["atoms_per_cpu_s"] for o, t in zip(ours, ref, strict=True)]
                rss_o, rss_t = max(r["peak_rss_MB"] for r in ours), max(r["peak_rss_MB"] for r in ref)
                line += (f" | theirs {np.median([r['atoms_per_s'] for r in ref]):6.0f} atoms/s "
                         f"{np.median([r['atoms_per_cpu_s'] for r in ref]):6.0f} atoms/cpu-s, "
                         f"peak RSS {rss_t:6.0f}M | speed {np.median(ratios):.2f}x "
                         f"({min(ratios):.2f}-{max(ratios):.2f}), per CPU-s {np.median(cpu_ratios):.2f}x "
                         f"({min(cpu_ratios):.2f}-{max(cpu_ratios):.2f}), memory {rss_o / rss_t:.2f}x")
            print(line)


if __name__ == "__main__":
    main()
