"""The objective's loss path against hand computations: the loss is the per-atom squared error of the head
against the noise standardised by running per-axis statistics (population std; mean 0 and std 1 before any
update), averaged over the 3 axes and summed over atoms; config defaults and options reach the model; drop-cond
draws only when it is on, at its rate; noise centring per structure. Written for the mutants of
``scd_train/objectives.py`` that the broader tests let through (docs/mutation.md)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from scd_train.data import to_torch
from scd_train.objectives import SCD, Denoise, ObjectiveConfig, build_objective
from scd_train.views import ViewConfig, make_views
from shards.format.schema import AtomGraph
from shards.stream.collate import collate

TINY = dict(hidden=16, layers=1, heads=2, num_rbf=4, drop_path=0.0)


def _objective(**kw) -> SCD | Denoise:
    torch.manual_seed(0)
    return build_objective(ObjectiveConfig(**{**TINY, **kw}))


def _batch(sizes: tuple[int, ...] = (4, 6, 5), seed: int = 0) -> dict:
    """Random small molecules through the real views and collation (noise drawn per key, seed and step)."""
    rng = np.random.default_rng(seed)
    items = []
    for i, n in enumerate(sizes):
        g = AtomGraph(key=f"m{seed}-{i}", domain="molecule", source="t", source_file="t", index=i,
                      atomic_numbers=rng.choice([1, 6, 8], size=n).astype(np.uint8),
                      positions=rng.normal(scale=1.2, size=(n, 3)).astype(np.float32),
                      cell=np.zeros((3, 3)), pbc=np.zeros(3, dtype=bool))
        items.append(make_views(g, ViewConfig(cutoff=4.0), seed=seed, step=0))
    return to_torch(collate(items), torch.device("cpu"))


def _hand_loss(pred: torch.Tensor, noise: np.ndarray, mean: np.ndarray, std: np.ndarray) -> float:
    target = (noise.astype(np.float64) - mean) / std
    return float((((pred.detach().double().numpy() - target) ** 2).mean(axis=1)).sum())


def test_config_defaults_written_out() -> None:
    expected = {"kind": "scd", "backbone": "et", "preset": "small", "hidden": None, "layers": None, "heads": None,
                "num_rbf": None, "cutoff": None, "drop_path": None, "drop_cond": 0.2, "freeze_embeddings": True,
                "center_noise": False, "adaln": None, "layer_norm": None, "self_loops": None, "vector_cutoff": None,
                "checkpoint_edges": None, "fused_edges": None}
    assert dataclasses.asdict(ObjectiveConfig()) == expected


def test_build_objective_passes_every_option() -> None:
    obj = _objective(kind="denoise", drop_cond=0.35, freeze_embeddings=False, center_noise=True)
    assert type(obj) is Denoise and obj.drop_cond == 0.35 and obj.center_noise is True
    assert obj.mask_token.requires_grad and all(e.weight.requires_grad for e in obj.backbone.element_embeddings())
    assert obj.backbone.hidden == 16 and obj.mask_token.shape == (16,)
    scd = _objective()
    assert type(scd) is SCD and scd.drop_cond == 0.2 and scd.center_noise is False
    assert not scd.mask_token.requires_grad


@pytest.mark.parametrize("kind", ["scd", "denoise"])
def test_fresh_loss_is_the_plain_squared_error_of_the_raw_noise(kind) -> None:
    """No statistics yet: mean 0, std 1 (not sqrt of the variance floor); loss = sum_atoms mean_axes (pred - eps)^2."""
    obj = _objective(kind=kind).eval()
    batch = _batch()
    with torch.no_grad():
        loss, n, metrics = obj(batch)
        pred, _ = obj.predict(batch)
    noise = batch["noise"].numpy()
    assert int(n) == noise.shape[0] == int(batch["n_atoms"].sum())
    assert float(loss) == pytest.approx(_hand_loss(pred, noise, np.zeros(3), np.ones(3)), rel=1e-5)
    assert float(metrics["noise_std"]) == 1.0
    assert float(obj.noise_count) == 0  # eval mode does not update the statistics


@pytest.mark.parametrize("kind", ["scd", "denoise"])
def test_loss_uses_running_mean_and_population_std(kind) -> None:
    obj = _objective(kind=kind, drop_cond=0.0).train()
    seen = [_batch(seed=1), _batch((7, 3), seed=2)]
    for b in seen:
        obj(b, generator=torch.Generator().manual_seed(0))
    noise = np.concatenate([b["noise"].numpy().astype(np.float64) for b in seen])
    mean, std = noise.mean(axis=0), noise.std(axis=0)  # population std, per axis
    obj.eval()
    batch = _batch(seed=3)
    with torch.no_grad():
        loss, _, metrics = obj(batch)
        pred, _ = obj.predict(batch)
    assert float(loss) == pytest.approx(_hand_loss(pred, batch["noise"].numpy(), mean, std), rel=1e-5)
    assert float(metrics["noise_std"]) == pytest.approx(std.mean(), rel=1e-6)
    torch.testing.assert_close(obj.target(batch), (batch["noise"].double() - torch.as_tensor(mean))
                               / torch.as_tensor(std))


def test_metric_names_by_objective_and_mode() -> None:
    batch = _batch()
    gen = torch.Generator().manual_seed(0)
    assert set(_objective().train()(batch, gen)[2]) == {"noise_std", "cond_dropped"}
    assert set(_objective().eval()(batch)[2]) == {"noise_std"}
    assert set(_objective(kind="denoise").train()(batch, gen)[2]) == {"noise_std"}


def test_drop_cond_off_draws_nothing() -> None:
    """drop_cond 0 in training: no generator needed, none drawn from one, no cond_dropped metric."""
    batch = _batch()
    obj = _objective(drop_cond=0.0).train()
    assert "cond_dropped" not in obj(batch)[2]
    gen = torch.Generator().manual_seed(5)
    before = gen.get_state().clone()
    obj(batch, gen)
    assert torch.equal(gen.get_state(), before)


def test_drop_cond_rate_and_what_a_dropped_graph_sees() -> None:
    """400 graphs at drop_cond 0.2: the dropped share is within binomial bounds (0.2 +- 4 sd = 0.12-0.28); each
    graph's prediction is exactly that of a mask-token pass (drop_cond 1) or of a conditioned pass (drop_cond 0),
    and the graphs that match only the mask-token pass are no more than the dropped ones."""
    batch = _batch(tuple([2] * 400), seed=4)
    pred, metrics = _objective(drop_cond=0.2).train().predict(batch, torch.Generator().manual_seed(11))
    dropped = round(float(metrics["cond_dropped"]) * 400)
    assert 0.12 * 400 <= dropped <= 0.28 * 400, dropped
    masked, _ = _objective(drop_cond=1.0).train().predict(batch, torch.Generator().manual_seed(11))
    plain, _ = _objective(drop_cond=0.0).train().predict(batch)

    def per_graph(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a == b).view(400, 2, 3).all(dim=2).all(dim=1)

    as_masked, as_plain = per_graph(pred, masked), per_graph(pred, plain)
    assert bool((as_masked | as_plain).all())
    only_masked = int((as_masked & ~as_plain).sum())
    assert 0.5 * dropped <= only_masked <= dropped <= int(as_masked.sum()), (only_masked, dropped)


def test_centred_target_of_a_one_atom_structure_is_zero() -> None:
    noise = torch.tensor([[0.1, -0.2, 0.3], [0.5, 0.5, -0.5], [0.1, 0.2, 0.3], [-0.3, -0.1, 0.8]], dtype=torch.float64)
    batch = {"noise": noise, "n_atoms": torch.tensor([1, 3]), "batch": torch.tensor([0, 1, 1, 1])}
    target = _objective(center_noise=True).noise_target(batch)
    expected = torch.tensor([[0.0, 0.0, 0.0], [0.4, 0.3, -0.7], [0.0, 0.0, 0.1], [-0.4, -0.3, 0.6]],
                            dtype=torch.float64)
    torch.testing.assert_close(target, expected, atol=1e-12, rtol=0)
    assert torch.equal(_objective().noise_target(batch), noise)


def test_embed_is_one_mask_token_pass_pooled() -> None:
    obj = _objective().eval()
    batch = _batch()
    single = {k: batch[k] for k in ("z", "batch", "n_atoms")}
    single.update(pos=batch["pos_clean"], edge_index=batch["edge_index_clean"], edge_shift=batch["edge_shift_clean"])
    c, s, v = obj.embed(single)
    assert c.shape == (3, 16) and s.shape == (15, 16) and v.shape == (15, 3, 16)
    c2, s2, _ = obj.embed(batch, view="_clean")
    torch.testing.assert_close(c2, c)
    torch.testing.assert_close(c, obj.pool(s, batch["batch"], 3))
    mean_of_first = s[:4].mean(0)  # the pooled features of graph 0 depend on its atoms only
    moved = dict(single, pos=single["pos"].clone())
    moved["pos"][4:] += 0.3
    torch.testing.assert_close(obj.embed(moved)[1][:4].mean(0), mean_of_first)


def test_every_backbone_option_reaches_the_backbone() -> None:
    cfg = ObjectiveConfig(hidden=16, layers=1, heads=2, num_rbf=4, cutoff=4.5, drop_path=0.05, adaln="ln_zero",
                          layer_norm=True, self_loops=True, vector_cutoff=True, checkpoint_edges=True,
                          fused_edges=False)
    got = build_objective(cfg).backbone.cfg
    expected = {"hidden": 16, "layers": 1, "heads": 2, "num_rbf": 4, "cutoff": 4.5, "drop_path": 0.05,
                "adaln": "ln_zero", "layer_norm": True, "self_loops": True, "vector_cutoff": True,
                "checkpoint_edges": True, "fused_edges": False}
    assert {k: getattr(got, k) for k in expected} == expected


def test_denoise_is_pass_two_of_scd() -> None:
    """``denoise(batch, c)`` with c from the clean pass is SCD's prediction (eval: no drop-cond)."""
    obj = _objective().eval()
    batch = _batch()
    with torch.no_grad():
        c = obj.embed(batch, view="_clean")[0]
        torch.testing.assert_close(obj.denoise(batch, c), obj.predict(batch)[0], atol=0, rtol=0)
        other = obj.denoise(batch, obj.mask_token.expand_as(c))
    assert (other - obj.predict(batch)[0]).abs().max() > 0
