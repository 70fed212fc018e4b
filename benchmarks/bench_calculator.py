"""SCDCalculator throughput: ASE Velocity Verlet MD steps/s and atoms*steps/s, next to the training step
time of the same backbone, for an 18-atom molecule, a 200-atom periodic cell and a 3,000-atom cluster at
the small and paper presets. Every (case, preset) runs in its own process, so each peak RSS is its own;
inside it MD steps and SCD training steps alternate. Weights are random (speed does not depend on them).

    .venv/bin/python benchmarks/bench_calculator.py [--threads 2] [--presets small paper] [--cases molecule ...]
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


def build_structure(case: str):
    """molecule: 1-pentanol (18 atoms, RDKit); cell: Cu fcc 5x5x2 cubic (200, periodic); cluster: Cu 3,000."""
    from ase.build import bulk

    if case == "molecule":
        from scd_train.mdgen import molecule_from_smiles

        return molecule_from_smiles("CCCCCO")
    if case == "cell":
        return bulk("Cu", "fcc", a=3.61, cubic=True) * (5, 5, 2)
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (15, 10, 5)
    atoms.pbc = False
    atoms.cell = np.zeros((3, 3))
    return atoms


def run_case(case: str, preset: str, threads: int) -> dict:
    import torch
    from ase import units
    from ase.md.velocitydistribution import thermalize_momenta
    from ase.md.verlet import VelocityVerlet

    from scd_train.calculator import SCDCalculator
    from scd_train.data import to_torch
    from scd_train.forcefield import EnergyModel
    from scd_train.objectives import ObjectiveConfig, build_objective
    from scd_train.views import ViewConfig, make_views
    from shards.format.schema import AtomGraph
    from shards.stream.collate import collate

    torch.set_num_threads(threads)
    atoms = build_structure(case)
    cfg = ObjectiveConfig(preset=preset, drop_path=0.0)
    torch.manual_seed(0)
    model = EnergyModel(build_objective(cfg))
    torch.nn.init.normal_(model.head[-1].weight, std=0.1)
    calc = SCDCalculator.from_model(model, {"elements": sorted(set(atoms.numbers.tolist()))})
    atoms.calc = calc
    thermalize_momenta(atoms, 300.0, rng=np.random.default_rng(0))
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
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

    dyn.run(1)  # warm-up: first graph and allocations
    train_step()
    md_t, tr_t = [], []
    for _ in range(STEPS[case]):  # alternate: one MD step, one training step
        t = time.perf_counter()
        dyn.run(1)
        md_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        train_step()
        tr_t.append(time.perf_counter() - t)
    md, tr = float(np.median(md_t)), float(np.median(tr_t))
    return {"case": case, "preset": preset, "atoms": len(atoms), "md_steps_per_s": 1 / md,
            "atom_steps_per_s": len(atoms) / md, "md_step_ms": 1000 * md, "train_step_ms": 1000 * tr,
            "md_over_train": md / tr, "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--presets", nargs="+", default=["small", "paper"])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--one", nargs=2, metavar=("CASE", "PRESET"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_case(args.one[0], args.one[1], args.threads)))
        return
    print(f"{'case':9} {'preset':6} {'atoms':>6} {'MD steps/s':>11} {'atom*steps/s':>13} {'MD step ms':>11} "
          f"{'train step ms':>14} {'MD/train':>9} {'peak RSS MiB':>13}")
    for preset in args.presets:
        for case in args.cases:
            out = subprocess.run([sys.executable, __file__, "--one", case, preset, "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{r['case']:9} {r['preset']:6} {r['atoms']:6d} {r['md_steps_per_s']:11.2f} "
                  f"{r['atom_steps_per_s']:13.0f} {r['md_step_ms']:11.1f} {r['train_step_ms']:14.1f} "
                  f"{r['md_over_train']:9.2f} {r['peak_rss_MiB']:13.0f}", flush=True)


if __name__ == "__main__":
    main()
