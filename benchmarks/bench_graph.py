"""Radius-graph time per structure: ``shards.stream.graph.radius_graph`` vs ``ase.neighborlist.neighbor_list``.

Structures: pymatgen's bundled crystals, a QM9 molecule (18 atoms) and a ~3,000-atom protein-density
random cloud. Usage: ``python benchmarks/bench_graph.py [--cutoff 5.0]``.
"""
from __future__ import annotations

import argparse
import glob
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from shards.stream.graph import radius_graph


def per_call(fn: Callable[[], object], budget_s: float = 0.3, repeats: int = 3) -> float:
    """Best-of-``repeats`` seconds per call, each repeat running about ``budget_s``."""
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    n = max(1, int(budget_s / once))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def qm9_molecules(limit: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(atomic numbers, positions) of the first ``limit`` QM9 molecules from qm9pack's CSV."""
    from bench_decode import qm9_graphs

    return [(g.atomic_numbers, g.positions) for g in qm9_graphs(limit)]


def crystals() -> list[tuple[str, object]]:
    """(name, ase.Atoms) for pymatgen's ordered bundled structures."""
    import pymatgen.core
    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    root = os.path.join(os.path.dirname(os.path.dirname(pymatgen.core.__file__)), "util", "structures")
    out = []
    for path in sorted(glob.glob(os.path.join(root, "*.json"))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = Structure.from_file(path)
        if s.is_ordered:
            out.append((Path(path).stem, AseAtomsAdaptor.get_atoms(s)))
    return out


def protein_cloud(n: int = 3000, density: float = 0.1, seed: int = 0) -> np.ndarray:
    """``n`` random points in a sphere at about protein atom density (atoms / Å^3)."""
    rng = np.random.default_rng(seed)
    radius = (3 * n / (4 * np.pi * density)) ** (1 / 3)
    v = rng.normal(size=(n, 3))
    v *= (radius * rng.random(n) ** (1 / 3) / np.linalg.norm(v, axis=1))[:, None]
    return v.astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cutoff", type=float, default=5.0)
    args = ap.parse_args()
    import ase
    from ase.neighborlist import neighbor_list

    rows = []
    for name, atoms in crystals():
        rows.append((name, atoms))
    z, pos = next((z, p) for z, p in qm9_molecules(2000) if len(z) == 18)
    rows.append(("qm9-18-atoms", ase.Atoms(numbers=z, positions=pos)))
    cloud = protein_cloud()
    rows.append(("protein-cloud-3000", ase.Atoms(numbers=np.full(len(cloud), 6), positions=cloud)))
    print(f"cutoff {args.cutoff} Å; time per structure (one core)")
    print(f"{'structure':24s} {'atoms':>6s} {'edges':>8s} {'ours':>10s} {'ase':>10s} {'ase/ours':>9s}")
    ratios = []
    for name, atoms in rows:
        pos, cell, pbc = atoms.positions.astype(np.float32), atoms.cell.array, atoms.pbc
        ours = per_call(lambda pos=pos, cell=cell, pbc=pbc: radius_graph(pos, cell, pbc, args.cutoff))
        theirs = per_call(lambda atoms=atoms: neighbor_list("ijS", atoms, args.cutoff))
        edges = radius_graph(pos, cell, pbc, args.cutoff)[0].shape[1]
        ratios.append(theirs / ours)
        print(f"{name:24s} {len(atoms):6d} {edges:8d} {ours * 1e6:8.0f}µs {theirs * 1e6:8.0f}µs "
              f"{theirs / ours:8.1f}x")
    print(f"geometric mean speed-up over ase: {np.exp(np.mean(np.log(ratios))):.1f}x")


if __name__ == "__main__":
    main()
