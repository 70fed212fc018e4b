"""Pretraining objectives: Self-Conditioned Denoising (SCD) and plain coordinate denoising.

An objective composes a backbone (:mod:`scd_train.models`) with heads (:mod:`scd_train.models.heads`:
graph pooling for the condition, a gated equivariant vector head for the noise) and owns the loss.

The training loop only sees ``Objective.forward(batch, generator) -> (loss_sum, n_atoms, metrics)``:
``loss_sum`` is the SUM over atoms of the per-atom squared error (averaged over the 3 axes) and
``n_atoms`` the local atom count, so the loop can divide by the atom count of all ranks.

Batch keys (torch tensors): ``z [N]``, ``batch [N]``, ``n_atoms [G]`` and, per view ``<v>`` in
``_clean`` / ``_noisy`` (or ``""`` for a single view), ``pos<v> [N,3]``, ``edge_index<v> [2,E]``,
``edge_shift<v> [E,3]``; ``noise [N,3]`` is the denoising target.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from scd_train.models import Backbone, GraphPool, VectorHead, backbone_config, build_backbone
from scd_train.models.base import scatter_sum

__all__ = ["OBJECTIVES", "Denoise", "Objective", "ObjectiveConfig", "SCD", "build_objective"]


@dataclass(frozen=True)
class ObjectiveConfig:
    """Which objective and backbone; backbone fields left None take the ``preset`` values (or the backbone's
    defaults: ``adaln``, ``layer_norm``, ``self_loops``, ``vector_cutoff``, ``checkpoint_edges``, see
    :mod:`scd_train.models.base`; ``fused_edges``, ET only, see :mod:`scd_train.models.et`).

    ``center_noise`` subtracts each structure's mean noise from the denoising target (the authors' GPU
    path). Off by default: existing runs and results stay reproducible; the removed part (a translation
    of the noisy view) is invisible to a translation-invariant model, so centring only removes an
    unlearnable floor from the loss.
    """

    kind: str = "scd"
    backbone: str = "et"
    preset: str = "small"
    hidden: int | None = None
    layers: int | None = None
    heads: int | None = None
    num_rbf: int | None = None
    cutoff: float | None = None
    drop_path: float | None = None
    drop_cond: float = 0.2
    freeze_embeddings: bool = True
    center_noise: bool = False
    adaln: str | None = None
    layer_norm: bool | None = None
    self_loops: bool | None = None
    vector_cutoff: bool | None = None
    checkpoint_edges: bool | None = None
    fused_edges: bool | None = None


class Objective(nn.Module):
    """Interface: ``forward(batch, generator=None) -> (loss_sum, n_atoms, metrics)``."""

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None
                ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        raise NotImplementedError


class _Denoising(Objective):
    """Backbone, mask token, cond LayerNorm, pooling, vector head and running noise statistics.

    Buffers (in ``state_dict``): ``noise_sum [3]``, ``noise_sumsq [3]``, ``noise_count []`` (float64),
    summed over all DDP ranks.
    """

    backbone: Backbone
    noise_sum: Tensor
    noise_sumsq: Tensor
    noise_count: Tensor

    def __init__(self, backbone: Backbone, drop_cond: float = 0.2, freeze_embeddings: bool = True,
                 center_noise: bool = False) -> None:
        super().__init__()
        hidden = backbone.hidden
        self.backbone, self.drop_cond, self.center_noise = backbone, drop_cond, center_noise
        self.mask_token = nn.Parameter(torch.randn(hidden))
        self.cond_norm = nn.LayerNorm(hidden)
        self.pool = GraphPool(hidden)
        self.head = VectorHead(hidden)
        self.register_buffer("noise_sum", torch.zeros(3, dtype=torch.float64))
        self.register_buffer("noise_sumsq", torch.zeros(3, dtype=torch.float64))
        self.register_buffer("noise_count", torch.zeros((), dtype=torch.float64))
        if freeze_embeddings:
            self.mask_token.requires_grad_(False)
            for emb in backbone.element_embeddings():
                emb.weight.requires_grad_(False)

    def _run(self, batch: dict[str, Any], view: str, cond: Tensor, generator: torch.Generator | None
             ) -> tuple[Tensor, Tensor]:
        return self.backbone(batch["z"], batch["pos" + view], batch["edge_index" + view],
                             batch["edge_shift" + view], batch["batch"], self.cond_norm(cond), generator)

    def _mask_cond(self, n_graphs: int) -> Tensor:
        return self.mask_token.unsqueeze(0).expand(n_graphs, -1)

    @torch.no_grad()
    def update_noise_stats(self, noise: Tensor) -> None:
        """Accumulate per-axis sum, sum of squares and count (all-reduced over DDP ranks)."""
        x = noise.detach().to(torch.float64).reshape(-1, 3)
        local = torch.cat([x.sum(0), (x * x).sum(0), x.new_ones(x.shape[0]).sum(0, keepdim=True)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(local, op=dist.ReduceOp.SUM)
        self.noise_sum += local[:3]
        self.noise_sumsq += local[3:6]
        self.noise_count += local[6]

    def noise_stats(self) -> tuple[Tensor, Tensor]:
        """Running per-axis ``(mean [3], std [3])`` (0 and 1 before any update); no host sync."""
        count = self.noise_count.clamp_min(1.0)
        mean = self.noise_sum / count
        var = (self.noise_sumsq / count - mean * mean).clamp_min(1e-24)
        return mean, torch.where(self.noise_count > 0, var.sqrt(), torch.ones_like(var))

    def noise_target(self, batch: dict[str, Any]) -> Tensor:
        """The noise [N, 3] the head learns, before normalisation: ``batch["noise"]``, minus each structure's
        mean noise when ``center_noise``."""
        noise = batch["noise"]
        if not self.center_noise:
            return noise
        n_atoms = batch["n_atoms"]
        mean = scatter_sum(noise, batch["batch"], n_atoms.shape[0]) / n_atoms.clamp_min(1).to(noise.dtype).unsqueeze(-1)
        return noise - mean.index_select(0, batch["batch"])

    def target(self, batch: dict[str, Any]) -> Tensor:
        """The normalised denoising target [N, 3] (float64) under the current running statistics."""
        mean, std = self.noise_stats()
        return (self.noise_target(batch).to(torch.float64) - mean) / std

    def denoise(self, batch: dict[str, Any], cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Head output [N, 3] on the noisy view conditioned on ``cond [G, F]`` (LayerNormed here, as in pass 2)."""
        s, v = self._run(batch, "_noisy", cond, generator)
        return self.head(s, v)

    def predict(self, batch: dict[str, Any], generator: torch.Generator | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """Head output [N, 3] in normalised noise units, and extra metrics."""
        raise NotImplementedError

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None
                ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        noise = self.noise_target(batch)
        if self.training:
            self.update_noise_stats(noise)
        pred, metrics = self.predict(batch, generator)
        mean, std = self.noise_stats()
        target = (noise.to(torch.float64) - mean) / std
        err = (pred.float() - target.float()) ** 2
        loss_sum = err.mean(dim=-1).sum()
        metrics["noise_std"] = std.mean().detach().float()
        return loss_sum, noise.new_ones(noise.shape[0]).sum(), metrics

    def embed(self, batch: dict[str, Any], view: str = "", generator: torch.Generator | None = None
              ) -> tuple[Tensor, Tensor, Tensor]:
        """One pass on view ``view`` conditioned on the mask token: ``(c [G, F], s [N, F], v [N, 3, F])``.

        For downstream use (embeddings, fine-tuning); ``generator`` drives drop-path in training mode.
        """
        n_graphs = batch["n_atoms"].shape[0]
        s, v = self._run(batch, view, self._mask_cond(n_graphs), generator)
        return self.pool(s, batch["batch"], n_graphs), s, v


class SCD(_Denoising):
    """Self-Conditioned Denoising: pass 1 (clean, mask token) -> c -> pass 2 (noisy, conditioned on c)."""

    def predict(self, batch: dict[str, Any], generator: torch.Generator | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        n_graphs = batch["n_atoms"].shape[0]
        s, _ = self._run(batch, "_clean", self._mask_cond(n_graphs), generator)
        c = self.pool(s, batch["batch"], n_graphs)
        metrics: dict[str, Tensor] = {}
        if self.training and self.drop_cond > 0:
            if generator is None:
                raise ValueError("drop-cond in training mode needs a torch.Generator (no global RNG)")
            drop = torch.rand(n_graphs, generator=generator, device=c.device) < self.drop_cond
            c = torch.where(drop.unsqueeze(-1), self.mask_token.to(c.dtype).expand_as(c), c)
            metrics["cond_dropped"] = drop.float().mean()
        s, v = self._run(batch, "_noisy", c, generator)
        return self.head(s, v), metrics


class Denoise(_Denoising):
    """Plain coordinate denoising: one pass on the noisy view, always conditioned on the mask token."""

    def predict(self, batch: dict[str, Any], generator: torch.Generator | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        s, v = self._run(batch, "_noisy", self._mask_cond(batch["n_atoms"].shape[0]), generator)
        return self.head(s, v), {}


OBJECTIVES: dict[str, type[_Denoising]] = {"scd": SCD, "denoise": Denoise}


def build_objective(cfg: ObjectiveConfig) -> _Denoising:
    """Backbone from ``cfg.backbone``/``cfg.preset`` (+ overrides), wrapped in objective ``cfg.kind``."""
    if cfg.kind not in OBJECTIVES:
        raise KeyError(f"unknown objective {cfg.kind!r}; known: {sorted(OBJECTIVES)}")
    bb = backbone_config(cfg.backbone, cfg.preset, hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads,
                         num_rbf=cfg.num_rbf, cutoff=cfg.cutoff, drop_path=cfg.drop_path, adaln=cfg.adaln,
                         layer_norm=cfg.layer_norm, self_loops=cfg.self_loops, vector_cutoff=cfg.vector_cutoff,
                         checkpoint_edges=cfg.checkpoint_edges, fused_edges=cfg.fused_edges)
    return OBJECTIVES[cfg.kind](build_backbone(bb), drop_cond=cfg.drop_cond,
                                freeze_embeddings=cfg.freeze_embeddings, center_noise=cfg.center_noise)
