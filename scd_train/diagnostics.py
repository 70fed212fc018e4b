"""Conditioning diagnostics during pretraining: is the self-embedding c learning something molecule-specific?

On a fixed held-out set (the first ``n_molecules`` structures of a shard dataset, views with noise keyed by
``(seed, sample key)``, so every evaluation sees the same noise), every ``eval_every`` steps rank 0 measures
with the current weights, in eval mode (no drop-cond, no drop-path, no RNG drawn):

- ``diag_loss_own_c``: the pretext loss with each molecule's own c (pass 1 on the clean view, mask token);
- ``diag_loss_mask``: the loss with the mask token instead of c;
- ``diag_loss_other_c``: the loss with another molecule's c (a fixed derangement of the held-out set, so
  never the molecule's own); ``diag_gap_other_own`` = other / own - 1 is the share of the loss that c
  explains beyond a generic condition;
- ``diag_c_spread``: the spread of LN(c) across molecules (per feature the std over molecules, averaged);
- ``diag_probe_mae`` / ``diag_probe_baseline_mae``: a ridge probe (k-fold CV) of ``probe_property`` from
  c of the mask-token pass, when the held-out structures carry that label (and predict-the-mean).

Losses are per-atom means of the objective's normalised squared error (the training loss's units).
Rows go to ``metrics.jsonl`` (and TensorBoard) next to the training rows; :func:`plot_diagnostics` draws them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from scd_train.budget import Budget, budget_batches
from scd_train.views import ViewConfig, make_views, noise_rng
from shards.stream.collate import collate

__all__ = ["DiagnosticsConfig", "Diagnostics", "build_diagnostics", "derangement", "plot_diagnostics"]

PREFIX = "diag_"


@dataclass(frozen=True)
class DiagnosticsConfig:
    """``diagnostics:`` of a training config; off unless ``held_out`` names a shard dataset folder.

    ``seed`` keys the held-out views' noise and the derangement; ``max_atoms`` bounds a held-out batch;
    ``probe_property`` (e.g. ``homo``) turns on the ridge probe (``probe_folds``-fold CV, penalty
    ``probe_alpha`` on standardised features).
    """

    held_out: str | None = None
    eval_every: int = 100
    n_molecules: int = 256
    probe_property: str | None = None
    probe_folds: int = 5
    probe_alpha: float = 1.0
    seed: int = 0
    max_atoms: int = 4000

    def __post_init__(self) -> None:
        if self.eval_every < 1 or self.n_molecules < 2 or self.probe_folds < 2 or self.max_atoms < 1:
            raise ValueError("diagnostics: eval_every >= 1, n_molecules >= 2, probe_folds >= 2, max_atoms >= 1")
        if self.probe_alpha <= 0:
            raise ValueError("diagnostics: probe_alpha must be > 0")


def derangement(n: int, seed: int) -> np.ndarray:
    """A permutation of ``range(n)`` without fixed points (Sattolo's algorithm: one random n-cycle), keyed by
    ``seed``; ``n >= 2``."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    rng = noise_rng(seed, "diagnostics", 0, "derangement")
    perm = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(i))  # j < i: Sattolo, so the result is a single cycle
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def _to_torch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in batch.items()
            if isinstance(v, np.ndarray)}


