"""Heads: modules that turn a backbone's per-atom scalars and vectors into an objective's outputs.

A backbone (``scd_train.models.base.Backbone``) gives ``s [N, F]`` and ``v [N, 3, F]``; objectives and
fine-tuning models compose it with these heads (fairchem's backbone/head split), so a head can be
swapped without touching the backbone.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from scd_train.models.base import scatter_sum

__all__ = ["GatedEquivariantBlock", "GraphPool", "VectorHead"]


class GraphPool(nn.Module):
    """Per atom LN -> Linear -> SiLU -> LN, sum over each graph, then LN -> Linear -> SiLU -> LN -> Linear."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.atom = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(), nn.LayerNorm(hidden))
        self.graph = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(),
                                   nn.LayerNorm(hidden), nn.Linear(hidden, hidden))

    def forward(self, s: Tensor, batch: Tensor, n_graphs: int) -> Tensor:
        return self.graph(scatter_sum(self.atom(s), batch, n_graphs))


class GatedEquivariantBlock(nn.Module):
    """Scalars and vectors in, ``out`` scalars and vectors out; vectors gated by invariant scalars."""

    def __init__(self, hidden: int, out: int, scalar_activation: bool, eps: float = 1e-8) -> None:
        super().__init__()
        self.out, self.eps, self.scalar_activation = out, eps, scalar_activation
        self.vec1 = nn.Linear(hidden, hidden, bias=False)
        self.vec2 = nn.Linear(hidden, out, bias=False)
        self.update = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2 * out))

    def forward(self, s: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        norm = torch.sqrt((self.vec1(v) ** 2).sum(dim=1) + self.eps)
        x, gate = self.update(torch.cat([s, norm], dim=-1)).split(self.out, dim=-1)
        v = self.vec2(v) * gate.unsqueeze(1)
        return (nn.functional.silu(x) if self.scalar_activation else x), v


class VectorHead(nn.Module):
    """Two gated equivariant blocks -> one 3-vector per atom."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.block1 = GatedEquivariantBlock(hidden, hidden // 2, scalar_activation=True)
        self.block2 = GatedEquivariantBlock(hidden // 2, 1, scalar_activation=False)

    def forward(self, s: Tensor, v: Tensor) -> Tensor:
        s, v = self.block1(s, v)
        return self.block2(s, v)[1].squeeze(-1)
