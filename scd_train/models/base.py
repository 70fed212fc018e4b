"""The backbone protocol and the building blocks shared by the backbones.

A backbone maps atoms, positions and a radius graph to per-atom scalars ``s [N, F]`` and vectors
``v [N, 3, F]`` (one 3-vector per feature channel), conditioned on a per-graph vector ``cond [G, F]``.
Edge convention: messages flow ``src = edge_index[0] -> dst = edge_index[1]`` and the vector from
``dst`` to the neighbour image is ``pos[src] + edge_shift - pos[dst]``.

Every vector operation is linear in the vectors without bias (channel mixing only) or multiplies
them by invariant scalars, so the backbones are exactly E(3)-equivariant (O(3) included).

Model options shared by the backbones (all off by default, so existing configs, checkpoints and results
are unchanged; each is tested for exact equivariance): ``adaln`` picks the conditioning MLP
(:data:`ADALN_VARIANTS`), ``layer_norm`` adds a LayerNorm on the scalars after every layer, and
``self_loops`` gives every atom one edge to itself inside the model (:func:`with_self_loops`), and
``checkpoint_edges`` recomputes each layer's per-edge part in the backward pass instead of storing it
(:func:`edge_checkpoint`: less memory, more compute, the same numbers).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

MAX_Z = 119  # atomic numbers 1..118; 0 is unused


@dataclass(frozen=True)
class BackboneConfig:
    """Fields shared by all backbones; each backbone subclasses this with its own frozen config."""

    hidden: int = 128
    layers: int = 6
    num_rbf: int = 32
    cutoff: float = 5.0
    drop_path: float = 0.1
    max_z: int = MAX_Z
    adaln: str = "layerscale"
    layer_norm: bool = False
    self_loops: bool = False
    checkpoint_edges: bool = False

    def __post_init__(self) -> None:
        if self.adaln not in ADALN_VARIANTS:
            raise ValueError(f"adaln {self.adaln!r} is not one of {sorted(ADALN_VARIANTS)}")


class Backbone(nn.Module):
    """Protocol: ``forward(z, pos, edge_index, edge_shift, batch, cond, generator=None) -> (s, v)``.

    ``cond`` is the per-graph conditioning vector [G, hidden] (already LayerNormed by the caller);
    ``generator`` drives drop-path in training mode (required then if ``drop_path > 0``).
    """

    hidden: int
    cfg: BackboneConfig

    def element_embeddings(self) -> list[nn.Embedding]:
        """The element embedding tables (frozen during pretraining when asked)."""
        return [m for m in self.modules() if isinstance(m, nn.Embedding)]

    def forward(self, z: Tensor, pos: Tensor, edge_index: Tensor, edge_shift: Tensor, batch: Tensor,
                cond: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


def edge_geometry(pos: Tensor, edge_index: Tensor, edge_shift: Tensor) -> tuple[Tensor, Tensor]:
    """Distances [E] and unit vectors [E, 3] from ``dst`` to the ``src`` image."""
    src, dst = edge_index[0], edge_index[1]
    vec = pos.index_select(0, src) - pos.index_select(0, dst) + edge_shift.to(pos.dtype)
    dist = vec.norm(dim=-1)
    # a self loop (zero vector) has a zero unit vector and passes no gradient through it: vec / 1e-9
    # would send +-1e9-sized gradients to the same atom, whose cancellation loses the forces' precision
    unit = torch.where((dist > 0).unsqueeze(-1), vec / dist.clamp_min(1e-9).unsqueeze(-1), torch.zeros_like(vec))
    return dist, unit


def with_self_loops(edge_index: Tensor, edge_shift: Tensor, n_atoms: int) -> tuple[Tensor, Tensor]:
    """The graph with exactly one zero-shift ``i -> i`` edge per atom, appended after the other edges.

    Self loops already in the input (zero shift) are dropped first, so a view built with
    ``views.self_loops`` gets no duplicates; an ``i -> i`` edge to a periodic image is a real neighbour
    and stays.
    """
    loop = (edge_index[0] == edge_index[1]) & (edge_shift == 0).all(dim=-1)
    keep = ~loop
    atoms = torch.arange(n_atoms, dtype=edge_index.dtype, device=edge_index.device)
    return (torch.cat([edge_index[:, keep], atoms.unsqueeze(0).expand(2, -1)], dim=1),
            torch.cat([edge_shift[keep], edge_shift.new_zeros(n_atoms, 3)]))


class CosineCutoff(nn.Module):
    """0.5 (cos(pi r / rc) + 1) inside the cutoff, 0 outside."""

    def __init__(self, cutoff: float) -> None:
        super().__init__()
        self.cutoff = cutoff

    def forward(self, dist: Tensor) -> Tensor:
        return 0.5 * (torch.cos(dist * (math.pi / self.cutoff)) + 1.0) * (dist < self.cutoff).to(dist.dtype)


class ExpNormalRBF(nn.Module):
    """TorchMD-Net's exp-normal radial basis, multiplied by the cosine cutoff."""

    means: Tensor
    betas: Tensor

    def __init__(self, num_rbf: int, cutoff: float) -> None:
        super().__init__()
        start = math.exp(-cutoff)
        self.alpha = 5.0 / cutoff
        self.register_buffer("means", torch.linspace(start, 1.0, num_rbf), persistent=False)
        self.register_buffer("betas", torch.full((num_rbf,), (2.0 / num_rbf * (1.0 - start)) ** -2),
                             persistent=False)
        self.cutoff = CosineCutoff(cutoff)

    def forward(self, dist: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``(rbf [E, num_rbf], cutoff [E])``."""
        cut = self.cutoff(dist)
        d = dist.unsqueeze(-1)
        rbf = torch.exp(-self.betas * (torch.exp(-self.alpha * d) - self.means) ** 2)
        return rbf * cut.unsqueeze(-1), cut


@dataclass(frozen=True)
class AdaLNVariant:
    """How the adaLN modulation MLP is built: a LayerNorm on its hidden layer or not, and how the gate
    outputs start (``zero_gate``: weights and bias 0, so every scalar residual update starts at exactly 0)."""

    hidden_norm: bool
    zero_gate: bool
    doc: str


ADALN_VARIANTS: dict[str, AdaLNVariant] = {
    "layerscale": AdaLNVariant(False, False, "Linear -> SiLU -> Linear; gate bias 1, so the residual scale "
                                             "starts near tanh(0.2) like a layer scale (the default)"),
    "ln_zero": AdaLNVariant(True, True, "Linear -> LayerNorm -> SiLU -> Linear; gate weights and bias 0, so "
                                        "each layer starts as the identity on the scalars (adaLN-Zero, as in "
                                        "the authors' model)"),
}


class AdaLN(nn.Module):
    """Per-atom adaptive LayerNorm: an MLP on ``[c, stop_grad(LN(x))]`` gives shift, scale and gate.

    Returns the modulated input ``LN(x) (1 + scale) + shift`` and the scalar residual gate
    ``tanh(gate * a)`` with a learnable scalar ``a`` (init 0.2). ``variant`` (:data:`ADALN_VARIANTS`) sets
    the MLP's hidden LayerNorm and the gate's start. ``stop_gradient`` (default on, as in
    pretraining) detaches ``LN(x)`` in the modulation MLP; force fields turn it off so that forces are the
    exact gradient of the energy (:func:`set_stop_gradient`).
    """

    def __init__(self, hidden: int, variant: str = "layerscale") -> None:
        super().__init__()
        spec = ADALN_VARIANTS[variant]
        self.stop_gradient = True
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.cond_proj = nn.Linear(hidden, hidden)
        self.x_proj = nn.Linear(hidden, hidden, bias=False)
        self.hidden_norm: nn.Module = nn.LayerNorm(hidden) if spec.hidden_norm else nn.Identity()
        self.out = nn.Linear(hidden, 3 * hidden)
        self.gate_scale = nn.Parameter(torch.tensor(0.2))
        with torch.no_grad():
            self.out.bias.zero_()
            if spec.zero_gate:
                self.out.weight[2 * hidden:].zero_()
            else:
                self.out.bias[2 * hidden:].fill_(1.0)

    def forward(self, x: Tensor, cond: Tensor, batch: Tensor) -> tuple[Tensor, Tensor]:
        xn = self.norm(x)
        xc = xn.detach() if self.stop_gradient else xn
        hid = F.silu(self.hidden_norm(self.cond_proj(cond).index_select(0, batch) + self.x_proj(xc)))
        shift, scale, gate = self.out(hid).chunk(3, dim=-1)
        return torch.addcmul(shift, xn, 1.0 + scale), torch.tanh(gate * self.gate_scale)


def set_stop_gradient(module: nn.Module, flag: bool) -> None:
    """Set :attr:`AdaLN.stop_gradient` in every AdaLN below ``module`` (off for conservative forces)."""
    for m in module.modules():
        if isinstance(m, AdaLN):
            m.stop_gradient = flag


def edge_checkpoint(fn: Callable[..., tuple[Tensor, Tensor]], *args: Any, enabled: bool
                    ) -> tuple[Tensor, Tensor]:
    """``fn(*args)``, with activation checkpointing when ``enabled`` and gradients are on.

    ``fn`` is a layer's per-edge part (gathers, edge messages, sums into atoms): its ``[E, ...]``
    intermediates are freed after the forward and recomputed in the backward, so only its inputs are kept.
    ``fn`` draws no random numbers, so the recomputation is the same computation and gives the same values.
    """
    if not (enabled and torch.is_grad_enabled()):
        return fn(*args)
    out: tuple[Tensor, Tensor] = checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return out


def drop_path_mask(n: int, p: float, training: bool, generator: torch.Generator | None,
                   like: Tensor) -> Tensor | None:
    """Per-atom stochastic-depth multipliers [N, 1] (kept atoms scaled by 1/(1-p)); None when off."""
    if not training or p <= 0.0:
        return None
    if generator is None:
        raise ValueError("drop_path > 0 in training mode needs a torch.Generator (no global RNG)")
    keep = torch.rand(n, 1, generator=generator, device=like.device) >= p
    return keep.to(like.dtype) / (1.0 - p)


def scatter_sum(src: Tensor, index: Tensor, size: int) -> Tensor:
    """Sum rows of ``src`` into ``size`` rows by ``index`` (first dimension)."""
    out = src.new_zeros((size,) + tuple(src.shape[1:]))
    return out.index_add_(0, index, src)


class EdgeOps:
    """Gathers of atom rows onto the edges of one graph and sums of edge rows into atoms.

    ``gather(x, "src")`` is ``x[src]``; ``scatter(m, "dst")`` sums edge rows into their ``dst`` atom.
    On CPU the sums (forward of ``scatter``, backward of ``gather``) are products with a sparse CSR
    incidence matrix ``[N, E]`` built once per graph and shared by all layers, several times faster than
    ``index_add_``; each atom's edges are summed in edge order, like ``index_add_``. Both are exact
    linear maps whose backward is the other one, so double backward (forces) works. Other devices, and
    code being compiled by ``torch.compile``, use ``index_select`` / ``index_add_``.
    """

    def __init__(self, edge_index: Tensor, n_atoms: int) -> None:
        self.edge_index = edge_index
        self.index = {"src": edge_index[0], "dst": edge_index[1]}
        self.n_atoms, self.n_edges = n_atoms, int(edge_index.shape[1])
        # under torch.compile the index ops are traced and fused instead (sparse tensors break the graph)
        self.sparse = edge_index.device.type == "cpu" and not torch.compiler.is_compiling()
        self._incidence: dict[tuple[str, torch.dtype], Tensor] = {}
        self._csr: dict[str, tuple[Tensor, Tensor]] = {}

    def csr(self, side: str) -> tuple[Tensor, Tensor]:
        """Row pointers ``[N + 1]`` and edge ids ``[E]`` of the edges grouped by ``index[side]``, in edge order."""
        if side not in self._csr:
            idx = self.index[side]
            order = torch.argsort(idx, stable=True)
            crow = torch.zeros(self.n_atoms + 1, dtype=torch.int64, device=idx.device)
            crow[1:] = torch.cumsum(torch.bincount(idx, minlength=self.n_atoms), 0)
            self._csr[side] = crow, order
        return self._csr[side]

    def kernel_graph(self) -> tuple[Tensor, ...]:
        """``(edge_index, dst rows, dst edges, src rows, src edges)`` as contiguous int64, for fused kernels."""
        return (self.edge_index.to(torch.int64).contiguous(), *self.csr("dst"), *self.csr("src"))

    def incidence(self, side: str, dtype: torch.dtype) -> Tensor:
        """The CSR matrix ``[N, E]`` with a one at ``(index[side][e], e)`` (cached per dtype)."""
        key = (side, dtype)
        if key not in self._incidence:
            crow, order = self.csr(side)
            ones = torch.ones(self.n_edges, dtype=dtype, device=crow.device)
            with warnings.catch_warnings():  # "sparse CSR support is in beta": products with dense are stable
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support", category=UserWarning)
                self._incidence[key] = torch.sparse_csr_tensor(crow, order, ones, (self.n_atoms, self.n_edges),
                                                                  check_invariants=False)
        return self._incidence[key]

    def gather(self, x: Tensor, side: str) -> Tensor:
        """``x[index[side]]`` for atom rows ``x [N, ...]``."""
        if not self.sparse:
            return x.index_select(0, self.index[side])
        return _Gather.apply(x, self, side)

    def scatter(self, m: Tensor, side: str) -> Tensor:
        """Sum of edge rows ``m [E, ...]`` into their ``index[side]`` atom: ``[N, ...]``."""
        if not self.sparse:
            return scatter_sum(m, self.index[side], self.n_atoms)
        return _Scatter.apply(m, self, side)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, ops: EdgeOps, side: str) -> Tensor:
        ctx.ops, ctx.side = ops, side
        return x.index_select(0, ops.index[side])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return _Scatter.apply(grad, ctx.ops, ctx.side), None, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, m: Tensor, ops: EdgeOps, side: str) -> Tensor:
        ctx.ops, ctx.side = ops, side
        width = math.prod(m.shape[1:])  # explicit: -1 is ambiguous when there are no edges
        out = ops.incidence(side, m.dtype) @ m.reshape(ops.n_edges, width)
        return out.reshape((ops.n_atoms,) + tuple(m.shape[1:]))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return _Gather.apply(grad, ctx.ops, ctx.side), None, None
