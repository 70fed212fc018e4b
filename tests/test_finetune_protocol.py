"""The authors' fine-tuning protocol as options: auxiliary denoising, keyed rotations, drop-path schedule,
step-based warmup + cosine, EMA evaluation; unknown keys rejected."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from scd_train.datakit import qm9_csv
from scd_train.finetune import (
    FinetuneConfig,
    SplitConfig,
    augment_view_config,
    augmented_view,
    build_model,
    drop_path_at,
    finetune,
    finetune_optimizer,
    load_finetune_config,
)
from scd_train.objectives import ObjectiveConfig
from shards.config import ConfigError
from shards.format.manifest import write_dataset
from shards.format.qm9 import iter_qm9_csv
from shards.format.writer import WriterConfig

TINY = ObjectiveConfig(hidden=16, layers=1, heads=2, num_rbf=8)


@pytest.fixture(scope="module")
def qm9(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("proto") / "qm9"
    write_dataset(iter_qm9_csv(qm9_csv(1), 60), root, config=WriterConfig(max_shard_samples=30))
    return root


def _cfg(qm9: Path, out: Path, **kw) -> FinetuneConfig:
    base = dict(data=str(qm9), out=str(out), property="homo", model=TINY, split=SplitConfig(30, 10, 10, seed=1),
                steps=12, warmup_steps=2, patience=50, batch_size=10, lr=2e-3, loss="mse", progress=False,
                save_model=False)
    base.update(kw)
    return FinetuneConfig(**base)


def _pairwise(x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x[:, None, :] - x[None, :, :], axis=-1)


def test_rotation_augmentation_is_keyed_and_deterministic() -> None:
    g = next(iter(iter_qm9_csv(qm9_csv(1), 1)))
    vc = augment_view_config(FinetuneConfig(rotate=True), cutoff=5.0)
    assert vc is not None and augment_view_config(FinetuneConfig(), cutoff=5.0) is None
    a, again = augmented_view(g, vc, 3, 7), augmented_view(g, vc, 3, 7)
    assert np.array_equal(a["pos"], again["pos"]) and np.array_equal(a["edge_index"], again["edge_index"])
    other_step, other_seed = augmented_view(g, vc, 3, 8), augmented_view(g, vc, 4, 7)
    assert not np.allclose(a["pos"], other_step["pos"], atol=1e-3)
    assert not np.allclose(a["pos"], other_seed["pos"], atol=1e-3)
    assert not np.allclose(a["pos"], g.positions, atol=1e-3)
    for v in (a, other_step, other_seed):  # a rigid rotation: every interatomic distance kept
        np.testing.assert_allclose(_pairwise(v["pos"].astype(np.float64)), _pairwise(g.positions), atol=1e-4)
    centred = g.positions - g.positions.mean(0)  # proper rotation (det +1), found by least squares
    rot, *_ = np.linalg.lstsq(centred, a["pos"] - a["pos"].mean(0), rcond=None)
    assert np.linalg.det(rot) == pytest.approx(1.0, abs=1e-4)


def test_auxiliary_noise_is_the_noise_added_to_the_inputs() -> None:
    g = next(iter(iter_qm9_csv(qm9_csv(1), 3)))
    vc = augment_view_config(FinetuneConfig(aux_denoise_weight=0.1, aux_noise=0.02), cutoff=5.0)
    assert vc is not None
    v = augmented_view(g, vc, 0, 5)
    assert not any(k.endswith(("_clean", "_noisy")) for k in v)
    np.testing.assert_allclose(v["pos"] - g.positions, v["noise"], atol=1e-5)
    assert 0.01 < float(np.std(v["noise"])) < 0.03
    assert np.array_equal(v["noise"], augmented_view(g, vc, 0, 5)["noise"])
    assert not np.allclose(v["noise"], augmented_view(g, vc, 0, 6)["noise"])


def test_schedule_is_linear_warmup_then_cosine_to_zero() -> None:
    cfg = FinetuneConfig(steps=100, warmup_steps=10, lr=1e-3)
    model = build_model(cfg, TINY)
    opt, sched = finetune_optimizer(cfg, model, 1e-3, steps_per_epoch=7)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for s in range(10):  # oracle: (s + 1) / warmup of the peak
        assert lrs[s] == pytest.approx(1e-3 * (s + 1) / 10)
    for s in range(10, 100):  # oracle: half a cosine over the remaining 90 steps
        assert lrs[s] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 90)))
    assert max(lrs) == pytest.approx(1e-3) and lrs[-1] < 1e-6
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_drop_path_schedule_moves_linearly_to_its_final_value() -> None:
    cfg = FinetuneConfig(drop_path=0.15, drop_path_final=0.05)
    assert drop_path_at(cfg, 0, 11) == pytest.approx(0.15)
    assert drop_path_at(cfg, 5, 11) == pytest.approx(0.10)
    assert drop_path_at(cfg, 10, 11) == pytest.approx(0.05)
    assert drop_path_at(FinetuneConfig(drop_path=0.1), 7, 11) == 0.1


def test_protocol_run_is_deterministic_and_logs_its_schedule(qm9, tmp_path) -> None:
    cfg = _cfg(qm9, tmp_path / "a", rotate=True, aux_denoise_weight=0.1, drop_path=0.15, drop_path_final=0.05)
    a = finetune(cfg, log=lambda *_: None)
    b = finetune(dataclasses.replace(cfg, out=str(tmp_path / "b")), log=lambda *_: None)
    assert a["test_mae_eV"] == b["test_mae_eV"] and a["curve"] == b["curve"]
    assert a["steps_run"] == 12 and a["curve"][-1]["step"] == 12  # steps, not epochs: 12 steps = 4 passes of 3
    assert all(r["aux_loss"] > 0 for r in a["curve"][1:])
    assert a["curve"][-1]["drop_path"] == pytest.approx(0.05)
    plain = finetune(_cfg(qm9, tmp_path / "c", drop_path=0.15, drop_path_final=0.05), log=lambda *_: None)
    assert plain["curve"][1:] != a["curve"][1:]  # the auxiliary loss and rotations change the trajectory


def test_ema_evaluation_uses_the_ema_weights(qm9, tmp_path) -> None:
    """With a decay this close to 1 the EMA weights stay at the starting weights: every validation MAE equals
    the one before training and the saved model is the initial one; without EMA both move."""
    ema = finetune(_cfg(qm9, tmp_path / "ema", ema_decay=1 - 1e-9, save_model=True), log=lambda *_: None)
    vals = [r["val_mae_eV"] for r in ema["curve"]]
    assert max(abs(v - vals[0]) for v in vals) < 1e-6 * vals[0]
    init = build_model(_cfg(qm9, tmp_path / "x"), TINY).state_dict()
    saved = load_file(str(tmp_path / "ema" / "model.safetensors"))
    assert all(torch.allclose(saved[k], init[k], atol=1e-6) for k in init if init[k].is_floating_point())
    raw = finetune(_cfg(qm9, tmp_path / "raw"), log=lambda *_: None)
    assert max(abs(r["val_mae_eV"] - vals[0]) for r in raw["curve"]) > 1e-3


def test_protocol_options_validated_and_unknown_keys_rejected(tmp_path) -> None:
    (tmp_path / "bad.yaml").write_text("data: d\nout: o\naux_denoise_wieght: 0.1\n")
    with pytest.raises(ConfigError, match="aux_denoise_wieght"):
        load_finetune_config(tmp_path / "bad.yaml")
    for kw in ({"ema_decay": 1.0}, {"aux_noise": 0.0}, {"drop_path_final": 1.0}, {"steps": 0}):
        with pytest.raises(ConfigError):
            FinetuneConfig(**kw)
    with pytest.raises(ConfigError, match="rotate"):
        FinetuneConfig(task="energy_forces", rotate=True)
