"""Conditional equivariant transformer (TorchMD-Net ET with adaLN conditioning in every layer)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scd_train.models import fused
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
class ETConfig(BackboneConfig):
    """Equivariant transformer; presets: small 128/6/8/32, paper 256/8/8/64.

    ``vector_cutoff`` multiplies the vector messages by the cosine cutoff, so they go smoothly to 0 at the
    cutoff like the attention weights do (TorchMD-Net's ET leaves them unenveloped: off by default).
    ``fused_edges`` (on by default) runs each layer's per-edge part through the fused CPU kernel
    (:mod:`scd_train.models.fused`) where it applies: CPU tensors, eager mode, no gradient through the positions
    (forces use the plain path). It is the same function summed in another order, 1.7-1.9x as fast and with
    a fraction of the activation memory; off, or where the kernel cannot be built, the plain PyTorch path runs.
    """

    heads: int = 8
    vector_cutoff: bool = False
    fused_edges: bool = True


class NeighborEmbedding(nn.Module):
    """x_i <- W [x_i, sum_j w(r_ij) emb(z_j)] (TorchMD-Net's neighbour embedding)."""

    def __init__(self, hidden: int, num_rbf: int, max_z: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(max_z, hidden)
        self.distance_proj = nn.Linear(num_rbf, hidden)
        self.combine = nn.Linear(2 * hidden, hidden)

    def forward(self, z: Tensor, x: Tensor, ops: EdgeOps, rbf: Tensor, cut: Tensor) -> Tensor:
        w = self.distance_proj(rbf) * cut.unsqueeze(-1)
        msg = ops.gather(self.embedding(z), "src") * w
        return self.combine(torch.cat([x, ops.scatter(msg, "dst")], dim=-1))


class ETLayer(nn.Module):
    """Multi-head attention with scalar and vector messages; adaLN-modulated input, gated scalar update.

    ``vec=None`` stands for all-zero vector features (the first layer).
    """

    def __init__(self, hidden: int, heads: int, num_rbf: int, adaln: str = "layerscale",
                 vector_cutoff: bool = False, checkpoint_edges: bool = False, fused_edges: bool = False) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
        self.hidden, self.heads, self.vector_cutoff = hidden, heads, vector_cutoff
        self.checkpoint_edges, self.fused_edges = checkpoint_edges, fused_edges
        self.ada = AdaLN(hidden, adaln)
        self.qkv = nn.Linear(hidden, 5 * hidden)
        self.vec_proj = nn.Linear(hidden, 3 * hidden, bias=False)
        self.dk_proj = nn.Linear(num_rbf, hidden)
        self.dv_proj = nn.Linear(num_rbf, 3 * hidden)
        self.o_proj = nn.Linear(hidden, 3 * hidden)

    def edges(self, qkv: Tensor, vec: Tensor | None, ops: EdgeOps, rbf: Tensor, cut: Tensor, unit: Tensor
              ) -> tuple[Tensor, Tensor]:
        """The per-edge part: attention-weighted scalar messages and vector messages summed into atoms."""
        f, h, e = self.hidden, self.heads, ops.n_edges
        k, v = ops.gather(qkv[:, f:], "src").split((f, 3 * f), dim=-1)  # one gather for keys and values
        qk = ops.gather(qkv[:, :f], "dst") * k * F.silu(self.dk_proj(rbf))
        attn = F.silu(qk.view(e, h, f // h).sum(-1)) * cut.unsqueeze(-1)
        xm, s1, s2 = (v * F.silu(self.dv_proj(rbf))).split(f, dim=-1)
        xm = (xm.view(e, h, f // h) * attn.unsqueeze(-1)).view(e, f)
        vm = s2.unsqueeze(1) * unit.unsqueeze(-1)
        if vec is not None:
            vm = torch.addcmul(vm, ops.gather(vec, "src"), s1.unsqueeze(1))
        if self.vector_cutoff:
            vm = vm * cut.view(e, 1, 1)
        return ops.scatter(xm, "dst"), ops.scatter(vm, "dst")

    def fused(self, qkv: Tensor, vec: Tensor | None, ops: EdgeOps, rbf: Tensor, cut: Tensor, unit: Tensor
              ) -> tuple[Tensor, Tensor] | None:
        """:meth:`edges` by the fused kernel, or None where it does not apply."""
        if not (self.fused_edges and fused.usable((qkv, vec, rbf), (cut, unit))):
            return None
        # the distance projections without their bias: bias and silu are applied inside the kernel
        pre_k, pre_v = F.linear(rbf, self.dk_proj.weight), F.linear(rbf, self.dv_proj.weight)
        bias = torch.cat([self.dk_proj.bias, self.dv_proj.bias])
        out: tuple[Tensor, Tensor] = fused.ETEdges.apply(qkv, vec, pre_k, pre_v, bias, cut, unit,
                                                         ops.kernel_graph(), self.heads, self.vector_cutoff)
        return out

    def forward(self, x: Tensor, vec: Tensor | None, cond: Tensor, batch: Tensor, ops: EdgeOps,
                rbf: Tensor, cut: Tensor, unit: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
        f = self.hidden
        xin, gate = self.ada(x, cond, batch)
        qkv = self.qkv(xin)
        out = self.fused(qkv, vec, ops, rbf, cut, unit)
        xs, dvec = out if out is not None else edge_checkpoint(self.edges, qkv, vec, ops, rbf, cut, unit,
                                                               enabled=self.checkpoint_edges)
        o1, o2, o3 = self.o_proj(xs).split(f, dim=-1)
        if vec is None:
            dx = o3 * gate
        else:
            v1, v2, v3 = self.vec_proj(vec).split(f, dim=-1)
            dx = torch.addcmul(o3, (v1 * v2).sum(dim=1), o2) * gate
            dvec = torch.addcmul(dvec, v3, o1.unsqueeze(1))
        if keep is not None:
            dx = dx * keep
            dvec = dvec * keep.unsqueeze(-1)
        return x + dx, dvec if vec is None else vec + dvec


class EquivariantTransformer(Backbone):
    """Conditional TorchMD-Net ET: exp-normal RBF, neighbour embedding, ``layers`` attention layers."""

    def __init__(self, cfg: ETConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.hidden = cfg.hidden
        self.embedding = nn.Embedding(cfg.max_z, cfg.hidden)
        self.rbf = ExpNormalRBF(cfg.num_rbf, cfg.cutoff)
        self.neighbor_embedding = NeighborEmbedding(cfg.hidden, cfg.num_rbf, cfg.max_z)
        self.layers = nn.ModuleList(ETLayer(cfg.hidden, cfg.heads, cfg.num_rbf, cfg.adaln, cfg.vector_cutoff,
                                            cfg.checkpoint_edges, cfg.fused_edges) for _ in range(cfg.layers))
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
        x = self.neighbor_embedding(z, self.embedding(z), ops, rbf, cut)
        vec = None  # zero vectors before the first layer: skip their products
        for i, layer in enumerate(self.layers):
            keep = drop_path_mask(x.shape[0], self.cfg.drop_path, self.training, generator, x)
            x, vec = layer(x, vec, cond, batch, ops, rbf, cut, unit, keep)
            if self.layer_norms is not None:
                x = self.layer_norms[i](x)
        if vec is None:
            vec = x.new_zeros(x.shape[0], 3, self.hidden)
        return self.out_norm(x), vec
