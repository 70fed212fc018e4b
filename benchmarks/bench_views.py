"""SCD pairs per second on one core: ``make_views`` (noise + two radius graphs) + ``collate``.

QM9 molecules (qm9pack's CSV) and pymatgen's bundled crystals (with random cell repeats), in
batches of 32. Baseline: the same views with ``ase.neighborlist.neighbor_list`` building both
graphs instead of ``shards.stream.graph``. Usage: ``python benchmarks/bench_views.py [--molecules 2000]``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_graph import crystals, qm9_molecules  # noqa: E402

from scd_train.views import ViewConfig, make_views, noise_rng  # noqa: E402
from shards.format.schema import AtomGraph, make_key  # noqa: E402
from shards.stream.collate import collate  # noqa: E402

BATCH = 32


def ase_views(g: AtomGraph, cfg: ViewConfig, seed: int, step: int) -> dict[str, np.ndarray]:
    """Baseline: the same noise as ``make_views`` (no repeats), ASE neighbour lists for both graphs."""
    import ase
    from ase.neighborlist import neighbor_list

    pos = g.positions.astype(np.float64)
    n = pos.shape[0]
    out: dict[str, np.ndarray] = {"z": g.atomic_numbers.astype(np.int64)}
    jitter = noise_rng(seed, g.key, step, "clean").standard_normal((n, 3)) * cfg.clean_sigma
    eps = (noise_rng(seed, g.key, step, "noise").standard_normal((n, 3)) * cfg.noisy_sigma).astype(np.float32)
    for name, p in (("clean", pos + jitter), ("noisy", pos + eps)):
        atoms = ase.Atoms(numbers=g.atomic_numbers, positions=p, cell=g.cell, pbc=g.pbc)
        i, j, shift = neighbor_list("ijS", atoms, cfg.cutoff)
        out[f"pos_{name}"] = p.astype(np.float32)
        out[f"edge_index_{name}"] = np.stack([j, i]).astype(np.int64)
        out[f"edge_shift_{name}"] = (shift @ g.cell).astype(np.float32)
    out["noise"], out["cell"], out["pbc"], out["n_atoms"] = eps, g.cell.astype(np.float32), g.pbc, np.int64(n)
    return out


def pairs_per_s(graphs: list[AtomGraph], views, cfg: ViewConfig, min_s: float = 2.0) -> tuple[float, float]:
    """(pairs/s, atoms/s) over batches of ``BATCH``, cycling through ``graphs`` for >= ``min_s``."""
    done = atoms = step = 0
    t0 = time.perf_counter()
    while True:
        for b in range(0, len(graphs), BATCH):
            items = []
            for g in graphs[b:b + BATCH]:
                it = views(g, cfg, 0, step)
                it["key"], it["domain_id"] = g.key, 0
                items.append(it)
            batch = collate(items)
            done += len(items)
            atoms += int(batch["n_atoms"].sum())
            step += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_s:
                return done / elapsed, atoms / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--molecules", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    mols = [AtomGraph(key=make_key("qm9", "part1", i), domain="molecule", source="qm9", source_file="",
                      index=i, atomic_numbers=z, positions=p, cell=np.zeros((3, 3)), pbc=np.zeros(3, bool))
            for i, (z, p) in enumerate(qm9_molecules(args.molecules))]
    xtals = [AtomGraph(key=make_key("pmg", name, i), domain="crystal", source="pymatgen", source_file="",
                       index=i, atomic_numbers=a.numbers, positions=a.positions, cell=a.cell.array, pbc=a.pbc)
             for i, (name, a) in enumerate(crystals())]
    xtals = (xtals * (BATCH // len(xtals) + 1))[:BATCH]
    cfg = ViewConfig()
    no_repeat = ViewConfig(crystal_repeat_p=0.0)
    print(f"one core, batches of {BATCH}, make_views (clean + noisy graph) + collate")
    mean_atoms = np.mean([g.n_atoms for g in mols])
    print(f"QM9: {len(mols)} molecules, {mean_atoms:.1f} atoms on average")
    ours, atoms = pairs_per_s(mols, make_views, cfg, args.seconds)
    base, _ = pairs_per_s(mols, ase_views, cfg, args.seconds)
    print(f"  ours           {ours:9.0f} SCD pairs/s  ({atoms:,.0f} atoms/s)")
    print(f"  ase baseline   {base:9.0f} SCD pairs/s  -> ours is {ours / base:.1f}x")
    print(f"  goal >= 2,000 pairs/s per core: {'met' if ours >= 2000 else 'NOT met'}")
    print(f"crystals: {len(xtals)} structures (pymatgen), 32 nearest neighbours kept")
    rep, atoms = pairs_per_s(xtals, make_views, cfg, args.seconds)
    ours_c, _ = pairs_per_s(xtals, make_views, no_repeat, args.seconds)
    base_c, _ = pairs_per_s(xtals, ase_views, no_repeat, args.seconds)
    print(f"  ours, repeats p=0.5 {rep:7.0f} SCD pairs/s  ({atoms:,.0f} atoms/s)")
    print(f"  ours, no repeats    {ours_c:7.0f} SCD pairs/s")
    print(f"  ase, no repeats     {base_c:7.0f} SCD pairs/s  -> ours is {ours_c / base_c:.1f}x "
          "(ase keeps all neighbours: no k-nearest cut)")


if __name__ == "__main__":
    main()
