"""SCD and plain denoising objectives: learning, gradient paths, drop-cond, noise statistics
(save/restore, DDP all-reduce), equivariant predictions, embeddings and config building."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scd_train.models import BACKBONE_CONFIGS
from scd_train.objectives import SCD, Denoise, ObjectiveConfig, build_objective
from shards.stream.graph import radius_graph

TINY = dict(preset="small", hidden=32, layers=2, num_rbf=8, drop_path=0.0)


def _objective(kind: str = "scd", backbone: str = "et", **kw) -> SCD | Denoise:
    torch.manual_seed(0)
    extra = {"heads": 4} if backbone == "et" else {}
    return build_objective(ObjectiveConfig(kind=kind, backbone=backbone, **{**TINY, **extra, **kw}))


def _batch(seed: int = 0, sizes: tuple[int, ...] = (5, 7, 6, 8), dtype=torch.float32) -> dict:
    """Random small molecules with a clean (0.005 A jitter) and a noisy (0.04 A) view."""
    rng = np.random.default_rng(seed)
    views = {"z": [], "pos_clean": [], "pos_noisy": [], "noise": []}
    edges = {"_clean": ([], []), "_noisy": ([], [])}
    start = 0
    for n in sizes:
        pos = rng.normal(scale=1.3, size=(n, 3))
        eps = rng.normal(scale=0.04, size=(n, 3))
        clean = pos + rng.normal(scale=0.005, size=(n, 3))
        views["z"].append(rng.choice([1, 6, 7, 8], size=n))
        views["pos_clean"].append(clean)
        views["pos_noisy"].append(pos + eps)
        views["noise"].append(eps)
        for v, p in (("_clean", clean), ("_noisy", pos + eps)):
            ei, sh = radius_graph(p, cutoff=5.0)
            edges[v][0].append(ei + start)
            edges[v][1].append(sh)
        start += n
    out = {k: torch.as_tensor(np.concatenate(v), dtype=dtype) for k, v in views.items() if k != "z"}
    out["z"] = torch.as_tensor(np.concatenate(views["z"]), dtype=torch.int64)
    for v, (ei, sh) in edges.items():
        out["edge_index" + v] = torch.as_tensor(np.concatenate(ei, axis=1))
        out["edge_shift" + v] = torch.as_tensor(np.concatenate(sh), dtype=dtype)
    out["n_atoms"] = torch.as_tensor(sizes)
    out["batch"] = torch.repeat_interleave(torch.arange(len(sizes)), out["n_atoms"])
    return out


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind", ["scd", "denoise"])
@pytest.mark.parametrize("backbone", sorted(BACKBONE_CONFIGS))
def test_loss_finite_and_decreasing(kind, backbone):
    obj = _objective(kind, backbone).train()
    batch = _batch()
    opt = torch.optim.Adam([p for p in obj.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(30):
        loss_sum, n, metrics = obj(batch, generator=_gen(step))
        assert int(n) == batch["z"].shape[0] and all(torch.isfinite(v) for v in metrics.values())
        loss = loss_sum / n
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


def test_gradients_reach_pass_one_through_c():
    obj = _objective("scd").train()
    loss_sum, n, _ = obj(_batch(), generator=_gen(0))
    loss_sum.backward()
    for p in obj.pool.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert obj.mask_token.grad is None and not obj.mask_token.requires_grad
    assert all(not e.weight.requires_grad for e in obj.backbone.element_embeddings())
    base = _objective("denoise").train()
    base(_batch(), generator=_gen(0))[0].backward()
    assert all(p.grad is None for p in base.pool.parameters())


def test_unfrozen_embeddings_train():
    obj = _objective("scd", freeze_embeddings=False).train()
    obj(_batch(), generator=_gen(0))[0].backward()
    assert obj.mask_token.requires_grad and obj.backbone.embedding.weight.grad is not None


def test_drop_cond_one_ignores_clean_view():
    batch = _batch()
    moved = dict(batch, pos_clean=batch["pos_clean"] + 0.3 * torch.randn(batch["pos_clean"].shape, generator=_gen(9)))
    obj = _objective("scd", drop_cond=1.0).train()
    a, m = obj.predict(batch, _gen(1))
    b, _ = obj.predict(moved, _gen(1))
    assert float(m["cond_dropped"]) == 1.0
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    obj = _objective("scd", drop_cond=0.0).train()
    assert (obj.predict(batch, _gen(1))[0] - obj.predict(moved, _gen(1))[0]).abs().max() > 1e-5


def test_training_without_generator_raises():
    with pytest.raises(ValueError):
        _objective("scd").train()(_batch())


def test_noise_stats_update_save_restore():
    obj = _objective("scd").train()
    b1, b2 = _batch(1), _batch(2)
    obj(b1, generator=_gen(0))
    obj(b2, generator=_gen(1))
    noise = torch.cat([b1["noise"], b2["noise"]]).double()
    assert float(obj.noise_count) == noise.shape[0]
    torch.testing.assert_close(obj.noise_sum, noise.sum(0))
    torch.testing.assert_close(obj.noise_sumsq, (noise * noise).sum(0))
    mean, std = obj.noise_stats()
    torch.testing.assert_close(std, noise.std(0, unbiased=False))
    assert 0.02 < float(std.mean()) < 0.06
    state = obj.state_dict()
    assert {"noise_sum", "noise_sumsq", "noise_count"} <= set(state)
    fresh = _objective("scd")
    assert float(fresh.noise_count) == 0
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.noise_stats()[1], std)
    obj.eval()
    fresh.eval()
    before = obj.noise_count.clone()
    la = obj(b1)[0]
    torch.testing.assert_close(obj.noise_count, before)
    torch.testing.assert_close(fresh(b1)[0], la)


def test_loss_sum_is_additive_over_graphs():
    """Sums (not means) per batch: the trainer can normalise by the atom count of all ranks."""
    obj = _objective("scd").eval()
    obj.update_noise_stats(_batch()["noise"])
    both, first = _batch(3, (5, 7)), _batch(3, (5,))
    n1 = 5
    second = {"z": both["z"][n1:], "pos_clean": both["pos_clean"][n1:], "pos_noisy": both["pos_noisy"][n1:],
              "noise": both["noise"][n1:], "n_atoms": both["n_atoms"][1:], "batch": both["batch"][n1:] - 1}
    for v in ("_clean", "_noisy"):
        keep = (both["edge_index" + v] >= n1).all(0)
        second["edge_index" + v] = both["edge_index" + v][:, keep] - n1
        second["edge_shift" + v] = both["edge_shift" + v][keep]
    loss_ab, n_ab, _ = obj(both)
    loss_a, n_a, _ = obj(first)
    loss_b, n_b, _ = obj(second)
    assert int(n_a + n_b) == int(n_ab)
    torch.testing.assert_close(loss_a + loss_b, loss_ab, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["scd", "denoise"])
@pytest.mark.parametrize("backbone", sorted(BACKBONE_CONFIGS))
def test_prediction_rotates_with_input(kind, backbone):
    obj = _objective(kind, backbone).double().eval()
    batch = _batch(4, dtype=torch.float64)
    q, r = np.linalg.qr(np.random.default_rng(5).normal(size=(3, 3)))
    rot = torch.as_tensor(q * np.sign(np.diag(r)))
    rotated = {k: (v @ rot.T if k.startswith(("pos", "edge_shift", "noise")) else v) for k, v in batch.items()}
    a, _ = obj.predict(batch)
    b, _ = obj.predict(rotated)
    torch.testing.assert_close(b, a @ rot.T, atol=1e-9, rtol=1e-9)


def test_embed_single_view():
    obj = _objective("scd").eval()
    b = _batch(6)
    single = {"z": b["z"], "pos": b["pos_clean"], "edge_index": b["edge_index_clean"],
              "edge_shift": b["edge_shift_clean"], "batch": b["batch"], "n_atoms": b["n_atoms"]}
    c, s, v = obj.embed(single)
    assert c.shape == (4, 32) and s.shape == (b["z"].shape[0], 32) and v.shape == (b["z"].shape[0], 3, 32)
    c2, _, _ = obj.embed(b, view="_clean")
    torch.testing.assert_close(c, c2, atol=0, rtol=0)


def test_build_objective_rejects_unknown():
    with pytest.raises(KeyError):
        build_objective(ObjectiveConfig(kind="nope"))
    with pytest.raises(KeyError):
        build_objective(ObjectiveConfig(backbone="nope"))
    with pytest.raises(TypeError):
        build_objective(ObjectiveConfig(backbone="painn", heads=4))
    obj = build_objective(ObjectiveConfig(kind="denoise", backbone="painn", preset="paper"))
    assert isinstance(obj, Denoise) and obj.backbone.hidden == 256 and len(obj.backbone.layers) == 8


def _ddp_worker(rank: int, world: int, path: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        obj = _objective("scd")
        obj.update_noise_stats(_batch(10 + rank)["noise"])
        torch.save({k: v for k, v in obj.state_dict().items() if k.startswith("noise_")}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_noise_stats_all_reduced_across_ranks(tmp_path):
    out = str(tmp_path / "stats")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    s0, s1 = torch.load(f"{out}.0", weights_only=True), torch.load(f"{out}.1", weights_only=True)
    noise = torch.cat([_batch(10)["noise"], _batch(11)["noise"]]).double()
    for s in (s0, s1):
        assert float(s["noise_count"]) == noise.shape[0]
        torch.testing.assert_close(s["noise_sum"], noise.sum(0))
        torch.testing.assert_close(s["noise_sumsq"], (noise * noise).sum(0))
