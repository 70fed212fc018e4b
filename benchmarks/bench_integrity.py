"""What checking every sample's bytes costs on the hot path: the loader with the per-sample checksum
(64-bit blake2b of the sample's bytes, compared with its index row before decoding) against the same
loader with the check off, alternated round by round in one process on one core.

Two figures: the full loader (decode + two noisy views + two radius graphs + collate; the throughput
the trainer sees) and the bare fetch + decode path (the upper bound of the relative cost). QM9 molecules
are the worst case: the smallest samples, so the most checks per second.

Usage: ``python benchmarks/bench_integrity.py [--molecules 5000] [--steps 40] [--rounds 5]``
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import qm9_graphs  # noqa: E402

from shards.fetch import SampleFetcher  # noqa: E402
from shards.loader import BatchStream, LoaderConfig  # noqa: E402
from shards.manifest import write_dataset  # noqa: E402
from shards.plan import build_table  # noqa: E402
from shards.reader import ShardDataset  # noqa: E402


def loader_rate(cfg: LoaderConfig, steps: int, check: bool) -> float:
    """Samples per second of ``steps`` batches after a warm-up batch."""
    stream = BatchStream(cfg)
    stream.fetcher.check = check
    it = iter(stream)
    next(it)
    t = time.perf_counter()
    n = sum(len(b["keys"]) for b in itertools.islice(it, steps))
    return n / (time.perf_counter() - t)


def decode_rate(root: str, check: bool) -> float:
    """Samples per second of fetch + checksum + decode over the whole dataset, in stored order."""
    ds = ShardDataset(root)
    table = build_table([ds])
    assert table.checksum is not None
    fetcher = SampleFetcher([ds], check=check)
    rows = zip(table.shard.tolist(), table.offset.tolist(), table.size.tolist(), table.checksum.tolist(),
               strict=True)
    t = time.perf_counter()
    n = 0
    for shard, off, size, checksum in rows:
        fetcher.get(0, shard, off, size, checksum)
        n += 1
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--molecules", type=int, default=5000)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    root = str(Path(tempfile.mkdtemp(prefix="bench-integrity-")) / "qm9")
    write_dataset(qm9_graphs(args.molecules), root)
    cfg = LoaderConfig(datasets=(root,), max_atoms=4000)
    results: dict[str, dict[bool, list[float]]] = {"loader": {True: [], False: []}, "decode": {True: [], False: []}}
    for r in range(args.rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        for check in order:
            results["loader"][check].append(loader_rate(cfg, args.steps, check))
            results["decode"][check].append(decode_rate(root, check))
    print(f"QM9, {args.molecules} molecules, one core, {args.rounds} alternated rounds (median samples/s):")
    for what, label in (("loader", "loader (decode + 2 views + 2 graphs + collate)"),
                        ("decode", "fetch + decode only")):
        on, off = statistics.median(results[what][True]), statistics.median(results[what][False])
        print(f"  {label}: checked {on:,.0f}/s, unchecked {off:,.0f}/s, cost {100 * (1 - on / off):+.1f}%")


if __name__ == "__main__":
    main()
