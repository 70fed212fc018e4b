"""SCDCalculator cost: energy + forces per call (one ASE Velocity Verlet MD step = one call), MD steps/s,
atoms*steps/s and the calculator's peak RSS, for an 18-atom molecule, a 200-atom periodic cell and a
3,000-atom cluster at the small and paper presets; next to the SCD training step time of the same backbone
for structures up to ``--train-max-atoms`` atoms.

Every (case, preset) runs in its own process, so each peak RSS is its own. Inside it the calculator runs
first, alone (warm-up call + timed MD steps; the calculator's peak RSS is read then); then, for a structure
small enough, SCD training steps and MD steps alternate (MD/train ratio from the alternated pairs) and the
process peak with training is read. A 3,000-atom cluster gets no training step by default: at the paper
preset its two-pass training step needs more memory than the calculator (it was killed out of memory on a
24 GB machine). Weights are random (speed does not depend on them).

    .venv/bin/python benchmarks/bench_calculator.py [--threads 2] [--presets small paper] [--cases molecule ...]
        [--train-max-atoms 500] [--cluster-atoms 3000] [--mem-limit-gib G]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

CASES = ("molecule", "cell", "cluster")
STEPS = {"molecule": 10, "cell": 4, "cluster": 2}
CLUSTER_REPEATS = {500: (5, 5, 5), 1000: (10, 5, 5), 1500: (15, 5, 5), 2000: (10, 10, 5), 3000: (15, 10, 5)}


def build_structure(case: str, cluster_atoms: int = 3000):
    """molecule: 1-pentanol (18 atoms, RDKit); cell: Cu fcc 5x5x2 cubic (200, periodic); cluster: a
    non-periodic block of cubic Cu fcc cells with ``cluster_atoms`` atoms (3,000 = 15x10x5 cells)."""
    from ase.build import bulk

    if case == "molecule":
        from scd_train.mdgen import molecule_from_smiles

        return molecule_from_smiles("CCCCCO")
    if case == "cell":
        return bulk("Cu", "fcc", a=3.61, cubic=True) * (5, 5, 2)
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * CLUSTER_REPEATS[cluster_atoms]
    atoms.pbc = False
    atoms.cell = np.zeros((3, 3))
    return atoms


def peak_rss_mib() -> float:
    """This process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(case: str, preset: str, threads: int, train: bool, cluster_atoms: int = 3000) -> dict:
    import torch
    from ase import units
    from ase.md.velocitydistribution import thermalize_momenta
    from ase.md.verlet import VelocityVerlet
    from ase.neighborlist import neighbor_list

    from scd_train.calculator import SCDCalculator
    from scd_train.forcefield import EnergyModel
    from scd_train.objectives import ObjectiveConfig, build_objective

    torch.set_num_threads(threads)
    atoms = build_structure(case, cluster_atoms)
    cfg = ObjectiveConfig(preset=preset, drop_path=0.0)
    torch.manual_seed(0)
    model = EnergyModel(build_objective(cfg))
    torch.nn.init.normal_(model.head[-1].weight, std=0.1)
    edges = len(neighbor_list("i", atoms, model.cutoff))  # ASE's count of directed pairs within the cutoff
    calc = SCDCalculator.from_model(model, {"elements": sorted(set(atoms.numbers.tolist()))})
    atoms.calc = calc
    thermalize_momenta(atoms, 300.0, rng=np.random.default_rng(0))
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    dyn.run(1)  # warm-up: the first call (graph, allocations)
    calc_t = []
    for _ in range(STEPS[case]):  # the calculator alone: one energy + forces call per MD step
        t = time.perf_counter()
        dyn.run(1)
        calc_t.append(time.perf_counter() - t)
    md = float(np.median(calc_t))
    out = {"case": case, "preset": preset, "atoms": len(atoms), "edges": edges, "md_steps_per_s": 1 / md,
           "atom_steps_per_s": len(atoms) / md, "md_step_ms": 1000 * md, "calc_peak_rss_MiB": peak_rss_mib(),
           "train_step_ms": None, "md_over_train": None, "peak_rss_with_train_MiB": None}
    if not train:
        return out

    from scd_train.data import to_torch
    from scd_train.views import ViewConfig, make_views
    from shards.format.schema import AtomGraph
    from shards.stream.collate import collate

    torch.manual_seed(1)
    objective = build_objective(cfg).train()
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-4)
    g = AtomGraph.from_ase(atoms, key="bench", domain="crystal" if atoms.pbc.any() else "molecule", source="bench")
    views = make_views(g, ViewConfig(max_neighbors_periodic=None, crystal_repeat_p=0.0), 0, 0)
    batch = to_torch(collate([views]), torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)

    def train_step() -> None:
        loss, n, _ = objective(batch, gen)
        opt.zero_grad(set_to_none=True)
        (loss / n).backward()
        opt.step()

    train_step()  # warm-up
    md_t, tr_t = [], []
    for _ in range(STEPS[case]):  # alternate: one MD step, one training step
        t = time.perf_counter()
        dyn.run(1)
        md_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        train_step()
        tr_t.append(time.perf_counter() - t)
    md_alt, tr = float(np.median(md_t)), float(np.median(tr_t))
    out.update(train_step_ms=1000 * tr, md_over_train=md_alt / tr, peak_rss_with_train_MiB=peak_rss_mib())
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--presets", nargs="+", default=["small", "paper"])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--train-max-atoms", type=int, default=500,
                    help="alternate SCD training steps only for structures up to this size (default 500)")
    ap.add_argument("--cluster-atoms", type=int, default=3000, choices=sorted(CLUSTER_REPEATS),
                    help="atoms of the cluster case (default 3000)")
    ap.add_argument("--mem-limit-gib", type=float, default=None,
                    help="address-space limit of each case's process; a case over it is reported, not fatal")
    ap.add_argument("--one", nargs=3, metavar=("CASE", "PRESET", "TRAIN"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        if args.mem_limit_gib:
            limit = int(args.mem_limit_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        print(json.dumps(run_case(args.one[0], args.one[1], args.threads, args.one[2] == "1", args.cluster_atoms)))
        return
    print(f"{'case':9} {'preset':6} {'atoms':>6} {'edges':>8} {'MD steps/s':>11} {'atom*steps/s':>13} "
          f"{'E+F call ms':>12} {'calc RSS MiB':>13} {'train step ms':>14} {'MD/train':>9} {'RSS+train MiB':>14}")
    for preset in args.presets:
        for case in args.cases:
            n_atoms = len(build_structure(case, args.cluster_atoms))
            cmd = [sys.executable, __file__, "--one", case, preset, str(int(n_atoms <= args.train_max_atoms)),
                   "--threads", str(args.threads), "--cluster-atoms", str(args.cluster_atoms)]
            if args.mem_limit_gib:
                cmd += ["--mem-limit-gib", str(args.mem_limit_gib)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                tail = (out.stderr.strip().splitlines() or ["(no message)"])[-1]
                print(f"{case:9} {preset:6} {n_atoms:6d} failed (exit {out.returncode}): {tail[:200]}", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{r['case']:9} {r['preset']:6} {r['atoms']:6d} {r['edges']:8d} {r['md_steps_per_s']:11.3f} "
                  f"{r['atom_steps_per_s']:13.0f} {r['md_step_ms']:12.0f} {r['calc_peak_rss_MiB']:13.0f} "
                  f"{_fmt(r['train_step_ms'], '14.0f'):>14} {_fmt(r['md_over_train'], '9.2f'):>9} "
                  f"{_fmt(r['peak_rss_with_train_MiB'], '14.0f'):>14}", flush=True)


if __name__ == "__main__":
    main()
