"""``scd shards preview``: what the sampler would feed, step by step, without a model."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from shards.format.reader import ShardDataset
from shards.stream.loader import LoaderConfig, make_planner
from shards.stream.mixture import load_mixture
from shards.stream.plan import RepeatSpec, build_table
from shards.stream.shuffle import SHUFFLES


def add_parser(sub: Any) -> None:
    p = sub.add_parser("preview", help="print the batches the sampler would feed (no model)",
                       description="Plan N steps exactly as the trainer's loader does and print one JSON line per "
                                   "step (sample keys, domains, atoms) and a final line with the realised mix.")
    p.add_argument("datasets", nargs="+", help="dataset folders or http(s) URLs")
    p.add_argument("--mixture", type=Path, help="mixture YAML (default: natural mix by domain)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--max-atoms", type=int, default=4000)
    p.add_argument("--shuffle", choices=sorted(SHUFFLES), default="windowed", help="per-group order, as data.shuffle")
    p.add_argument("--repeat-p", type=float, default=0.5,
                   help="chance per cell axis of a random cell repeat, as data.views.crystal_repeat_p "
                        "(repeats change the packing; 0: none, as in fine-tuning)")
    p.add_argument("--max-repeat", type=int, default=2,
                   help="largest repeat per axis, as data.views.crystal_max_repeat")
    p.add_argument("--repeat-domains", nargs="+", default=["crystal"],
                   help="domains whose periodic structures get repeats, as data.views.repeat_domains")
    p.add_argument("--state-in", type=Path, help="continue from a state written by --state-out")
    p.add_argument("--state-out", type=Path, help="write the sampler state after the last step")
    p.add_argument("--json", action="store_true", help="JSON lines (the default output is also JSON lines)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    datasets = [ShardDataset(d) for d in args.datasets]
    table = build_table(datasets)
    cfg = LoaderConfig(datasets=tuple(args.datasets), mixture=load_mixture(args.mixture), seed=args.seed,
                       max_atoms=args.max_atoms, shuffle=args.shuffle)
    repeat = RepeatSpec(args.repeat_p, args.max_repeat, tuple(args.repeat_domains))
    planner = make_planner(cfg, table, args.world_size, args.rank, repeat)
    if args.state_in:
        planner.load_state_dict(json.loads(args.state_in.read_text()))
    keys: dict[tuple[int, int], dict[int, str]] = {}
    for _ in range(args.steps):
        b = planner.next_batch()
        out_keys = []
        for row in b.rows.tolist():
            d, s = int(table.dataset[row]), int(table.shard[row])
            if (d, s) not in keys:
                idx = datasets[d].shard_index(datasets[d].shard_names[s])
                keys[(d, s)] = dict(zip(idx["offset"], idx["key"], strict=True))
            out_keys.append(keys[(d, s)][int(table.offset[row])])
        print(json.dumps({"step": b.step, "keys": out_keys,
                          "domains": [table.domain_names[table.domain[r]] for r in b.rows.tolist()],
                          "atoms": b.n_atoms, "samples": int(b.rows.size), "cropped": int(b.crop.sum())}))
    print(json.dumps({"realised_mix": planner.realised_mix(), "target_mix": planner.target_mix(),
                      "samples": int(planner.seen.sum()), "oversize": planner.oversize}))
    if args.state_out:
        args.state_out.write_text(json.dumps(planner.state_dict()))
    return 0
