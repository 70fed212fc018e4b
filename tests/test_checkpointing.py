"""``checkpoint_edges``: the checkpointed SCD step gives the plain step's loss and gradients bit for bit (the
recomputation is the same computation), and autograd keeps less for the backward."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from scd_train.models import BACKBONE_CONFIGS
from scd_train.objectives import ObjectiveConfig, build_objective
from shards.stream.graph import radius_graph
from tests.modelhelp import saved_bytes


def _batch(sizes: tuple[int, ...] = (6, 9, 7), seed: int = 3) -> dict[str, torch.Tensor]:
    """Random molecules (float64) with a clean and a noisy view and their 5 A radius graphs."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("z", "pos_clean", "pos_noisy", "noise")}
    edges: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {"_clean": ([], []), "_noisy": ([], [])}
    start = 0
    for n in sizes:
        pos = rng.normal(scale=1.2, size=(n, 3))
        eps = rng.normal(scale=0.05, size=(n, 3))
        views = {"_clean": pos + rng.normal(scale=0.005, size=(n, 3)), "_noisy": pos + eps}
        cols["z"].append(rng.choice([1, 6, 7, 8], size=n))
        cols["noise"].append(eps)
        for v, p in views.items():
            cols["pos" + v].append(p)
            ei, sh = radius_graph(p, cutoff=5.0)
            edges[v][0].append(ei + start)
            edges[v][1].append(sh)
        start += n
    out = {k: torch.as_tensor(np.concatenate(v), dtype=torch.float64) for k, v in cols.items() if k != "z"}
    out["z"] = torch.as_tensor(np.concatenate(cols["z"]), dtype=torch.int64)
    for v, (ei, sh) in edges.items():
        out["edge_index" + v] = torch.as_tensor(np.concatenate(ei, axis=1))
        out["edge_shift" + v] = torch.as_tensor(np.concatenate(sh), dtype=torch.float64)
    out["n_atoms"] = torch.as_tensor(sizes)
    out["batch"] = torch.repeat_interleave(torch.arange(len(sizes)), out["n_atoms"])
    return out


def _objective(backbone: str, checkpoint_edges: bool, **kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"heads": 4, "fused_edges": False} if backbone == "et" else {}  # checkpointing is for the plain path
    cfg = ObjectiveConfig(kind="scd", backbone=backbone, preset="small", hidden=16, layers=3, num_rbf=8,
                          drop_path=0.2, checkpoint_edges=checkpoint_edges, **extra, **kw)  # type: ignore[arg-type]
    return build_objective(cfg).double().train()


def _step(obj: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss_sum, n, _ = obj(batch, generator=torch.Generator().manual_seed(11))
    loss = loss_sum / n
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in obj.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("extra", [{}, {"self_loops": True, "adaln": "ln_zero"}])
@pytest.mark.parametrize("backbone", sorted(BACKBONE_CONFIGS))
def test_checkpointed_step_equals_plain(backbone: str, extra: dict) -> None:
    batch = _batch()
    plain = _objective(backbone, False, **extra)
    ckpt = _objective(backbone, True, **extra)
    ckpt.load_state_dict(plain.state_dict())
    loss_p, grads_p = _step(plain, batch)
    loss_c, grads_c = _step(ckpt, batch)
    assert torch.isfinite(loss_p) and loss_p > 0
    assert torch.equal(loss_c, loss_p), (loss_c, loss_p)
    assert grads_c.keys() == grads_p.keys() and len(grads_p) > 10
    edge_params = [k for k in grads_p if k.endswith(("layers.0.dv_proj.weight", "layers.0.filter.weight"))]
    assert len(edge_params) == 1 and grads_c[edge_params[0]].abs().sum() > 0  # the recomputed part has gradients
    for k in grads_p:
        assert torch.equal(grads_c[k], grads_p[k]), (k, (grads_c[k] - grads_p[k]).abs().max())


@pytest.mark.parametrize("backbone", sorted(BACKBONE_CONFIGS))
def test_checkpointing_keeps_fewer_edge_activations(backbone: str) -> None:
    batch = _batch(sizes=(12, 14))  # dense molecules: edges (~ n^2) dominate the atoms
    plain = saved_bytes(_objective(backbone, False), batch)
    ckpt = saved_bytes(_objective(backbone, True), batch)
    assert ckpt < 0.6 * plain, (ckpt, plain)


@pytest.mark.slow
def test_compiled_step_matches_eager() -> None:
    """``torch.compile`` (CPU inductor: the edge sums become traced index ops, fused with the messages) gives
    the eager step's loss and gradients to rounding, with drop-path drawn from the same generator."""
    batch = _batch()
    eager, compiled = _objective("et", False), _objective("et", False)
    loss_e, grads_e = _step(eager, batch)
    loss_c, grads_c = _step(torch.compile(compiled), batch)
    grads_c = {k.removeprefix("_orig_mod."): g for k, g in grads_c.items()}
    assert torch.allclose(loss_c, loss_e, rtol=1e-6, atol=0)  # the loss is reduced in float32 by design
    assert grads_c.keys() == grads_e.keys()
    for k, g in grads_e.items():
        assert torch.allclose(grads_c[k], g, rtol=1e-9, atol=1e-12), k
    # the graph breaks left are the generator draws (drop-path, drop-cond), not the edge sums
    torch._dynamo.reset()
    explained = torch._dynamo.explain(_objective("et", False))(batch, generator=torch.Generator().manual_seed(11))
    reasons = " ".join(str(r.reason) for r in explained.break_reasons).lower()
    assert "sparse" not in reasons and "bincount" not in reasons
