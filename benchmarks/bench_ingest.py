"""Ingest throughput on Ray (1 and 2 workers) vs a plain single-process loop, and the driver's memory.

    python benchmarks/bench_ingest.py speed [--qm9-rows 40000] [--per-unit 5000]
    python benchmarks/bench_ingest.py memory      # full QM9 (3 CSVs) + the 47,681-atom x 10-frame XTC

`speed` runs the same plan three ways per domain: the plain loop (``run_unit`` over the planned units in
this process, then ``finalize_dataset``), and ``run_job`` on one local Ray with 1 and 2 units in flight
(Ray's start is excluded; a warm-up job starts the workers). Goals: 2 workers >= 1.7x one worker; Ray with
one worker within 15% of the plain loop. `memory` prints the driver's peak RSS (goal < 1 GB).
"""
from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ingest.job import JobConfig, SourceSpec, plan_units
from ingest.run import run_job
from ingest.unit import run_unit
from scd_train.datakit import qm9_csv
from shards.format.manifest import finalize_dataset
from shards.format.writer import WriterConfig


def _cases(qm9_rows: int, per_unit: int) -> dict[str, tuple[SourceSpec, ...]]:
    import MDAnalysisTests.datafiles as mda

    mmcif = Path(mda.PDB_small).parent / "mmcif"
    return {
        "qm9 csv": (SourceSpec("qm9", (str(qm9_csv(1)),), "qm9csv", max_records=qm9_rows,
                               records_per_unit=per_unit),),
        "protein": (SourceSpec("pdb", (mda.PDB_small, mda.PDB_multiframe, str(mmcif / "1YJP.cif"),
                                       str(mmcif / "5PTI.cif.gz"), str(mmcif / "3KPR.cif.gz"), mda.PDB),
                               options={"models": "all"}),),
        "trajectory (DCD)": (SourceSpec("adk-md", (mda.DCD,), "mdanalysis", {"topology": mda.PSF},
                                        records_per_unit=25),),
    }


def _plain(cfg: JobConfig) -> int:
    out = cfg.output_dir()
    out.mkdir(parents=True)
    n, shards = 0, []
    for u in plan_units(cfg):
        o = run_unit(u, str(out), cfg.writer)
        n += o["inputs"]
        shards += [s["name"] for s in o["shards"]]
    finalize_dataset(out, shards, writer=cfg.writer)
    return n


def _timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    res = fn()
    return time.perf_counter() - t0, res


def speed(qm9_rows: int, per_unit: int, repeat: int) -> None:
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        warm = JobConfig(str(tmp / "warm"), _cases(2000, 1000)["qm9 csv"])
        run_job(warm, workers=2, progress=False)
        print(f"{'case':<18}{'records':>9}{'units':>7}{'plain rec/s':>13}{'ray1 rec/s':>12}{'ray2 rec/s':>12}"
              f"{'ray1/plain':>12}{'ray2/ray1':>11}")
        for name, sources in _cases(qm9_rows, per_unit).items():
            best: dict[str, float] = {}
            n = 0
            for r in range(repeat):
                for mode in ("plain", "ray1", "ray2"):
                    cfg = JobConfig(str(tmp / f"{mode}-{r}-{name.split()[0]}"), sources, WriterConfig())
                    if mode == "plain":
                        t, n = _timed(lambda cfg=cfg: _plain(cfg))
                    else:
                        t, _ = _timed(lambda cfg=cfg, w=int(mode[-1]): run_job(cfg, workers=w, progress=False))
                    best[mode] = min(best.get(mode, float("inf")), t)
                    shutil.rmtree(cfg.output_dir())
            units = len(plan_units(JobConfig(str(tmp / "x"), sources)))
            print(f"{name:<18}{n:>9}{units:>7}{n / best['plain']:>13,.0f}{n / best['ray1']:>12,.0f}"
                  f"{n / best['ray2']:>12,.0f}{best['plain'] / best['ray1']:>12.2f}"
                  f"{best['ray1'] / best['ray2']:>11.2f}")
        print("goals: ray1/plain >= 0.87 (within 15%), ray2/ray1 >= 1.7")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()


def memory() -> None:
    import MDAnalysisTests.datafiles as mda

    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-mem-"))
    try:
        sources = (SourceSpec("qm9", tuple(str(qm9_csv(i)) for i in (1, 2, 3)), "qm9csv", records_per_unit=10000),
                   SourceSpec("adk-gro-xtc", (mda.XTC,), "mdanalysis", {"topology": mda.GRO}, records_per_unit=2))
        cfg = JobConfig(str(tmp / "ds"), sources)
        t, res = _timed(lambda: run_job(cfg, workers=2, progress=False))
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        acc = res.accounting["total"]
        print(f"ingested {acc['inputs']} records ({acc['accepted']} accepted) in {res.units} units, {t:.1f}s; "
              f"ok={res.ok}")
        print(f"driver peak RSS {peak_mb:.0f} MB (goal < 1024 MB)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("speed", "memory"))
    ap.add_argument("--qm9-rows", type=int, default=40000)
    ap.add_argument("--per-unit", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)
    if args.what == "speed":
        speed(args.qm9_rows, args.per_unit, args.repeat)
    else:
        memory()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
