"""``scd train`` and ``scd demo`` (registered in the ``scd.commands`` entry-point group)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    t = sub.add_parser("train", help="pretrain with SCD (or plain denoising) from a YAML config",
                       description="Step-based training from shard datasets. Single process here; for DDP run "
                                   "`torchrun --nproc-per-node N -m scd_train train CONFIG.yaml`. Resumes from the "
                                   "newest checkpoint in run_dir unless resume: false.")
    t.add_argument("config", type=Path)
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=1e-4 --set steps=2000")
    t.set_defaults(func=train_command)
    d = sub.add_parser("demo", help="the main job: ingest all four domains, pretrain with 2 DDP processes",
                       description="End to end on an embedded default, no cluster and no GPU: ingest a small real "
                                   "set from all four domains of the data kit with embedded Ray, write shards and a "
                                   "data report, pretrain the small backbone with SCD on the mixed stream using "
                                   "2 DDP processes on the CPU, and leave checkpoints, metrics.jsonl and the loss "
                                   "curve in --out.")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--steps", type=int, default=300)
    d.add_argument("--nproc", type=int, default=2, help="DDP processes (default 2)")
    d.set_defaults(func=demo_command)


def train_command(args: argparse.Namespace) -> int:
    from scd_train.config import load_train_config
    from scd_train.dist import cleanup
    from scd_train.trainer import Trainer

    cfg = load_train_config(args.config, args.overrides)
    try:
        Trainer(cfg).fit()
    finally:
        cleanup()
    return 0


def demo_command(args: argparse.Namespace) -> int:
    from scd_train.demo import run_demo

    run_demo(args.out, steps=args.steps, nproc=args.nproc)
    return 0
