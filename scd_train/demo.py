"""``scd demo``: the main job on an embedded default (local Ray, local shards, CPU DDP).

Steps, all into one folder: ingest a small real set of all four domains with embedded Ray
(``shards/``), write the data report (``report/``), pretrain the small backbone with SCD on the mixed
stream with ``torchrun --nproc-per-node 2`` on the CPU (``step-*`` checkpoints, ``metrics.jsonl``,
``loss_curve.png``), and summarise whether the loss fell (``summary.json``).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from scd_train.launch import run_ingest, run_stage, torchrun_command
from shards.progress import ENV_INTERVAL, progress_interval


def _ingest(out: Path) -> Path:
    """Run the ingest job with ``scd ingest run`` (a separate process keeps scd_train free of Ray)."""
    from scd_train.datakit import demo_sources

    job = {"output": str(out / "shards"), "sources": demo_sources(), "writer": {"max_shard_samples": 2000}}
    return run_ingest(job, out / "ingest_job.yaml", who="scd demo")


def interrupted_message(out: Path) -> str:
    """The Ctrl-C line: what the demo folder keeps and how to continue."""
    from scd_train.checkpoint import latest_checkpoint

    out = Path(out).resolve()
    kept = []
    if (out / "shards" / "manifest.json").is_file():
        kept.append(f"the ingested dataset {out / 'shards'}")
    elif (out / "shards").is_dir():
        kept.append(f"the finished ingest units in {out / 'shards'}")
    ckpt = latest_checkpoint(out) if out.is_dir() else None
    if ckpt is not None:
        kept.append(f"checkpoint {ckpt}")
    return (f"scd demo: interrupted; kept {', '.join(kept) or 'nothing'}; run the same command to continue "
            "(ingest skips finished units, pretraining resumes from the newest checkpoint)")


def pretrain_config(dataset: Path, run_dir: Path, steps: int) -> dict[str, Any]:
    """The demo's training config: small ET backbone, SCD, a mixed four-domain stream."""
    return {
        "run_dir": str(run_dir),
        "steps": steps,
        "seed": 0,
        "log_every": 5,
        "checkpoint_every": max(50, steps // 3),
        "num_workers": 0,
        "tensorboard": True,
        "data": {
            "datasets": [str(dataset)],
            "seed": 0,
            "max_atoms": 192,
            "mixture": {"strategy": "temperature", "temperature": 2.0, "max_frames_per_trajectory": 8,
                        "crop_protein_atoms": 160},
            "views": {"rotate": True, "crystal_max_repeat": 2, "crystal_repeat_p": 0.5},
        },
        "model": {"kind": "scd", "backbone": "et", "preset": "small", "layers": 4},
        "optim": {"lr": 5e-4, "warmup_steps": max(1, steps // 10), "weight_decay": 0.05, "grad_clip": 1.0},
    }


def loss_summary(metrics: Path) -> dict[str, float]:
    """Mean loss of the first and the last fifth of the training rows of ``metrics.jsonl`` (diagnostics rows,
    which have no loss, left out)."""
    from scd_train.metrics import read_metrics

    losses = [r["loss"] for r in read_metrics(metrics) if "loss" in r]
    k = max(1, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return {"first_loss": first, "last_loss": last, "relative_drop": 1 - last / first, "logged_steps": len(losses)}


def run_demo(out: Path, *, steps: int = 300, nproc: int = 2) -> dict[str, Any]:
    """Run the whole demo into ``out``; returns the summary."""
    from shards.tools.report import write_report

    t0 = time.perf_counter()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"[1/3] ingest (embedded Ray) -> {out / 'shards'}", flush=True)
    dataset = _ingest(out)
    print(f"[2/3] data report -> {write_report(str(dataset), out / 'report')}", flush=True)
    cfg_path = out / "pretrain.yaml"
    cfg_path.write_text(yaml.safe_dump(pretrain_config(dataset, out, steps), sort_keys=False))
    print(f"[3/3] SCD pretraining, {nproc} CPU processes, {steps} steps ({cfg_path}); progress every "
          f"{progress_interval():g} s unless in a terminal (${ENV_INTERVAL})", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_stage("pretraining", torchrun_command(nproc, "train", str(cfg_path)), who="scd demo", env=env)
    summary = {**loss_summary(out / "metrics.jsonl"), "seconds": round(time.perf_counter() - t0, 1),
               "steps": steps, "processes": nproc}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"done in {summary['seconds']:.0f}s: SCD loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f} "
          f"({summary['relative_drop']:.0%} lower); see {out / 'loss_curve.png'} and {out / 'report/index.html'}")
    return summary