class Diagnostics:
    """The held-out batches (built once) and :meth:`evaluate`; :meth:`maybe_log` is the trainer's hook."""

    def __init__(self, cfg: DiagnosticsConfig, views: ViewConfig, device: torch.device | str = "cpu") -> None:
        from shards.format.reader import ShardDataset

        if cfg.held_out is None:
            raise ValueError("diagnostics: held_out is not set")
        if not (Path(cfg.held_out) / "manifest.json").is_file() and "://" not in cfg.held_out:
            raise ValueError(f"diagnostics: held_out {cfg.held_out} is not a shard dataset (no manifest.json)")
        self.cfg, self.device = cfg, torch.device(device)
        vc = dataclasses.replace(views, rotate=False, noise=True)
        no_repeat = np.ones(3, dtype=np.int64)
        items: list[dict[str, Any]] = []
        labels: list[float] = []
        for g in ShardDataset(cfg.held_out):
            if len(items) == cfg.n_molecules:
                break
            items.append(make_views(g, vc, cfg.seed, 0, repeats=no_repeat))
            label = (g.properties or {}).get(cfg.probe_property or "")
            labels.append(np.nan if label is None else float(label))
        if len(items) < 2:
            raise ValueError(f"diagnostics: held_out {cfg.held_out} has {len(items)} structure(s), needs >= 2")
        self.batches = [_to_torch(collate(b), self.device)
                        for b in budget_batches(items, Budget(max_atoms=cfg.max_atoms))]
        self.n = len(items)
        self.labels = np.asarray(labels, dtype=np.float64)
        self.perm = torch.as_tensor(derangement(self.n, cfg.seed), device=self.device)

    @torch.no_grad()
    def evaluate(self, objective: Any) -> dict[str, float]:
        """The diagnostics of ``objective`` (an SCD or denoising objective) with its current weights."""
        was_training = objective.training
        objective.eval()
        try:
            c = torch.cat([objective.embed(b, "_clean")[0] for b in self.batches])
            conds = {"own_c": c, "other_c": c[self.perm],
                     "mask": objective.mask_token.to(c.dtype).unsqueeze(0).expand_as(c)}
            sums = dict.fromkeys(conds, 0.0)
            atoms = 0
            start = 0
            for b in self.batches:
                g = int(b["n_atoms"].shape[0])
                target = objective.target(b).float()
                for name, cond in conds.items():
                    pred = objective.denoise(b, cond[start:start + g]).float()
                    sums[name] += float(((pred - target) ** 2).mean(dim=-1).sum())
                atoms += int(b["n_atoms"].sum())
                start += g
            ln_c = objective.cond_norm(c).double()
            out = {f"{PREFIX}loss_{k}": v / atoms for k, v in sums.items()}
            out[f"{PREFIX}gap_other_own"] = out[f"{PREFIX}loss_other_c"] / out[f"{PREFIX}loss_own_c"] - 1.0
            out[f"{PREFIX}gap_mask_own"] = out[f"{PREFIX}loss_mask"] / out[f"{PREFIX}loss_own_c"] - 1.0
            out[f"{PREFIX}c_spread"] = float(ln_c.std(dim=0).mean())
            out.update(self._probe(c))
        finally:
            objective.train(was_training)
        return out

    def _probe(self, c: Tensor) -> dict[str, float]:
        if self.cfg.probe_property is None:
            return {}
        from scd_train.embed import ridge_cv

        has = np.isfinite(self.labels)
        if has.sum() < self.cfg.probe_folds:
            return {}
        r = ridge_cv(c.double().cpu().numpy()[has], self.labels[has], alpha=self.cfg.probe_alpha,
                     folds=self.cfg.probe_folds, seed=self.cfg.seed)
        return {f"{PREFIX}probe_mae": r["mae"], f"{PREFIX}probe_baseline_mae": r["baseline_mae"]}

    def maybe_log(self, step: int, objective: Any, metrics: Any) -> dict[str, float] | None:
        """Evaluate and log (``metrics.log(step, row)``) when ``step`` is a multiple of ``eval_every``."""
        if step % self.cfg.eval_every:
            return None
        row = self.evaluate(objective)
        metrics.log(step, row)
        return row


def build_diagnostics(cfg: DiagnosticsConfig, views: ViewConfig, device: torch.device | str,
                      enabled: bool = True) -> Diagnostics | None:
    """The trainer's diagnostics (rank 0 only: ``enabled``), or None when ``held_out`` is not set."""
    return Diagnostics(cfg, views, device) if enabled and cfg.held_out is not None else None


def plot_diagnostics(metrics_path: Path, out: Path) -> Path | None:
    """A PNG of the diagnostics rows of ``metrics.jsonl`` against step; None when there are none."""
    import json

    rows = [r for r in map(json.loads, Path(metrics_path).read_text().splitlines())
            if f"{PREFIX}loss_own_c" in r]
    if not rows:
        return None
    from shards.tools.plot import pyplot

    plt = pyplot()

    steps = [r["step"] for r in rows]
    panels: list[tuple[str, list[tuple[str, str]]]] = [
        ("pretext loss (held out)", [("loss_own_c", "own c"), ("loss_other_c", "other molecule's c"),
                                     ("loss_mask", "mask token")]),
        ("relative to own c", [("gap_other_own", "other c / own c - 1"), ("gap_mask_own", "mask / own c - 1")]),
        ("spread of LN(c) across molecules", [("c_spread", "mean over features of the std")]),
    ]
    if f"{PREFIX}probe_mae" in rows[-1]:
        panels.append(("ridge probe, mask-token pass", [("probe_mae", "CV MAE"),
                                                        ("probe_baseline_mae", "predict the mean")]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (title, series) in zip(axes, panels, strict=True):
        for key, label in series:
            ax.plot(steps, [r.get(PREFIX + key, np.nan) for r in rows], marker="o", ms=3, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
