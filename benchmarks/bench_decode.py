"""Decode throughput from shards on one core: QM9-size molecules and ~3,300-atom proteins.

Compares (a) our reader (decode + validate, no graph), (b) the raw read speed of the same tar bytes
(``cat`` to /dev/null, page cache warm), and (c) the plain ``webdataset`` pipeline decoding one ``.npy``
member per field, its default way. Usage: ``python benchmarks/bench_decode.py [--molecules 20000]``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from shards.format.manifest import write_dataset
from shards.format.reader import ShardDataset
from shards.format.schema import AtomGraph, make_key


def qm9_graphs(limit: int) -> list[AtomGraph]:
    """The first ``limit`` QM9 molecules of qm9pack's first CSV (labels in eV)."""
    from scd_train.datakit import qm9_csv
    from shards.format.qm9 import iter_qm9_csv

    return list(iter_qm9_csv(qm9_csv(1), max_records=limit))


def protein_graphs(copies: int) -> list[AtomGraph]:
    from ase.data import atomic_numbers
    from Bio.PDB import PDBParser
    from MDAnalysisTests.datafiles import PDB_small

    atoms = list(PDBParser(QUIET=True).get_structure("adk", PDB_small)[0].get_atoms())
    z = [atomic_numbers[(a.element.capitalize() if a.element not in ("", "X") else a.get_name()[0])] for a in atoms]
    pos = np.array([a.coord for a in atoms], dtype=np.float64)
    rng = np.random.default_rng(0)
    return [AtomGraph(key=make_key("adk", "adk_open.pdb", i), domain="protein", source="adk",
                      source_file="adk_open.pdb", index=i, atomic_numbers=z,
                      positions=pos + rng.normal(scale=0.1, size=pos.shape), cell=np.zeros((3, 3)),
                      pbc=np.zeros(3, bool), residue_index=np.arange(len(z)) // 10) for i in range(copies)]


def write_wds_npy(graphs: list[AtomGraph], out: Path, per_shard: int) -> list[str]:
    """The same data the way people write WebDataset today: one .npy member per field."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    pattern = str(out / "wds-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for g in graphs:
            sample = {"__key__": g.key, "atomic_numbers.npy": np.asarray(g.atomic_numbers),
                      "positions.npy": np.asarray(g.positions), "cell.npy": np.asarray(g.cell),
                      "pbc.npy": np.asarray(g.pbc)}
            if g.residue_index is not None:
                sample["residue_index.npy"] = np.asarray(g.residue_index)
            sink.write(sample)
    return sorted(str(p) for p in out.glob("wds-*.tar"))


def drop_caches() -> bool:
    """Empty the page cache (root only) so that reads come from the storage device."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("1\n")
        return True
    except OSError:
        return False


def cold_rates(root: Path, files: list[str]) -> tuple[float, float] | None:
    """(cat MB/s, ours MB/s) with an empty page cache before each, or None without permission."""
    total = sum(os.path.getsize(f) for f in files)
    if not drop_caches():
        return None
    t = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    cat = total / (time.perf_counter() - t)
    drop_caches()
    t = time.perf_counter()
    sum(1 for _ in ShardDataset(str(root)))
    return cat, total / (time.perf_counter() - t)


def cat_rate(files: list[str], repeats: int = 3) -> float:
    """Bytes/s of ``cat`` over the files (page cache warm)."""
    total = sum(os.path.getsize(f) for f in files)
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
        best = min(best, time.perf_counter() - t)
    return total / best


def ours(root: Path) -> tuple[float, float, int]:
    ds = ShardDataset(str(root))
    list(ds)  # warm
    best, n = float("inf"), 0
    for _ in range(3):
        t = time.perf_counter()
        n = sum(1 for _ in ds)
        best = min(best, time.perf_counter() - t)
    nbytes = sum(s["n_bytes"] for s in ds.manifest["shards"])
    return n / best, nbytes / best, n


def wds_rate(files: list[str]) -> float:
    import webdataset as wds

    def run() -> int:
        return sum(1 for _ in wds.WebDataset(files, shardshuffle=False).decode())

    run()
    t = time.perf_counter()
    n = run()
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--molecules", type=int, default=20000)
    ap.add_argument("--proteins", type=int, default=300)
    args = ap.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    tmp = Path(tempfile.mkdtemp(prefix="bench-decode-"))
    try:
        sets = (("QM9 molecules", qm9_graphs(args.molecules)), ("proteins", protein_graphs(args.proteins)))
        for label, graphs in sets:
            root = tmp / label.split()[0]
            write_dataset(graphs, root)
            files = sorted(str(p) for p in root.glob("*.tar"))
            sps, bps, n = ours(root)
            raw = cat_rate(files)
            wds_files = write_wds_npy(graphs, tmp / f"wds-{label.split()[0]}", per_shard=50_000)
            base = wds_rate(wds_files)
            atoms = sum(g.n_atoms for g in graphs) / len(graphs)
            print(f"{label}: {n} samples, {atoms:.0f} atoms/sample, {sum(map(os.path.getsize, files)) / 1e6:.1f} MB")
            print(f"  ours (decode+validate, 1 core): {sps:,.0f} samples/s, {bps / 1e6:,.0f} MB/s")
            print(f"  raw read (cat):                 {raw / 1e6:,.0f} MB/s -> ours = {bps / raw:.0%} of raw")
            print(f"  webdataset .npy per field:      {base:,.0f} samples/s -> ours / webdataset = {sps / base:.1f}x")
            cold = cold_rates(root, files)
            if cold:
                print(f"  cold page cache: cat {cold[0] / 1e6:,.0f} MB/s, ours {cold[1] / 1e6:,.0f} MB/s "
                      f"-> ours = {cold[1] / cold[0]:.0%} of raw")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
