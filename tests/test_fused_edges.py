"""The fused ET edge kernel (``scd_train/models/csrc/et_edges.cpp``): builds here, computes the plain path's
function (outputs and every gradient, float64, to rounding), is deterministic for any thread count, keeps a
fraction of the plain path's activations, and steps aside where it does not apply (forces, compiling)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from scd_train.models import ETConfig, build_backbone, fused
from scd_train.models.base import EdgeOps
from scd_train.objectives import ObjectiveConfig, build_objective
from shards.stream.graph import radius_graph
from tests.modelhelp import saved_bytes


def _structures(seed: int = 5) -> dict[str, torch.Tensor]:
    """Two molecules, a lone atom (no edges) and a periodic crystal (edges to images), batched, float64."""
    rng = np.random.default_rng(seed)
    parts = [(rng.choice([1, 6, 7, 8], size=n), rng.normal(scale=1.2, size=(n, 3)), None) for n in (7, 11)]
    parts.append((np.array([6]), np.zeros((1, 3)), None))
    cell = np.array([[3.2, 0.0, 0.0], [0.9, 3.0, 0.0], [0.4, 0.6, 3.4]])
    parts.append((np.array([3, 8, 14, 26]), rng.uniform(size=(4, 3)) @ cell, cell))
    z, pos, ei, sh, batch, start = [], [], [], [], [], 0
    for g, (zz, p, c) in enumerate(parts):
        e, s = radius_graph(p, c, None if c is None else np.array([True] * 3), cutoff=4.0)
        z.append(zz), pos.append(p), ei.append(e + start), sh.append(s), batch.append(np.full(len(zz), g))
        start += len(zz)
    return {"z": torch.as_tensor(np.concatenate(z)), "pos": torch.as_tensor(np.concatenate(pos)),
            "edge_index": torch.as_tensor(np.concatenate(ei, axis=1)),
            "edge_shift": torch.as_tensor(np.concatenate(sh), dtype=torch.float64),
            "batch": torch.as_tensor(np.concatenate(batch)), "n_graphs": torch.tensor(len(parts))}


def _model(fused_edges: bool, **kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ETConfig(hidden=32, layers=3, heads=4, num_rbf=8, cutoff=4.0, drop_path=0.0, fused_edges=fused_edges,
                   **kw)  # type: ignore[arg-type]
    model = build_backbone(cfg).double().train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # perturbed so zero-initialised gates act and every weight matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _forward_backward(model: torch.nn.Module, d: dict[str, torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], bool]:
    cond = torch.randn(int(d["n_graphs"]), 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    s, v = model(d["z"], d["pos"], d["edge_index"], d["edge_shift"], d["batch"], cond)
    (s.pow(2).sum() + v.sum(dim=1).pow(2).sum()).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return s.detach(), v.detach(), grads, _uses_kernel(s)


def _uses_kernel(out: torch.Tensor) -> bool:
    """Whether the autograd graph behind ``out`` holds a fused-kernel node."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == "ETEdgesBackward":
            return True
        todo.extend(f for f, _ in fn.next_functions)
    return False


def test_kernel_builds_on_this_machine() -> None:
    assert fused.kernel() is not None, "the fused ET edge kernel did not build (see the logged warning)"


@pytest.mark.parametrize("options", [{}, {"vector_cutoff": True}, {"self_loops": True, "adaln": "ln_zero"}],
                         ids=["default", "vector_cutoff", "self_loops"])
def test_fused_equals_plain_in_outputs_and_every_gradient(options: dict) -> None:
    d = _structures()
    assert d["edge_shift"].abs().sum() > 0 and d["edge_index"].shape[1] > 50
    s0, v0, g0, used0 = _forward_backward(_model(False, **options), d)
    s1, v1, g1, used1 = _forward_backward(_model(True, **options), d)
    assert used1 and not used0
    assert v0.abs().max() > 1e-3 and s0.std() > 1e-3, "trivial features"
    torch.testing.assert_close(s1, s0, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(v1, v0, rtol=1e-11, atol=1e-12)
    assert g1.keys() == g0.keys() and len(g0) > 30
    for k in g0:
        assert g0[k].abs().max() > 0 or "layers.0.vec_proj" in k, k
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-10, atol=1e-12, msg=k)


