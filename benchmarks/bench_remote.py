"""Remote shards and planning at scale.

1. Loader throughput (SCD pairs/s) streaming from a local HTTP server (whole-shard cache) vs local disk,
   and their ratio; first-batch latency of each (cold cache for HTTP).
2. Time and peak RSS to plan the first step on a table of 10 million synthetic index rows (four domains,
   MD frames in trajectories with a per-trajectory cap, proteins cropped). Goal: < 5 s, < 1 GB.
   Measured in a fresh child process so the RSS is the planner's alone.

Usage: ``python benchmarks/bench_remote.py [--steps 40] [--rows 10000000]``
"""
from __future__ import annotations

import argparse
import http.server
import itertools
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from scd_train.config import DataConfig
from scd_train.data import make_stream
from shards.format.manifest import write_dataset
from shards.format.schema import AtomGraph, make_key
from shards.format.writer import WriterConfig
from shards.stream.mixture import MixtureConfig
from shards.stream.plan import Planner, SampleTable


def bench_graphs(copies: int) -> list[AtomGraph]:
    """ASE g2 molecules and pymatgen's ordered crystals, ``copies`` times (distinct keys)."""
    import pymatgen.util as pu
    from ase.collections import g2
    from pymatgen.core import Structure

    base: list[AtomGraph] = []
    for i, atoms in enumerate(g2):
        base.append(AtomGraph.from_ase(atoms, key="x", domain="molecule", source="g2", source_file="g2", index=i))
    for i, path in enumerate(sorted((Path(pu.__file__).parent / "structures").glob("*.json"))):
        s = Structure.from_file(path)
        if s.is_ordered:
            base.append(AtomGraph.from_pymatgen(s, key="x", domain="crystal", source="pmg", source_file=path.name,
                                                index=i))
    return [g.replace(key=make_key("bench", str(c), j)) for c in range(copies) for j, g in enumerate(base)]


def serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(folder), **k)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def stream_rate(cfg: DataConfig, steps: int) -> tuple[float, float]:
    """(first-batch latency in s including dataset open, SCD pairs/s over the following steps)."""
    t0 = time.perf_counter()
    it = iter(make_stream(cfg))
    next(it)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    n = sum(len(b["keys"]) for b in itertools.islice(it, steps))
    return first, n / (time.perf_counter() - t1)


def synthetic_table(rows: int, seed: int = 0) -> SampleTable:
    """A 4-domain table shaped like a real index: 60% molecules, 25% MD frames (1000-frame trajectories),
    10% crystals, 5% proteins; 10,000 samples per shard."""
    rng = np.random.default_rng(seed)
    domain = rng.choice(4, size=rows, p=[0.6, 0.25, 0.1, 0.05]).astype(np.int16)
    n_atoms = np.where(domain == 3, rng.integers(500, 20000, rows), rng.integers(3, 200, rows)).astype(np.int32)
    size = (n_atoms.astype(np.int64) * 28 + 512)
    traj = np.where(domain == 1, (np.arange(rows, dtype=np.uint64) // 1000) + 1, 0).astype(np.uint64)
    shard = (np.arange(rows) // 10_000).astype(np.int32)
    offset = np.cumsum(size) - size
    return SampleTable(dataset=np.zeros(rows, np.int16), shard=shard, offset=offset, size=size, n_atoms=n_atoms,
                       domain=domain, source=domain.copy(), trajectory=traj,
                       domain_names=["molecule", "md", "crystal", "protein"],
                       source_names=["qm", "md17", "mp", "pdb"])


def plan_child(rows: int) -> None:
    """Child process: build the table, plan the first step; print seconds and peak RSS as JSON."""
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    table = synthetic_table(rows)
    t_table = time.perf_counter() - t0
    mix = MixtureConfig(strategy="temperature", temperature=2.0, max_frames_per_trajectory=64,
                        crop_protein_atoms=1500)
    t1 = time.perf_counter()
    planner = Planner(table, mix, seed=0, world_size=64, rank=5, max_atoms=4000)
    batch = planner.next_batch()
    t_plan = time.perf_counter() - t1
    t2 = time.perf_counter()
    for _ in range(100):
        planner.next_batch()
    t_next = (time.perf_counter() - t2) / 100
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rows": rows, "table_s": t_table, "first_step_s": t_plan, "next_step_ms": 1e3 * t_next,
                      "samples_in_first_batch": int(batch.rows.size), "baseline_rss_mb": base / 1024,
                      "peak_rss_mb": peak / 1024, "table_mb": sum(
                          getattr(table, f).nbytes for f in ("dataset", "shard", "offset", "size", "n_atoms",
                                                             "domain", "source", "trajectory")) / 2 ** 20}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=12, help="copies of the ~180 base structures")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--plan-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plan_child:
        plan_child(args.plan_child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ds"
        graphs = bench_graphs(args.copies)
        write_dataset(graphs, root, config=WriterConfig(max_shard_samples=200))
        server, url = serve(Path(tmp))
        try:
            common = dict(mixture=MixtureConfig(), seed=0, max_atoms=2000)
            local = stream_rate(DataConfig(datasets=(str(root),), **common), args.steps)
            remote = stream_rate(DataConfig(datasets=(f"{url}/ds",), cache_dir=str(Path(tmp) / "cache"),
                                              **common), args.steps)
        finally:
            server.shutdown()
            server.server_close()
    print(f"dataset: {len(graphs)} samples (g2 molecules + pymatgen crystals), shards of 200, max_atoms 2000")
    print(f"local disk : first batch {local[0]:.3f} s, {local[1]:8.1f} SCD pairs/s")
    print(f"local HTTP : first batch {remote[0]:.3f} s, {remote[1]:8.1f} SCD pairs/s (cold whole-shard cache)")
    print(f"HTTP / disk throughput ratio: {remote[1] / local[1]:.2f}")
    out = subprocess.run([sys.executable, __file__, "--plan-child", str(args.rows)], check=True,
                         capture_output=True, text=True)
    r = json.loads(out.stdout)
    ok = r["first_step_s"] < 5 and r["peak_rss_mb"] < 1024
    print(f"plan on {r['rows']:,} rows: table {r['table_mb']:.0f} MB built in {r['table_s']:.2f} s; first step "
          f"planned in {r['first_step_s']:.2f} s ({r['samples_in_first_batch']} samples), then "
          f"{r['next_step_ms']:.2f} ms/step; peak RSS {r['peak_rss_mb']:.0f} MB "
          f"(interpreter+imports {r['baseline_rss_mb']:.0f} MB) -> {'OK' if ok else 'OVER'} (goal < 5 s, < 1 GB)")


if __name__ == "__main__":
    main()
