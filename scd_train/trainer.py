"""The step-based training loop (run by ``scd train`` or ``torchrun -m scd_train``).

The loop knows nothing about denoising: it asks the objective for (sum of per-atom losses, atom
count) and normalises by the atom count of *all* ranks, so atom-budget batches of different sizes
weigh every atom equally. Randomness is drawn from generators keyed by (seed, step, rank), so a
resumed run continues bit-identically.
"""
from __future__ import annotations

import json
import math
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from scd_train.build import build_objective
from scd_train.checkpoint import Checkpointer, remove_stale_temp
from scd_train.config import TrainConfig
from scd_train.data import StatefulLoader, to_torch
from scd_train.diagnostics import build_diagnostics, plot_diagnostics
from scd_train.dist import DistInfo, all_reduce_sum, barrier, init_distributed
from scd_train.dynamic import mark_dynamic
from scd_train.metrics import MetricsLog, plot_loss
from scd_train.optim import EMA, build_optimizer
from scd_train.preempt import StopRequest, exit_status
from shards.config import to_dict
from shards.progress import Progress


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator of one training step on one rank (drop-cond, drop-path)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 4096 + rank)
    return g


def global_mean_loss(loss_sum: torch.Tensor, n_atoms: torch.Tensor, world_size: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss to back-propagate so that DDP's gradient average equals the gradient of the mean over
    all atoms of all ranks (not a mean of rank means); also returns (global atoms, global loss sum)."""
    counts = all_reduce_sum(torch.stack([n_atoms.detach().double(), loss_sum.detach().double()]))
    scale = world_size / counts[0].clamp_min(1.0)
    return loss_sum * scale.to(loss_sum.dtype), counts


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs ``cfg.steps`` steps."""

    def __init__(self, cfg: TrainConfig, info: DistInfo | None = None) -> None:
        self.cfg = cfg
        self.info = info or init_distributed(cfg.device)
        torch.manual_seed(cfg.seed)
        if self.info.device.type == "cuda" and cfg.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.run_dir = Path(cfg.run_dir)
        self.objective = build_objective(cfg).to(self.info.device)
        self.optimizer, self.scheduler = build_optimizer(self.objective, cfg.optim, cfg.steps)
        self.ema = EMA(self.objective, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
        self.step = 0
        self.stopped_by: int | None = None
        self.loader: Any = StatefulLoader(cfg.data, self.info, cfg.num_workers)
        parts: dict[str, Any] = {"model": self.objective, "optimizer": self.optimizer, "scheduler": self.scheduler,
                                 "loader": self.loader}
        if self.ema is not None:
            parts["ema"] = self.ema.shadow
        self.checkpointer = Checkpointer(self.run_dir, parts, keep=cfg.keep_checkpoints, is_main=self.info.is_main)
        if self.info.is_main:
            remove_stale_temp(self.run_dir)
        _, state = self.checkpointer.load_latest() if cfg.resume else (None, None)
        if state is not None:
            self.step = int(state["step"])
        self.model: Any = self.objective  # the objective, DDP-wrapped and/or compiled
        if self.info.enabled:
            self.model = DistributedDataParallel(self.objective, find_unused_parameters=True,
                                                 device_ids=[self.info.device.index]
                                                 if self.info.device.type == "cuda" else None)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.metrics = MetricsLog(self.run_dir, enabled=self.info.is_main, tensorboard=cfg.tensorboard,
                                  resume_step=self.step)
        self.diagnostics = build_diagnostics(cfg.diagnostics, cfg.data.views, self.info.device, self.info.is_main)
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))

    def _train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        cfg, info = self.cfg, self.info
        gen = step_generator(cfg.seed, self.step, info.rank, info.device)
        self.model.train()
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            loss_sum, n_atoms, extra = self.model(batch, generator=gen)
        loss, counts = global_mean_loss(loss_sum, n_atoms, info.world_size)
        total_atoms = counts[0].clamp_min(1.0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.objective.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.objective)
        out = {"loss": float(counts[1] / total_atoms), "grad_norm": float(grad_norm),
               "lr": float(self.scheduler.get_last_lr()[0]), "atoms": float(counts[0])}
        out.update({k: float(v) for k, v in extra.items()})
        return out

    def save(self) -> Path | None:
        """Checkpoint every stateful part (all ranks take part; rank 0 writes) and the realised mix so far."""
        path = self.checkpointer.save(self.step, to_dict(self.cfg))
        if path is not None:
            _write_mix(self.run_dir / "realised_mix.json", json.loads((path / "state.json").read_text())["loader"])
        barrier()
        return path

    @property
    def exit_status(self) -> int:
        """0, or ``128 + signal`` when a stop signal ended the run early (after its checkpoint)."""
        return exit_status(self.stopped_by)

    def _stop_signal(self, stop: StopRequest) -> int | None:
        """The stop signal if any rank has received one: every rank answers the same after the same step."""
        if self.info.enabled:
            flag = torch.tensor([stop.signum or 0], dtype=torch.int64, device=self.info.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.stopped_by = int(flag.item()) or None
        else:
            self.stopped_by = stop.signum
        return self.stopped_by

    def fit(self) -> list[dict[str, float]]:
        """Train until ``cfg.steps``; returns the logged rows (rank 0). On SIGTERM or SIGUSR1 every rank finishes
        its step, a checkpoint is written and the loop ends early (``stopped_by``, ``exit_status``)."""
        with StopRequest() as stop:
            return self._fit(stop)

    def _fit(self, stop: StopRequest) -> list[dict[str, float]]:
        cfg, info = self.cfg, self.info
        history: list[dict[str, float]] = []
        bar = Progress(cfg.steps, "train", "step", initial=self.step, enabled=info.is_main and cfg.progress)
        it = iter(self.loader)
        wait = compute = 0.0
        atoms_window = 0.0
        t_log = time.perf_counter()
        end = min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
        while self.step < end:
            t0 = time.perf_counter()
            raw = next(it)
            t1 = time.perf_counter()
            batch = to_torch(raw, info.device)
            if cfg.compile:
                mark_dynamic(batch)
            stats = self._train_step(batch)
            if not math.isfinite(stats["loss"]):
                raise FloatingPointError(f"loss became {stats['loss']} at step {self.step}")
            t2 = time.perf_counter()
            wait += t1 - t0
            compute += t2 - t1
            atoms_window += stats["atoms"]
            self.step += 1
            if self.step % cfg.log_every == 0 or self.step == end:
                dt = time.perf_counter() - t_log
                row = {**stats, "atoms_per_s": atoms_window / max(dt, 1e-9),
                       "data_wait": wait / max(wait + compute, 1e-9), "oversize": raw["oversize"],
                       "corrupt_skipped": raw["corrupt_skipped"],
                       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
                self.metrics.log(self.step, row)
                history.append({"step": self.step, **row})
                bar.set_postfix(loss=f"{row['loss']:.4f}", atoms_s=f"{row['atoms_per_s']:,.0f}",
                                wait=f"{row['data_wait']:.0%}")
                wait = compute = atoms_window = 0.0
                t_log = time.perf_counter()
            if self.diagnostics is not None:
                self.diagnostics.maybe_log(self.step, self.objective, self.metrics)
            bar.update(1)
            stopping = self._stop_signal(stop) is not None
            if stopping or self.step % cfg.checkpoint_every == 0 or self.step == end:
                self.save()
            if stopping:
                if info.is_main:
                    print(f"scd train: {signal.Signals(self.stopped_by or 0).name} received; stopped after step "
                          f"{self.step} with a checkpoint in {self.run_dir}; run the same command to resume",
                          file=sys.stderr, flush=True)
                break
        bar.close()
        self.metrics.close()
        if info.is_main and (self.run_dir / "metrics.jsonl").is_file():
            plot_loss(self.run_dir / "metrics.jsonl", self.run_dir / "loss_curve.png")
            plot_diagnostics(self.run_dir / "metrics.jsonl", self.run_dir / "diagnostics.png")
        return history


def _write_mix(path: Path, loader_state: dict[str, Any]) -> None:
    """The realised mix over all ranks so far (from the loader's planner states), next to the metrics."""
    states = [s for s in loader_state["ranks"] if s]
    if not states:
        return
    seen = [sum(s["seen"][i] for s in states) for i in range(len(states[0]["groups"]))]
    total = max(sum(seen), 1)
    edges = sum(int(s.get("edge_oversize", 0)) for s in states)
    doc = {"groups": states[0]["groups"], "samples": seen, "share": [c / total for c in seen],
           "oversize": sum(s["oversize"] for s in states) + edges, "edge_oversize": edges,
           "corrupt_skipped": sum(int(s.get("corrupt_skipped", 0)) for s in states), "step": states[0]["step"]}
    path.write_text(json.dumps(doc, indent=1))
