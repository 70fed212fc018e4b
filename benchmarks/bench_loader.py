"""Loader throughput per worker (one core): SCD pairs/s and atoms/s including decode, both noisy
views, two radius graphs and collate; QM9 molecules, crystals and a four-domain mix. Baseline: the
way people do it today, ``webdataset`` + per-sample ``ase.neighborlist.neighbor_list`` for both views.
Also: loader RSS for a dataset and for 10x the data (memory must stay flat).

Usage: ``python benchmarks/bench_loader.py [--molecules 20000] [--steps 60]``
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import protein_graphs, qm9_graphs, write_wds_npy  # noqa: E402

from scd_train.config import DataConfig  # noqa: E402
from scd_train.data import make_stream  # noqa: E402
from scd_train.views import ViewConfig  # noqa: E402
from shards.format.manifest import write_dataset  # noqa: E402
from shards.format.schema import AtomGraph, make_key  # noqa: E402
from shards.stream.mixture import MixtureConfig  # noqa: E402


def crystal_graphs() -> list[AtomGraph]:
    import pymatgen.util as pu
    from pymatgen.core import Structure

    out = []
    for path in sorted((Path(pu.__file__).parent / "structures").glob("*.json")):
        s = Structure.from_file(path)
        if s.is_ordered:
            out.append(AtomGraph.from_pymatgen(s, key=make_key("pmg", path.name, 0), domain="crystal",
                                               source="pymatgen", source_file=path.name))
    return out


def md_graphs(stride: int = 2) -> list[AtomGraph]:
    import MDAnalysis as mda
    from MDAnalysisTests.datafiles import DCD, PSF

    u = mda.Universe(PSF, DCD)
    z = np.array([{"H": 1, "C": 6, "N": 7, "O": 8, "S": 16}[name[0]] for name in u.atoms.names])
    out = []
    for ts in u.trajectory[::stride]:
        out.append(AtomGraph(key=make_key("adk-md", "adk_dims.dcd", ts.frame), domain="md", source="adk-md",
                             source_file="adk_dims.dcd", index=ts.frame, atomic_numbers=z,
                             positions=u.atoms.positions.copy(), cell=np.zeros((3, 3)), pbc=np.zeros(3, bool),
                             trajectory_id="adk_dims", frame_time=float(ts.time),
                             residue_index=u.atoms.resids))
    return out


def throughput(cfg: DataConfig, steps: int) -> tuple[float, float]:
    stream = make_stream(cfg)
    it = iter(stream)
    next(it)
    t = time.perf_counter()
    pairs = atoms = 0
    for b in itertools.islice(it, steps):
        pairs += len(b["keys"])
        atoms += int(b["z"].shape[0])
    dt = time.perf_counter() - t
    return pairs / dt, atoms / dt


def baseline(shards: list[str], limit: int) -> float:
    """webdataset .npy per field + ase.neighborlist.neighbor_list for both noisy views."""
    import webdataset as wds
    from ase import Atoms
    from ase.neighborlist import neighbor_list

    rng = np.random.default_rng(0)
    t = time.perf_counter()
    n = 0
    for s in itertools.islice(wds.WebDataset(shards, shardshuffle=False).decode(), limit):
        z, pos = s["atomic_numbers.npy"], s["positions.npy"].astype(np.float64)
        for sigma in (0.005, 0.04):
            a = Atoms(numbers=z, positions=pos + rng.normal(scale=sigma, size=pos.shape))
            neighbor_list("ijS", a, 5.0)
        n += 1
    return n / (time.perf_counter() - t)


def rss_child(root: str, steps: int) -> None:
    cfg = DataConfig(datasets=(root,), max_atoms=2000, views=ViewConfig())
    for _ in itertools.islice(make_stream(cfg), steps):
        pass
    print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--molecules", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], int(args.rss_child[1]))
        return
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    tmp = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    qm9 = qm9_graphs(args.molecules)
    crystals = crystal_graphs()
    write_dataset(qm9, tmp / "qm9")
    write_dataset(crystals * 1, tmp / "crystals")
    write_dataset(protein_graphs(20) + md_graphs() + crystals + qm9[:5000], tmp / "mix")
    budget = 4000
    for label, root, mix in (("QM9 molecules", "qm9", MixtureConfig()),
                             ("crystals (repeats p=0.5, 32 nn)", "crystals", MixtureConfig()),
                             ("4-domain mix (proportions 1:1:1:1, protein crop 1500)", "mix",
                              MixtureConfig(strategy="proportions", crop_protein_atoms=1500,
                                            max_frames_per_trajectory=10))):
        cfg = DataConfig(datasets=(str(tmp / root),), mixture=mix, max_atoms=budget, views=ViewConfig(rotate=True))
        pairs, atoms = throughput(cfg, args.steps)
        print(f"{label}: {pairs:,.0f} SCD pairs/s, {atoms:,.0f} atoms/s per worker "
              "(decode + 2 views + 2 graphs + collate)")
    wds_files = write_wds_npy(qm9, tmp / "wds", per_shard=10_000)
    base = baseline(wds_files, 1500)
    pairs, _ = throughput(DataConfig(datasets=(str(tmp / "qm9"),), max_atoms=budget), args.steps)
    print(f"QM9 baseline webdataset + ase neighbor_list: {base:,.0f} pairs/s -> ours {pairs / base:.1f}x")
    small = qm9[: args.molecules // 10]
    write_dataset(small, tmp / "small")
    rss = {}
    for name in ("small", "qm9"):
        out = subprocess.run([sys.executable, __file__, "--rss-child", str(tmp / name), "40"],
                             capture_output=True, text=True, check=True)
        rss[name] = json.loads(out.stdout.strip().splitlines()[-1])["rss_mb"]
    print(f"loader RSS: {len(small)} samples {rss['small']:.0f} MB, {len(qm9)} samples {rss['qm9']:.0f} MB "
          f"(+{rss['qm9'] / rss['small'] - 1:.1%} for 10x the data)")


if __name__ == "__main__":
    main()
