"""``scd train``, ``scd demo``, ``scd finetune``, ``scd embed`` and ``scd study``.

Registered in the ``scd.commands`` entry-point group."""
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
    t.set_defaults(func=train_command, on_interrupt=train_interrupted)
    d = sub.add_parser("demo", help="the main job: ingest all four domains, pretrain with 2 DDP processes",
                       description="End to end on an embedded default, no cluster and no GPU: ingest a small real "
                                   "set from all four domains of the data kit with embedded Ray, write shards and a "
                                   "data report, pretrain the small backbone with SCD on the mixed stream using "
                                   "2 DDP processes on the CPU, and leave checkpoints, metrics.jsonl and the loss "
                                   "curve in --out.")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--steps", type=int, default=300)
    d.add_argument("--nproc", type=int, default=2, help="DDP processes (default 2)")
    d.set_defaults(func=demo_command, on_interrupt=demo_interrupted)
    k = sub.add_parser("build-kernel", help="build the fused ET edge kernel for CPU training now (make install does)",
                       description="Builds, or finds in the cache, the fused C++ kernel of ET's per-edge part "
                                   "(scd_train/models/csrc/et_edges.cpp) and prints where it is. Training builds it "
                                   "on first use otherwise. Exit status 1 if it cannot be built: CPU training then "
                                   "runs the plain PyTorch path.")
    k.set_defaults(func=build_kernel_command)
    register_downstream(sub)


def build_kernel_command(args: argparse.Namespace) -> int:
    from scd_train.models.fused import kernel

    mod = kernel()
    if mod is None:
        print("scd build-kernel: the fused ET edge kernel could not be built (the warning above says why); "
              "CPU training will use the plain PyTorch path")
        return 1
    print(f"fused ET edge kernel: {mod.__file__}")
    return 0


def train_command(args: argparse.Namespace) -> int:
    from scd_train.config import load_train_config
    from scd_train.dist import cleanup
    from scd_train.trainer import Trainer

    cfg = load_train_config(args.config, args.overrides)
    try:
        trainer = Trainer(cfg)
        trainer.fit()
    finally:
        cleanup()
    return trainer.exit_status  # 128 + signal after a SIGTERM/SIGUSR1 checkpoint: the launcher requeues


def train_interrupted(args: argparse.Namespace) -> str:
    """The Ctrl-C line of ``scd train``: the newest checkpoint kept and how to resume (rank 0 only)."""
    import os

    from scd_train.checkpoint import latest_checkpoint
    from scd_train.config import load_train_config

    if os.environ.get("RANK", "0") != "0":
        return ""
    try:
        cfg = load_train_config(args.config, args.overrides)
    except (OSError, ValueError):
        return "scd train: interrupted"
    ckpt = latest_checkpoint(Path(cfg.run_dir))
    if ckpt is None:
        return f"scd train: interrupted before the first checkpoint; nothing kept in {cfg.run_dir}"
    how = "run the same command to resume from it" if cfg.resume else "set resume: true to continue from it"
    return f"scd train: interrupted; kept checkpoint {ckpt} (later steps are lost); {how}"


def demo_interrupted(args: argparse.Namespace) -> str:
    from scd_train.demo import interrupted_message

    return interrupted_message(args.out)


def demo_command(args: argparse.Namespace) -> int:
    from scd_train.demo import run_demo

    run_demo(args.out, steps=args.steps, nproc=args.nproc)
    return 0


def register_downstream(sub: Any) -> None:
    """``scd finetune``, ``scd embed`` and ``scd study qm9``."""
    f = sub.add_parser("finetune", help="fine-tune a checkpoint (or train from scratch) on a labelled property",
                       description="Scalar-property fine-tuning: the backbone runs once conditioned on the mask token, "
                                   "a per-atom head with sum/mean readout, standardised targets, early stopping on "
                                   "the validation split, test MAE (eV and meV) and the exact split keys in "
                                   "OUT/result.json. `checkpoint: null` trains the same model from scratch.")
    f.add_argument("config", type=Path)
    f.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set property=gap --set checkpoint=null")
    f.set_defaults(func=finetune_command)
    e = sub.add_parser("embed", help="per-structure embeddings (pooled c) from a checkpoint, optional linear probe",
                       description="Writes OUT.npy (float32 [G, F], the pooled self-embedding c of one pass "
                                   "conditioned on the mask token) and OUT.keys.txt for a shard dataset or "
                                   "structure files ASE reads. --probe PROP prints the k-fold cross-validated "
                                   "MAE of ridge regression on the embeddings.")
    e.add_argument("checkpoint", type=Path,
                   help="checkpoint folder, run folder (newest checkpoint) or fine-tune folder")
    e.add_argument("inputs", nargs="+", help="a shard dataset folder, or structure files (xyz, extxyz, cif, pdb, ...)")
    e.add_argument("--out", type=Path, required=True, help="output stem: writes OUT.npy and OUT.keys.txt")
    e.add_argument("--max-atoms", type=int, default=4000, help="atoms per batch (memory bound)")
    e.add_argument("--max-edges", type=int, default=120_000,
                   help="radius-graph edges per batch (memory bound); a structure over a budget goes alone")
    e.add_argument("--batch-size", type=int, default=None, help="also at most this many structures per batch")
    e.add_argument("--device", default="auto")
    e.add_argument("--probe", metavar="PROPERTY", help="ridge-regression probe of this property (k-fold CV MAE)")
    e.add_argument("--folds", type=int, default=5)
    e.add_argument("--alpha", type=float, default=1.0, help="ridge penalty on standardised embeddings")
    e.set_defaults(func=embed_command)
    s = sub.add_parser("study", help="small reproductions of the paper's downstream comparisons",
                       description="`scd study qm9 --out DIR`: ingest QM9, pretrain the same backbone with SCD and "
                                   "with plain denoising on molecules outside the fine-tune split, fine-tune both "
                                   "and a from-scratch model for several seeds; writes results.md, "
                                   "learning_curves.png, splits.json, configs and per-run results.")
    s.add_argument("name", choices=sorted(STUDIES), help="qm9: property fine-tuning; qm9-v2: its second edition "
                   "(matched compute, the authors' fine-tuning protocol, diagnostics); md: energy + forces on an "
                   "xTB trajectory (run with OMP_NUM_THREADS=1)")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--config", type=Path, help="study YAML; keys not given keep their defaults")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a study key, e.g. --set pretrain.steps=2000 --set device=cuda")
    s.set_defaults(func=study_command)


def finetune_command(args: argparse.Namespace) -> int:
    from scd_train.finetune import finetune, load_finetune_config

    finetune(load_finetune_config(args.config, args.overrides))
    return 0


def embed_command(args: argparse.Namespace) -> int:
    from scd_train.embed import embed_command as run

    return run(args)


def study_command(args: argparse.Namespace) -> int:
    import importlib
    import shlex
    import sys

    module, load, run = STUDIES[args.name]
    mod = importlib.import_module(module)
    getattr(mod, run)(getattr(mod, load)(args.config, args.overrides), args.out,
                      command="scd " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    return 0


# study name -> (module, config loader, runner)
STUDIES: dict[str, tuple[str, str, str]] = {
    "qm9": ("scd_train.study", "load_study_config", "run_study"),
    "qm9-v2": ("scd_train.study_v2", "load_study_v2_config", "run_study_v2"),
    "md": ("scd_train.study_md", "load_md_study_config", "run_md_study"),
}
