"""Conditional PaiNN: scalar + vector message passing with adaLN conditioning in every block."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from scd_train.models.base import (
    AdaLN,
    Backbone,
    BackboneConfig,
    EdgeOps,
    ExpNormalRBF,
    drop_path_mask,
    edge_checkpoint,
    edge_geometry,
    with_self_loops,
)


@dataclass(frozen=True)
class PaiNNConfig(BackboneConfig):
    """PaiNN (Schuett et al. 2021) with exp-normal RBF; ``vector_eps`` keeps ||v|| differentiable at 0.

    Every PaiNN message, vector messages included, is already multiplied by the cosine cutoff, so it
    needs no ``vector_cutoff`` option.
    """

    vector_eps: float = 1e-8


class PaiNNLayer(nn.Module):
    """One message block and one update block, each an adaLN-conditioned residual update."""

    def __init__(self, hidden: int, num_rbf: int, vector_eps: float, adaln: str = "layerscale",
                 checkpoint_edges: bool = False) -> None:
        super().__init__()
        self.hidden, self.vector_eps, self.checkpoint_edges = hidden, vector_eps, checkpoint_edges
        self.ada_message = AdaLN(hidden, adaln)
        self.phi = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 3 * hidden))
        self.filter = nn.Linear(num_rbf, 3 * hidden)
        self.ada_update = AdaLN(hidden, adaln)
        self.uv = nn.Linear(hidden, 2 * hidden, bias=False)
        self.update = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, 3 * hidden))

    def edges(self, phi: Tensor, vec: Tensor, ops: EdgeOps, rbf: Tensor, cut: Tensor, unit: Tensor
              ) -> tuple[Tensor, Tensor]:
        """The per-edge part: filtered scalar and vector messages summed into atoms."""
        m = ops.gather(phi, "src") * (self.filter(rbf) * cut.unsqueeze(-1))
        ds, dv1, dv2 = m.split(self.hidden, dim=-1)
        vm = torch.addcmul(ops.gather(vec, "src") * dv1.unsqueeze(1), dv2.unsqueeze(1), unit.unsqueeze(-1))
        return ops.scatter(ds, "dst"), ops.scatter(vm, "dst")

    def forward(self, x: Tensor, vec: Tensor, cond: Tensor, batch: Tensor, ops: EdgeOps,
                rbf: Tensor, cut: Tensor, unit: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
        f = self.hidden
        h, gate = self.ada_message(x, cond, batch)
        xs, dvec = edge_checkpoint(self.edges, self.phi(h), vec, ops, rbf, cut, unit, enabled=self.checkpoint_edges)
        dx = xs * gate
        if keep is not None:
            dx, dvec = dx * keep, dvec * keep.unsqueeze(-1)
        x, vec = x + dx, vec + dvec

        h, gate = self.ada_update(x, cond, batch)
        u, w = self.uv(vec).split(f, dim=-1)
        w_norm = torch.sqrt((w * w).sum(dim=1) + self.vector_eps)
        a_vv, a_sv, a_ss = self.update(torch.cat([h, w_norm], dim=-1)).split(f, dim=-1)
        dx = torch.addcmul(a_ss, a_sv, (u * w).sum(dim=1)) * gate
        dvec = u * a_vv.unsqueeze(1)
        if keep is not None:
            dx, dvec = dx * keep, dvec * keep.unsqueeze(-1)
        return x + dx, vec + dvec


class PaiNN(Backbone):
    """Conditional PaiNN backbone."""

    def __init__(self, cfg: PaiNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.hidden = cfg.hidden
        self.embedding = nn.Embedding(cfg.max_z, cfg.hidden)
        self.rbf = ExpNormalRBF(cfg.num_rbf, cfg.cutoff)
        self.layers = nn.ModuleList(PaiNNLayer(cfg.hidden, cfg.num_rbf, cfg.vector_eps, cfg.adaln,
                                               cfg.checkpoint_edges) for _ in range(cfg.layers))
        self.layer_norms = nn.ModuleList(nn.LayerNorm(cfg.hidden) for _ in range(cfg.layers)) \
            if cfg.layer_norm else None
        self.out_norm = nn.LayerNorm(cfg.hidden)

    def forward(self, z: Tensor, pos: Tensor, edge_index: Tensor, edge_shift: Tensor, batch: Tensor,
                cond: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        if self.cfg.self_loops:
            edge_index, edge_shift = with_self_loops(edge_index, edge_shift, z.shape[0])
        ops = EdgeOps(edge_index, z.shape[0])
        dist, unit = edge_geometry(pos, edge_index, edge_shift)
        rbf, cut = self.rbf(dist)
        x = self.embedding(z)
        vec = x.new_zeros(x.shape[0], 3, self.hidden)
        for i, layer in enumerate(self.layers):
            keep = drop_path_mask(x.shape[0], self.cfg.drop_path, self.training, generator, x)
            x, vec = layer(x, vec, cond, batch, ops, rbf, cut, unit, keep)
            if self.layer_norms is not None:
                x = self.layer_norms[i](x)
        return self.out_norm(x), vec
