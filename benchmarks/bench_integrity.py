"""What checking every sample's bytes costs on the hot path: the loader with the per-sample checksum
(the first 64 bits of the sha256 of the sample's bytes, compared with its index row before decoding)
against the same loader with the check off, alternated batch by batch (and block by block) in one
process on one core.

Rates are per CPU second of this process (``time.process_time``), which other load on a shared machine
distorts less than wall time. Two figures: the full loader (decode + two noisy views + two radius graphs
+ collate; the throughput the trainer sees) and the bare fetch + decode path (the upper bound of the
relative cost). QM9 molecules are the worst case: the smallest samples, so the most checks per second.

Usage: ``python benchmarks/bench_integrity.py [--molecules 5000] [--steps 40] [--rounds 5]``
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import qm9_graphs  # noqa: E402

from scd_train.config import DataConfig  # noqa: E402
from scd_train.data import make_stream  # noqa: E402
from shards.format.manifest import write_dataset  # noqa: E402
from shards.format.reader import ShardDataset  # noqa: E402
from shards.format.writer import sample_checksum  # noqa: E402
from shards.stream.fetch import SampleFetcher  # noqa: E402
from shards.stream.plan import build_table  # noqa: E402

Tally = dict[bool, list[float]]  # check on/off -> [samples, CPU seconds]


def _tally() -> Tally:
    return {True: [0.0, 0.0], False: [0.0, 0.0]}


def loader_round(cfg: DataConfig, steps: int, first: bool, tally: Tally) -> None:
    """``2 * steps`` batches of one stream after a warm-up batch, the check switched on and off batch by
    batch (``first`` says which mode the first batch gets)."""
    stream = make_stream(cfg)
    it = iter(stream)
    next(it)
    for i in range(2 * steps):
        check = first if i % 2 == 0 else not first
        stream.fetcher.check = check
        t = time.process_time()
        n = len(next(it)["keys"])
        tally[check][1] += time.process_time() - t
        tally[check][0] += n


def decode_round(root: str, first: bool, tally: Tally, block: int = 200) -> float:
    """Fetch (+ checksum) + decode over the dataset in stored order, the check switched block by block,
    after an untimed pass that maps the shards and faults their pages in. Returns the CPU seconds per
    sample of the checksum alone (hash and compare, timed over the same rows)."""
    ds = ShardDataset(root)
    table = build_table([ds])
    assert table.checksum is not None
    fetcher = SampleFetcher([ds])
    rows = list(zip(table.shard.tolist(), table.offset.tolist(), table.size.tolist(), table.checksum.tolist(),
                    strict=True))
    for row in rows:
        fetcher.get(0, *row)
    for b, start in enumerate(range(0, len(rows), block)):
        check = first if b % 2 == 0 else not first
        fetcher.check = check
        chunk = rows[start:start + block]
        t = time.process_time()
        for row in chunk:
            fetcher.get(0, *row)
        tally[check][1] += time.process_time() - t
        tally[check][0] += len(chunk)
    views = [memoryview(fetcher.cache.get(ds, ds.shard_names[s]))[o:o + n] for s, o, n, _ in rows]
    t = time.process_time()
    bad = sum(sample_checksum(v) != c for v, (_, _, _, c) in zip(views, rows, strict=True))
    assert bad == 0
    return (time.process_time() - t) / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--molecules", type=int, default=5000)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    root = str(Path(tempfile.mkdtemp(prefix="bench-integrity-")) / "qm9")
    write_dataset(qm9_graphs(args.molecules), root)
    cfg = DataConfig(datasets=(root,), max_atoms=4000)
    loader, decode = _tally(), _tally()
    alone = []
    for r in range(args.rounds):
        loader_round(cfg, args.steps, r % 2 == 0, loader)
        alone.append(decode_round(root, r % 2 == 0, decode))
    print(f"QM9, {args.molecules} molecules, one core, {args.rounds} rounds alternating checked and unchecked "
          "(samples per CPU second of this process, pooled over the rounds):")
    for label, tally in (("loader (decode + 2 views + 2 graphs + collate)", loader),
                         ("fetch + decode only", decode)):
        on, off = tally[True][0] / tally[True][1], tally[False][0] / tally[False][1]
        print(f"  {label}: checked {on:,.0f}/s, unchecked {off:,.0f}/s, cost {100 * (1 - on / off):+.1f}%")
    check_us = 1e6 * statistics.median(alone)
    loader_us = 1e6 * loader[False][1] / loader[False][0]
    print(f"  the check alone: {check_us:.2f} us per sample = {100 * check_us / loader_us:.2f}% of the loader's "
          f"{loader_us:.0f} us per sample")


if __name__ == "__main__":
    main()