def _kernel_io(threads: int) -> list[torch.Tensor]:
    """Forward outputs and input gradients of the kernel alone on a random graph, float32, ``threads`` threads."""
    g = torch.Generator().manual_seed(7)
    n, e, f = 300, 4000, 64
    ei = torch.randint(0, n, (2, e), generator=g)
    qkv, vec = torch.randn(n, 5 * f, generator=g), torch.randn(n, 3, f, generator=g)
    pre_k, pre_v = torch.randn(e, f, generator=g), torch.randn(e, 3 * f, generator=g)
    bias = torch.randn(4 * f, generator=g)
    cut, unit = torch.rand(e, generator=g), torch.nn.functional.normalize(torch.randn(e, 3, generator=g), dim=1)
    inputs = [t.requires_grad_() for t in (qkv, vec, pre_k, pre_v, bias)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, v = fused.ETEdges.apply(*inputs, cut, unit, EdgeOps(ei, n).kernel_graph(), 4, True)
        gx, gv = torch.randn(x.shape, generator=g), torch.randn(v.shape, generator=g)
        grads = torch.autograd.grad((x, v), inputs, (gx, gv))
    finally:
        torch.set_num_threads(before)
    return [x.detach(), v.detach(), *grads]


def test_kernel_is_bitwise_the_same_for_any_thread_count() -> None:
    one = _kernel_io(1)
    for threads in (2, 3):
        for a, b in zip(one, _kernel_io(threads), strict=True):
            assert torch.equal(a, b)


def _scd_batch(n_graphs: int = 2, n: int = 14) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(9)
    pos = rng.normal(scale=1.0, size=(n_graphs * n, 3))
    eps = rng.normal(scale=0.05, size=pos.shape)
    out: dict[str, torch.Tensor] = {"z": torch.as_tensor(rng.choice([1, 6, 8], size=n_graphs * n)),
                                    "pos_clean": torch.as_tensor(pos, dtype=torch.float32),
                                    "pos_noisy": torch.as_tensor(pos + eps, dtype=torch.float32),
                                    "noise": torch.as_tensor(eps, dtype=torch.float32),
                                    "n_atoms": torch.full((n_graphs,), n),
                                    "batch": torch.arange(n_graphs).repeat_interleave(n)}
    for view in ("clean", "noisy"):
        parts = [radius_graph(out[f"pos_{view}"][g * n:(g + 1) * n].numpy(), cutoff=5.0) for g in range(n_graphs)]
        out[f"edge_index_{view}"] = torch.as_tensor(np.concatenate([ei + g * n for g, (ei, _) in enumerate(parts)], 1))
        out[f"edge_shift_{view}"] = torch.as_tensor(np.concatenate([sh for _, sh in parts]), dtype=torch.float32)
    return out


def test_fused_step_keeps_a_fraction_of_the_activations() -> None:
    batch = _scd_batch()
    sizes = {}
    for on in (False, True):
        torch.manual_seed(0)
        obj = build_objective(ObjectiveConfig(hidden=32, layers=2, heads=4, num_rbf=8, fused_edges=on)).train()
        sizes[on] = saved_bytes(obj, batch)
    assert sizes[True] < 0.5 * sizes[False], sizes


def test_forces_take_the_plain_path_and_agree() -> None:
    """Gradients through the positions (forces) are not the kernel's: the layer falls back, with the same result."""
    d = _structures()
    forces = []
    for on in (False, True):
        model = _model(on).eval()
        pos = d["pos"].clone().requires_grad_()
        cond = torch.zeros(int(d["n_graphs"]), 32, dtype=torch.float64)
        s, _ = model(d["z"], pos, d["edge_index"], d["edge_shift"], d["batch"], cond)
        assert not _uses_kernel(s)
        forces.append(torch.autograd.grad(s.sum(), pos)[0])
    assert forces[0].abs().max() > 0 and torch.equal(forces[0], forces[1])


def test_a_failed_build_is_one_warning_and_the_plain_path_runs(monkeypatch, caplog) -> None:
    import torch.utils.cpp_extension as cpp

    def no_compiler(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Error building extension 'scd_et_edges_avx2': g++: not found\nmore lines")

    monkeypatch.setattr(cpp, "load", no_compiler)
    assert fused.kernel.__wrapped__() is None  # the uncached builder, as on a machine without g++
    assert [r.levelname for r in caplog.records if "could not be built" in r.getMessage()] == ["WARNING"]
    assert "g++: not found" in caplog.text and "more lines" not in caplog.text
    monkeypatch.setattr(fused, "kernel", lambda: None)
    d = _structures()
    s0, v0, g0, _ = _forward_backward(_model(False), d)
    s1, v1, g1, used = _forward_backward(_model(True), d)
    assert not used and torch.equal(s1, s0) and torch.equal(v1, v0)
    assert all(torch.equal(g1[k], g0[k]) for k in g0)


def test_a_lock_left_by_a_killed_build_is_removed(tmp_path) -> None:
    """torch's loader waits forever on the lock of a build that was killed; one older than a build can take goes."""
    import os
    import time

    stale, fresh = tmp_path / "stale" / "lock", tmp_path / "fresh" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.touch()
    old = time.time() - fused.STALE_LOCK_S - 60
    os.utime(stale, (old, old))
    fused.drop_stale_lock(stale)
    fused.drop_stale_lock(fresh)
    fused.drop_stale_lock(tmp_path / "none" / "lock")
    assert not stale.exists() and fresh.exists()


def test_the_build_folder_follows_torch_extensions_dir(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    where = fused.build_directory("scd_et_edges_avx2")
    assert where.parent.parent == tmp_path and where.name == "scd_et_edges_avx2"
    assert where.parent.name.startswith("py3") and torch.__version__.replace("+", "_") in where.parent.name
