"""Container converters vs the bare library read of the same records, and peak memory of a large HDF5 ingest.

    python benchmarks/bench_containers.py speed [--records 10000] [--atoms 20] [--repeat 3]
    python benchmarks/bench_containers.py memory [--gb 0.25] [--atoms 64] [--per-unit 20000] [--ray] [--keep F]

`speed` writes one file per format in a temporary folder (SPICE and ANI-1x HDF5, rMD17 npz stored and
MD17 npz compressed, Parquet with nested lists, ASE SQLite and aselmdb) and times, alternated and best of
``--repeat``, our converter (``safe_convert``: every record to a validated ``AtomGraph``) against the bare
library read of the same records one at a time (h5py slices, numpy indexing of ``np.load``, pyarrow batches
to Python rows, ``ase.db`` row iteration). Goal: ours >= 0.8x the bare records/s. The last column adds to the
bare read the cost of building the same number of validated records from arrays already in memory (the
schema's own per-record cost), i.e. it shows what the converter adds beyond reading and the schema.

`memory` writes a SPICE-layout HDF5 file of ``--gb`` gigabytes (chunk by chunk) and ingests it with one
worker into shards: by default in one plain process running the planned units in turn (``plan_units`` +
``run_unit``, what one Ray worker does), with ``--ray`` as a real ``run_job`` with ``workers=1``. It prints the
peak RSS (VmHWM) of every process of the ingest (goal < 1 GB for the worker).
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ingest.plugin import safe_convert
from ingest.registry import get_converter

SPICE_GROUP = 50  # conformations per group in the speed files


def _ours(name: str, path: Path, options: dict | None = None) -> Callable[[], int]:
    conv = get_converter(name)()
    opts = conv.parse_options(options or {})
    return lambda: sum(1 for _ in safe_convert(conv, path, opts, source="bench", file_id=path.name))


# --- files ------------------------------------------------------------------------------------------------


def _z(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(np.array([1, 1, 1, 6, 6, 7, 8]), size=n)


def write_spice(path: Path, groups: int, conformations: int, atoms: int, seed: int = 0) -> Path:
    """A SPICE-layout file: one group per molecule, bohr / Ha / Ha per bohr."""
    import h5py

    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as h5:
        for g in range(groups):
            grp = h5.create_group(f"mol{g:07d}")
            grp["atomic_numbers"] = _z(atoms, rng).astype(np.int16)
            grp["conformations"] = rng.normal(scale=3.0, size=(conformations, atoms, 3)).astype(np.float32)
            grp["dft_total_energy"] = rng.normal(-400.0, 1.0, size=conformations)
            grp["dft_total_gradient"] = rng.normal(scale=0.01, size=(conformations, atoms, 3)).astype(np.float32)
            grp["formation_energy"] = rng.normal(-1.0, 0.1, size=conformations)
            grp.create_dataset("smiles", data=["CCO"], dtype=h5py.string_dtype())
            grp.create_dataset("subset", data=["bench"], dtype=h5py.string_dtype())
    return path


def write_ani(path: Path, groups: int, conformations: int, atoms: int, seed: int = 1) -> Path:
    """An ANI-1x-layout file: one group per formula, Å / Ha / Ha per Å."""
    import h5py

    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as h5:
        for g in range(groups):
            grp = h5.create_group(f"C{g}H{atoms}")
            grp["atomic_numbers"] = _z(atoms, rng).astype(np.uint8)
            grp["coordinates"] = rng.normal(scale=2.0, size=(conformations, atoms, 3)).astype(np.float32)
            grp["wb97x_dz.energy"] = rng.normal(-400.0, 1.0, size=conformations)
            grp["wb97x_dz.forces"] = rng.normal(scale=0.01, size=(conformations, atoms, 3)).astype(np.float32)
            grp["ccsd(t)_cbs.energy"] = rng.normal(-400.0, 1.0, size=conformations)
    return path


def write_npz(path: Path, frames: int, atoms: int, layout: str, seed: int = 2) -> Path:
    rng = np.random.default_rng(seed)
    z = _z(atoms, rng)
    r = rng.normal(scale=2.0, size=(frames, atoms, 3))
    e = rng.normal(-1e5, 10.0, size=frames)
    f = rng.normal(scale=10.0, size=(frames, atoms, 3))
    if layout == "rmd17":
        np.savez(path, nuclear_charges=z, coords=r, energies=e, forces=f, old_indices=np.arange(frames))
    else:
        np.savez_compressed(path, z=z, R=r, E=e[:, None], F=f, name=np.array("bench"))
    return path


def write_parquet(path: Path, rows: int, atoms: int, seed: int = 3) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    pos = rng.normal(scale=2.0, size=(rows, atoms, 3))
    frc = rng.normal(size=(rows, atoms, 3))
    flat = pa.array(pos.reshape(-1))
    nested = pa.ListArray.from_arrays(np.arange(rows + 1, dtype=np.int32) * atoms,
                                      pa.FixedSizeListArray.from_arrays(flat, 3))
    forces = pa.ListArray.from_arrays(np.arange(rows + 1, dtype=np.int32) * atoms,
                                      pa.FixedSizeListArray.from_arrays(pa.array(frc.reshape(-1)), 3))
    numbers = pa.ListArray.from_arrays(np.arange(rows + 1, dtype=np.int32) * atoms,
                                       pa.array(np.tile(_z(atoms, rng), rows).astype(np.int8)))
    table = pa.table({"numbers": numbers, "positions": nested, "forces": forces,
                      "energy": rng.normal(size=rows), "charge": np.zeros(rows, dtype=np.int8)})
    pq.write_table(table, path, row_group_size=4096)
    return path


PARQUET_OPTIONS = {"columns": {"atomic_numbers": "numbers", "positions": "positions", "forces": "forces",
                               "energy": "energy", "charge": "charge"}}


def write_asedb(path: Path, rows: int, atoms: int, backend: str, seed: int = 4) -> Path:
    import ase.db
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    db = ase.db.connect(str(path), type=backend)
    with db:
        for _ in range(rows):
            a = Atoms(numbers=_z(atoms, rng), positions=rng.uniform(0, 8, size=(atoms, 3)), cell=np.eye(3) * 8,
                      pbc=True)
            a.calc = SinglePointCalculator(a, energy=float(rng.normal()), forces=rng.normal(size=(atoms, 3)),
                                           stress=rng.normal(size=6))
            db.write(a, charge=0, spin=1)
    return path


# --- bare reads -------------------------------------------------------------------------------------------


def bare_h5(path: Path, positions: str, energy: str, forces: str, extra: tuple[str, ...] = (),
            per_group: tuple[str, ...] = ()) -> Callable[[], int]:
    """h5py: per record one slice of each per-conformation dataset (the map-style dataset read), of the same
    datasets our converter reads: the labels, the ``extra`` per-conformation energies it keeps as properties, and
    the ``per_group`` datasets it reads once per group (SPICE's SMILES, for the total charge)."""
    def run() -> int:
        import h5py

        n = 0
        with h5py.File(path, "r") as h5:
            for name in h5:
                g = h5[name]
                z = g["atomic_numbers"][()]
                shared = [g[k][()] for k in per_group]
                pos, e, f = g[positions], g[energy], g[forces]
                more = [g[k] for k in extra]
                for i in range(pos.shape[0]):
                    rec = (z, pos[i], e[i], f[i], [m[i] for m in more], shared)
                    n += rec[1].shape[0] > 0
        return n
    return run


def bare_npz(path: Path, keys: tuple[str, str, str, str], extra: str | None = None) -> Callable[[], int]:
    """numpy: ``np.load`` (no pickle), then per frame the frame's arrays (and the ``extra`` per-frame value our
    converter keeps as a property: rMD17's ``old_indices``)."""
    def run() -> int:
        with np.load(path, allow_pickle=False) as data:
            z, r, e, f = (data[k] for k in keys)
            x = data[extra] if extra else np.zeros(len(r))
        n = 0
        for i in range(r.shape[0]):
            rec = (z, np.array(r[i]), float(e[i].reshape(-1)[0]), np.array(f[i]), float(x[i]))
            n += rec[1].shape[0] > 0
        return n
    return run


def bare_parquet(path: Path) -> Callable[[], int]:
    """pyarrow: record batches of the same columns, rows as arrays."""
    def run() -> int:
        import pyarrow.parquet as pq

        n = 0
        with pq.ParquetFile(path) as pf:
            for batch in pf.iter_batches(batch_size=1024, columns=["numbers", "positions", "forces", "energy",
                                                                   "charge"]):
                d = batch.to_pydict()
                for i in range(batch.num_rows):
                    rec = (np.asarray(d["numbers"][i]), np.asarray(d["positions"][i]), d["energy"][i],
                           np.asarray(d["forces"][i]), d["charge"][i])
                    n += rec[1].shape[0] > 0
        return n
    return run


def bare_asedb(path: Path, backend: str) -> Callable[[], int]:
    """ase.db: row iteration with the fields a sample needs."""
    def run() -> int:
        import ase.db

        db = ase.db.connect(str(path), type=backend, **({"readonly": True} if backend == "aselmdb" else {}))
        n = 0
        for row in db.select():
            rec = (row.numbers, row.positions, row.cell, row.pbc, row.get("energy"), row.get("forces"),
                   row.get("stress"), row.key_value_pairs.get("charge"), row.key_value_pairs.get("spin"))
            n += rec[1].shape[0] > 0
        if hasattr(db, "close"):
            db.close()
        return n
    return run


def schema_floor(n: int, atoms: int) -> float:
    """Seconds to build ``n`` validated records of ``atoms`` atoms from arrays already in memory (key, energy,
    forces): the cost every converter pays per record, whatever it reads."""
    from ingest.plugin import owned
    from shards.format.schema import NO_PBC, ZERO_CELL, AtomGraph, make_key

    rng = np.random.default_rng(5)
    z = owned(_z(atoms, rng), np.uint8)
    pos = [owned(rng.normal(size=(atoms, 3)), np.float32) for _ in range(64)]
    t0 = time.perf_counter()
    for i in range(n):
        AtomGraph(key=make_key("bench", "file", i), domain="molecule", source="bench", source_file="file", index=i,
                  atomic_numbers=z, positions=pos[i % 64], cell=ZERO_CELL, pbc=NO_PBC, energy=float(i),
                  forces=pos[(i + 1) % 64])
    return time.perf_counter() - t0


def _best_pair(bare: Callable[[], int], ours: Callable[[], int], repeat: int) -> tuple[float, int, float, int]:
    """Best-of-``repeat`` times of both, alternated so that load from other processes hits both alike."""
    t_bare = t_ours = float("inf")
    n_bare = n_ours = 0
    for _ in range(repeat):
        for fn, is_bare in ((bare, True), (ours, False)):
            gc.collect()  # neither side pays for collecting the other's garbage (parsers leave reference cycles)
            t0 = time.perf_counter()
            n = fn()
            dt = time.perf_counter() - t0
            if is_bare:
                t_bare, n_bare = min(t_bare, dt), n
            else:
                t_ours, n_ours = min(t_ours, dt), n
    return t_bare, n_bare, t_ours, n_ours


def speed(records: int, atoms: int, repeat: int, db_rows: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-containers-"))
    try:
        groups = max(1, records // SPICE_GROUP)
        spice = write_spice(tmp / "spice.hdf5", groups, SPICE_GROUP, atoms)
        ani = write_ani(tmp / "ani1x.h5", groups, SPICE_GROUP, atoms)
        rmd17 = write_npz(tmp / "rmd17.npz", records, atoms, "rmd17")
        md17 = write_npz(tmp / "md17.npz", records, atoms, "md17")
        table = write_parquet(tmp / "hub.parquet", records, atoms)
        sqlite = write_asedb(tmp / "omat.db", db_rows, atoms, "db")
        lmdb = write_asedb(tmp / "omat.aselmdb", db_rows, atoms, "aselmdb")
        cases = [
            ("hdf5 SPICE", _ours("hdf5", spice), bare_h5(spice, "conformations", "dft_total_energy",
                                                         "dft_total_gradient", ("formation_energy",), ("smiles",))),
            ("hdf5 ANI-1x", _ours("hdf5", ani), bare_h5(ani, "coordinates", "wb97x_dz.energy", "wb97x_dz.forces",
                                                        ("ccsd(t)_cbs.energy",))),
            ("npz rMD17 (stored)", _ours("npz", rmd17), bare_npz(rmd17, ("nuclear_charges", "coords", "energies",
                                                                          "forces"), "old_indices")),
            ("npz MD17 (deflated)", _ours("npz", md17), bare_npz(md17, ("z", "R", "E", "F"))),
            ("parquet nested lists", _ours("parquet", table, PARQUET_OPTIONS), bare_parquet(table)),
            ("ase.db SQLite", _ours("ase_db", sqlite), bare_asedb(sqlite, "db")),
            ("ase.db aselmdb", _ours("ase_db", lmdb), bare_asedb(lmdb, "aselmdb")),
        ]
        floor = min(schema_floor(records, atoms) for _ in range(repeat)) / records
        print(f"{atoms} atoms per record; best of {repeat}, alternated; building a validated record from arrays in "
              f"memory costs {floor * 1e6:.0f} us ({1 / floor:.0f} rec/s)")
        print(f"{'case':<24}{'records':>9}{'ours rec/s':>12}{'bare rec/s':>12}{'ours/bare':>11}"
              f"{'ours/(bare+schema)':>20}")
        worst = float("inf")
        for label, ours, bare in cases:
            t_bare, n_bare, t_ours, n_ours = _best_pair(bare, ours, repeat)
            if n_bare != n_ours:
                raise SystemExit(f"{label}: ours yielded {n_ours} items, the bare read {n_bare} records")
            ratio = (n_ours / t_ours) / (n_bare / t_bare)
            worst = min(worst, ratio)
            with_schema = (t_bare + floor * n_bare) / t_ours
            print(f"{label:<24}{n_ours:>9}{n_ours / t_ours:>12.0f}{n_bare / t_bare:>12.0f}{ratio:>11.2f}"
                  f"{with_schema:>20.2f}")
        print(f"lowest ours/bare {worst:.2f} (goal >= 0.8)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- memory -----------------------------------------------------------------------------------------------

INGEST_PLAIN = """
import sys
from ingest.job import JobConfig, SourceSpec, plan_units
from ingest.unit import run_unit
cfg = JobConfig(sys.argv[2], (SourceSpec("spice", (sys.argv[1],), "hdf5", records_per_unit=int(sys.argv[3])),))
n = 0
for u in plan_units(cfg):
    n += run_unit(u, sys.argv[2], cfg.writer)["inputs"]
print("records", n)
"""

INGEST_RAY = """
import sys
from ingest.job import JobConfig, SourceSpec
from ingest.run import run_job
cfg = JobConfig(sys.argv[2], (SourceSpec("spice", (sys.argv[1],), "hdf5", records_per_unit=int(sys.argv[3])),))
res = run_job(cfg, workers=1, progress=False)
print("units", res.units, "failed", len(res.failed), "accounting", res.accounting)
"""


def _descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    parents[int(d)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += [c for c, p in parents.items() if p == pid]
    return out


def _hwm(pid: int) -> tuple[int, str] | None:
    """Peak RSS (kB) and command line of a live process."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            hwm = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = " ".join(fh.read().replace(b"\0", b" ").decode(errors="replace").split())[:70]
        return hwm, cmd
    except (OSError, StopIteration, ValueError):
        return None


def memory(gb: float, atoms: int, per_unit: int, use_ray: bool, keep: Path | None) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-containers-mem-"))
    try:
        path = keep if keep is not None else tmp / "spice-large.hdf5"
        if not path.is_file():
            per_conf = atoms * 3 * 4 * 2 + 16
            conformations = 500
            groups = max(1, int(gb * 1024 ** 3 / (per_conf * conformations)))
            t0 = time.perf_counter()
            write_spice(path, groups, conformations, atoms)
            print(f"wrote {path.name}: {groups * conformations} conformations of {atoms} atoms in "
                  f"{time.perf_counter() - t0:.0f} s")
        print(f"input {path}: {path.stat().st_size / 1024 ** 3:.2f} GiB")
        script = INGEST_RAY if use_ray else INGEST_PLAIN
        out = tmp / "out"
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", script, str(path), str(out), str(per_unit)],
                                stdout=subprocess.PIPE, text=True)
        peaks: dict[int, tuple[int, str]] = {}
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                for pid in _descendants(proc.pid):
                    got = _hwm(pid)
                    if got is not None:
                        peaks[pid] = max(peaks.get(pid, (0, "")), got)
                done.wait(0.5)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        stdout, _ = proc.communicate()
        done.set()
        watcher.join()
        elapsed = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(f"ingest failed with exit status {proc.returncode}")
        shards = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        print(f"ingest ({'run_job, workers=1' if use_ray else 'one process, units in turn'}): {stdout.strip()} in "
              f"{elapsed:.0f} s; output {shards / 1024 ** 3:.2f} GiB")
        print(f"{'peak RSS MB':>12}  process")
        for hwm, cmd in sorted(peaks.values(), reverse=True)[:6]:
            print(f"{hwm / 1024:>12.0f}  {cmd}")
        top = max(h for h, _ in peaks.values()) / 1024 if peaks else float("nan")
        print(f"largest process peak {top:.0f} MB (goal < 1024 MB)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--records", type=int, default=10000)
    s.add_argument("--db-rows", type=int, default=2000, help="rows of the ASE databases (slow to write)")
    s.add_argument("--atoms", type=int, default=20)
    s.add_argument("--repeat", type=int, default=3)
    m = sub.add_parser("memory")
    m.add_argument("--gb", type=float, default=0.25, help="size of the HDF5 file in GiB")
    m.add_argument("--atoms", type=int, default=64)
    m.add_argument("--per-unit", type=int, default=20000, help="records per unit")
    m.add_argument("--ray", action="store_true", help="run_job with one Ray worker instead of one plain process")
    m.add_argument("--keep", type=Path, help="HDF5 file to reuse, or to write and keep (default: a temporary one)")
    args = ap.parse_args(argv)
    if args.cmd == "speed":
        speed(args.records, args.atoms, args.repeat, args.db_rows)
    else:
        memory(args.gb, args.atoms, args.per_unit, args.ray, args.keep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
