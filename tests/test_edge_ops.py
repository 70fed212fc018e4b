"""EdgeOps (sparse CSR gathers/sums on CPU) against plain indexing: values, gradients, double backward."""
from __future__ import annotations

import torch

from scd_train.models.base import EdgeOps


def _graph(n: int, e: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (2, e), generator=g)


def test_gather_and_scatter_match_indexing_with_gradients() -> None:
    n, e = 7, 40
    ei = _graph(n, e, 0)
    ei[:, :3] = torch.tensor([[6, 6, 6], [0, 0, 0]])  # repeated edges; atom 5 may get none
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(e, 3, 4, dtype=torch.float64, generator=g)
    ops = EdgeOps(ei, n)
    assert ops.sparse
    got = ops.scatter(ops.gather(x, "src") * w, "dst")
    x_ref = x.detach().clone().requires_grad_(True)
    want = torch.zeros(n, 3, 4, dtype=torch.float64).index_add_(0, ei[1], x_ref[ei[0]] * w)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    up = torch.randn(n, 3, 4, dtype=torch.float64, generator=g)
    (gx,) = torch.autograd.grad(got, x, up)
    (gx_ref,) = torch.autograd.grad(want, x_ref, up)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=1e-12)


def test_double_backward_matches_indexing() -> None:
    n, e = 6, 30
    ei = _graph(n, e, 2)
    x = torch.randn(n, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)

    def energy(gather, scatter) -> torch.Tensor:  # noqa: ANN001 - two small closures
        h = torch.tanh(scatter(gather(x, 0) * gather(x, 1)))
        return (h ** 2).sum()

    ops = EdgeOps(ei, n)
    e1 = energy(lambda t, i: ops.gather(t, ("src", "dst")[i]), lambda m: ops.scatter(m, "dst"))
    e2 = energy(lambda t, i: t[ei[i]], lambda m: torch.zeros(n, 5, dtype=m.dtype).index_add(0, ei[1], m))
    (f1,) = torch.autograd.grad(e1, x, create_graph=True)
    (f2,) = torch.autograd.grad(e2, x, create_graph=True)
    torch.testing.assert_close(f1, f2, rtol=0, atol=1e-12)
    (h1,) = torch.autograd.grad(f1.pow(2).sum(), x)
    (h2,) = torch.autograd.grad(f2.pow(2).sum(), x)
    torch.testing.assert_close(h1, h2, rtol=0, atol=1e-12)
