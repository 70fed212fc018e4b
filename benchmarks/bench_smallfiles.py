"""Small-file corpora: `run_job` (1 and 2 workers) vs a plain single-process loop of the same library parse,
shards vs the fewest the target size allows, and planning time / driver memory for 100,000 files.

    python benchmarks/bench_smallfiles.py speed [--files 10000] [--formats sdf pdb cif] [--repeat 1]
    python benchmarks/bench_smallfiles.py plan [--files 100000]
    python benchmarks/bench_smallfiles.py profile [--files 256] [--formats sdf pdb cif]
    python benchmarks/bench_smallfiles.py sdf-floor [--files 1000] [--repeat 5]

`speed` copies data-kit files under distinct names (SDF: egfr.sdf cut into one-molecule files; PDB: small
MDAnalysisTests proteins; CIF: ASE's COD minerals), ``--files`` in all, split evenly over ``--formats``. Per
format it warms both sides up (imports, untimed), then alternates the plain loop (RDKit ForwardSDMolSupplier /
Biopython PDBParser / pymatgen CifParser on each file), `run_job` with 1 worker and with 2 workers, each on a local
Ray of that many CPUs as `scd ingest run --workers N` starts it (restarted and warmed up, untimed, between them),
and prints records/s (best of ``--repeat``), the ratios and the load average (the machine may be shared).
Goals: ray1/plain >= 0.8, ray2/ray1 >= 1.6, shards <= 2x the minimum.
`plan` hard-links one file under ``--files`` names and plans the job in a fresh process: seconds and peak RSS of
the driver. `profile` splits one unit of ``--files`` files of each format into conversion, sniffing, shard writing,
fsync and outcome files, times the driver's packing of the tails of the job's units, and a Ray task round trip.
`sdf-floor` measures the least any RDKit-based conversion can cost over the bare parse: the bare parse, then the
parse plus reading the atomic numbers, then plus every array the schema needs (atomic numbers, positions, bonds
and their orders, charge: the fastest RDKit calls found, nothing validated, no record built), then plus writing
those arrays with a sha256 (one-file corpus only), and ours; on egfr.sdf (the converter benchmark's case) and on
``--files`` one-molecule files (ours: the job's units run in this process, as a Ray worker runs them).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ingest.job import JobConfig, SourceSpec
from ingest.plugin import safe_convert
from ingest.registry import get_converter
from ingest.run import run_job
from scd_train.datakit import package_dir
from shards.format.audit import shard_sizes
from shards.format.writer import WriterConfig

PDBS = ("adk_open_10res.pdb", "A6PA6_alpha.pdb", "1grm_single.pdb")


def _make_corpus(fmt: str, folder: Path, n: int) -> list[Path]:
    """``n`` files of one format under distinct names."""
    folder.mkdir(parents=True)
    if fmt == "sdf":
        text = (package_dir("rdkit") / "Contrib/PBF/testData/egfr.sdf").read_text()
        seeds = [b.encode() + b"$$$$\n" for b in text.split("$$$$\n") if b.strip()]
    elif fmt == "pdb":
        data = package_dir("MDAnalysisTests") / "data"
        seeds = [(data / name).read_bytes() for name in PDBS]
    else:
        seeds = [p.read_bytes() for p in sorted((package_dir("ase") / "test/testdata/minerals").glob("*.cif"))]
    paths = []
    for i in range(n):
        paths.append(folder / f"f{i:06d}.{fmt}")
        paths[-1].write_bytes(seeds[i % len(seeds)])
    return paths


def _plain(fmt: str, paths: list[Path]) -> int:
    """The bare library parse of every file, one process, no conversion or writing."""
    n = 0
    if fmt == "sdf":
        from rdkit import Chem, RDLogger

        RDLogger.DisableLog("rdApp.*")
        for p in paths:
            with open(p, "rb") as fh:
                n += sum(1 for m in Chem.ForwardSDMolSupplier(fh, removeHs=False) if m is not None)
    elif fmt == "pdb":
        from Bio.PDB import PDBParser

        parser = PDBParser(QUIET=True)
        for p in paths:
            n += len(parser.get_structure(p.stem, str(p)))
    else:
        from pymatgen.io.cif import CifParser

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for p in paths:
                n += len(CifParser(p).parse_structures(primitive=False))
    return n


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    res = fn()
    return time.perf_counter() - t0, res


def speed(files: int, formats: list[str], repeat: int) -> None:
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="bench-smallfiles-"))
    try:
        corpora = {fmt: _make_corpus(fmt, tmp / fmt, files // len(formats)) for fmt in formats}
        print(f"{'format':<7}{'files':>7}{'records':>9}{'units':>7}{'plain rec/s':>12}{'ray1 rec/s':>11}"
              f"{'ray2 rec/s':>11}{'ray1/plain':>11}{'ray2/ray1':>10}{'shards':>8}{'minimum':>8}  load avg")
        for fmt, paths in corpora.items():
            _warm_up(fmt, tmp / f"warm-{fmt}", 0)
            best: dict[str, float] = {}
            n, res, sizes = 0, None, {}
            for r in range(repeat):
                for mode in ("plain", "ray1", "ray2"):
                    if mode == "plain":
                        t, n = _timed(lambda fmt=fmt, paths=paths: _plain(fmt, paths))
                    else:
                        workers = int(mode[-1])
                        _warm_up(fmt, tmp / f"warm-{fmt}", workers)
                        cfg = JobConfig(str(tmp / f"{fmt}-{mode}-{r}"),
                                        (SourceSpec(fmt, (str(paths[0].parent / "*"),)),), WriterConfig())
                        t, res = _timed(lambda cfg=cfg, w=workers: run_job(cfg, workers=w, progress=False))
                        sizes = shard_sizes(json.loads((cfg.output_dir() / "manifest.json").read_bytes()))
                        shutil.rmtree(cfg.output_dir())
                    best[mode] = min(best.get(mode, float("inf")), t)
            load = " ".join(f"{x:.1f}" for x in os.getloadavg())
            recs = res.accounting["total"]["accepted"] if res else 0
            print(f"{fmt:<7}{len(paths):>7}{recs:>9}{res.units if res else 0:>7}{n / best['plain']:>12,.0f}"
                  f"{recs / best['ray1']:>11,.0f}{recs / best['ray2']:>11,.0f}"
                  f"{(recs / best['ray1']) / (n / best['plain']):>11.2f}{best['ray1'] / best['ray2']:>10.2f}"
                  f"{sizes.get('shards', 0):>8}{sizes.get('minimum', 0):>8}  {load}")
        print("goals: ray1/plain >= 0.8, ray2/ray1 >= 1.6 (needs 2 idle cores: compare with the load average), "
              "shards <= 2x minimum")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()


def _warm_up(fmt: str, folder: Path, workers: int) -> None:
    """Both sides start warm: ``workers`` 0 imports the format's libraries for the plain loop; otherwise Ray is
    started as ``scd ingest run --workers N`` starts it (N CPUs, unless it already has them) and each of its
    workers imports them once, untimed (a fresh worker spends seconds importing Biopython, ASE or pymatgen, once
    per process, not per corpus)."""
    import ray

    if workers and ray.is_initialized():
        if int(ray.cluster_resources().get("CPU", 0)) == workers:
            return
        ray.shutdown()
    warm = _make_corpus(fmt, folder, 100)
    try:
        if not workers:
            _plain(fmt, warm[:10])
            return
        ray.init(address="local", num_cpus=workers, include_dashboard=False, logging_level="ERROR")
        out = folder.with_name(folder.name + "-out")
        run_job(JobConfig(str(out), (SourceSpec("w", (str(folder / "*"),), files_per_unit=10),)), workers=workers,
                progress=False)
        shutil.rmtree(out)
    finally:
        shutil.rmtree(folder)


_LABELS = {"sdf": "one-molecule SDF", "pdb": "small PDB", "cif": "COD CIF"}
_PARSERS = {"sdf": "RDKit", "pdb": "Biopython", "cif": "pymatgen"}


def profile(files: int, formats: list[str]) -> None:
    """Where one small-file unit spends its time (in process), per format, and the cost of a Ray task round
    trip."""
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="bench-unit-"))
    try:
        for fmt in formats:
            paths = _make_corpus(fmt, tmp / fmt, files)
            _profile_unit(fmt, paths, tmp / f"{fmt}-out")
            _profile_pack(fmt, paths, tmp / f"{fmt}-units")
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
        noop = ray.remote(num_cpus=1)(lambda: None)
        ray.get([noop.remote() for _ in range(10)])
        t_task, _ = _timed(lambda: [ray.get(noop.remote()) for _ in range(50)])
        print(f"Ray task round trip {t_task / 50 * 1e3:.1f} ms (once per unit); load average "
              f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _profile_unit(fmt: str, paths: list[Path], out: Path) -> None:
    import cProfile
    import pstats

    from ingest.job import plan_units
    from ingest.unit import run_unit

    files = len(paths)
    cfg = JobConfig(str(out), (SourceSpec("p", (str(paths[0].parent / "*"),), files_per_unit=files),))
    unit = plan_units(cfg)[0]
    t_import, _ = _timed(lambda: run_unit(unit, str(out.with_name(out.name + "-warm")), cfg.writer))  # imports
    t_unit, _ = _timed(lambda: run_unit(unit, str(out), cfg.writer))
    t_bare, _ = _timed(lambda: _plain(fmt, paths))
    prof = cProfile.Profile()
    prof.runcall(run_unit, unit, str(out), cfg.writer)
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = sum(v[3] for k, v in stats.items() if k[2] == "run_unit")
    parts = {"converter (parse + graph + validation)": "convert", "sniffing (converter_for)": "sniff",
             "shard writing (encode + tar)": "add_encoded", "fsync": "fsync", "outcome/index files": "write_atomic"}
    print(f"unit of {files} {_LABELS[fmt]} files: first run (imports) {t_import:.2f}s, warm {t_unit:.2f}s "
          f"({t_unit / files * 1e3:.2f} ms/file), bare {_PARSERS[fmt]} loop {t_bare / files * 1e3:.2f} ms/file")
    for label, fn in parts.items():
        cum = sum(v[3] for k, v in stats.items() if k[2] == fn or k[2].endswith(f".{fn}>"))
        print(f"  {label:<42}{100 * cum / total:5.1f}% of the unit (profiled)")


def sdf_floor(files: int, repeat: int) -> None:
    """Paired, alternated rounds of the SDF floor steps (see the module docstring); best time per step and the
    median of the per-round ratios to the bare parse."""
    from rdkit import Chem, RDLogger

    from ingest.job import plan_units
    from ingest.unit import run_unit

    RDLogger.DisableLog("rdApp.*")
    egfr = package_dir("rdkit") / "Contrib/PBF/testData/egfr.sdf"
    conv = get_converter("sdf")()
    opts = conv.parse_options({})
    tmp = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    try:
        paths = _make_corpus("sdf", tmp / "sdf", files)
        cfg = JobConfig(str(tmp / "out"), (SourceSpec("sdf", (str(paths[0].parent / "*"),)),))
        units = plan_units(cfg)

        def parse(files: list[Path], level: int, sink: Any = None) -> int:
            n = 0
            for p in files:
                with open(p, "rb") as fh:
                    for mol in Chem.ForwardSDMolSupplier(fh, removeHs=False):
                        if mol is not None:
                            n += 1
                            if level:
                                _floor_arrays(Chem, mol, level, sink)
            return n

        def ours_units() -> int:
            shutil.rmtree(tmp / "out", ignore_errors=True)
            return sum(run_unit(u, str(tmp / "out"), cfg.writer).accepted for u in units)

        def written(level: int) -> int:
            with open(tmp / "arrays.bin", "wb") as sink:
                return parse(paths, level, sink)

        cases = {"egfr.sdf": {
                     "bare parse": lambda: parse([egfr], 0), "+ atomic numbers": lambda: parse([egfr], 1),
                     "+ all arrays (floor)": lambda: parse([egfr], 2),
                     "ours (converter)": lambda: sum(1 for _ in safe_convert(conv, egfr, opts, source="b",
                                                                             file_id="egfr.sdf"))},
                 f"{files} one-molecule files": {
                     "bare parse": lambda: parse(paths, 0), "+ atomic numbers": lambda: parse(paths, 1),
                     "+ all arrays": lambda: parse(paths, 2), "+ arrays written (floor)": lambda: written(3),
                     f"ours ({len(units)} units in process)": ours_units}}
        for name, steps in cases.items():
            times: dict[str, list[float]] = {k: [] for k in steps}
            for _ in range(repeat + 1):  # the first round warms up
                for label, fn in steps.items():
                    times[label].append(_timed(fn)[0])
            base = times["bare parse"][1:]
            n = steps["bare parse"]()
            print(f"{name} ({n} records): per record, best of {repeat}; ratio = median over rounds of time / bare "
                  "parse")
            for label, ts in times.items():
                ratio = statistics.median(t / b for t, b in zip(ts[1:], base, strict=True))
                print(f"  {label:<32}{min(ts[1:]) / n * 1e6:8.1f} us{ratio:8.2f}")
        print("goals: converter <= 1.25 (time over the bare parse); 1 worker >= 0.8x the plain loop, i.e. <= 1.25 "
              f"in time. Load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _floor_arrays(chem: Any, mol: Any, level: int, sink: Any) -> None:
    """The arrays a record needs from an RDKit molecule, by the fastest calls found and nothing more (no copies,
    no casts, no checks); level 1: atomic numbers only; 3: also written with their sha256 to ``sink``."""
    z = np.array(list(map(chem.Atom.GetAtomicNum, map(mol.GetAtomWithIdx, range(mol.GetNumAtoms())))), np.uint8)
    if level < 2:
        return
    pos = mol.GetConformer().GetPositions()
    order = chem.GetAdjacencyMatrix(mol, useBO=True)
    i, j = np.nonzero(order)
    upper = i < j
    i, j = i[upper], j[upper]
    charge = chem.GetFormalCharge(mol)
    if level > 2:
        data = b"".join((z.tobytes(), pos.tobytes(), i.tobytes(), j.tobytes(), order[i, j].tobytes(),
                         charge.to_bytes(8, "little", signed=True)))
        sink.write(data)
        hashlib.sha256(data).digest()


def _profile_pack(fmt: str, paths: list[Path], out: Path) -> None:
    """The driver's packing of the units' tails (default unit budget), best of three."""
    from ingest.job import plan_units
    from ingest.unit import TAILS_DIR, run_unit
    from shards.tools.compact import pack_local

    cfg = JobConfig(str(out), (SourceSpec("p", (str(paths[0].parent / "*"),)),))
    tails = [(out / TAILS_DIR / o.tail.name, o.tail.sha256)
             for o in (run_unit(u, str(out), cfg.writer) for u in plan_units(cfg)) if o.tail is not None]
    best = min(_timed(lambda r=r: pack_local(tails, out.with_name(f"{out.name}-pack{r}"), "pack", cfg.writer))[0]
               for r in range(3))
    print(f"  packing the {len(tails)} units' tails ({len(paths)} samples) into target-size shards: "
          f"{best / len(paths) * 1e6:.1f} us per sample")


def _plan_child(folder: str) -> None:
    from ingest.job import plan_units

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t, units = _timed(lambda: plan_units(JobConfig(str(Path(folder) / "out"),
                                                   (SourceSpec("many", (f"{folder}/files/*.cif",)),))))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    files = sum(len(u.items) for u in units)  # type: ignore[attr-defined]
    print(f"planned {files} files into {len(units)} units in {t:.2f}s; driver peak RSS {rss:.0f} MB "
          f"({rss - rss0:.0f} MB over the {rss0:.0f} MB after imports)")


def plan(files: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-plan-"))
    try:
        (tmp / "files").mkdir()
        seed = sorted((package_dir("ase") / "test/testdata/minerals").glob("*.cif"))[0]
        for i in range(files):  # hard links, a fresh copy every 50,000 names (file systems cap links)
            path = tmp / "files" / f"f{i:07d}.cif"
            if i % 50_000 == 0:
                first = path
                shutil.copy(seed, first)
            else:
                os.link(first, path)
        subprocess.run([sys.executable, __file__, "_plan_child", str(tmp)], check=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("what", choices=("speed", "plan", "profile", "sdf-floor", "_plan_child"))
    ap.add_argument("folder", nargs="?", help=argparse.SUPPRESS)
    ap.add_argument("--files", type=int)
    ap.add_argument("--formats", nargs="+", choices=("sdf", "pdb", "cif"), default=["sdf", "pdb", "cif"])
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)
    if args.what == "speed":
        speed(args.files or 10_000, args.formats, args.repeat)
    elif args.what == "plan":
        plan(args.files or 100_000)
    elif args.what == "profile":
        profile(args.files or 256, args.formats)
    elif args.what == "sdf-floor":
        sdf_floor(args.files or 1000, max(args.repeat, 5))
    else:
        _plan_child(args.folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
