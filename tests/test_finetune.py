"""Downstream: seeded splits, fine-tuning, one-line errors, embeddings, the linear probe, the QM9 study."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from scd_train.datakit import qm9_csv
from scd_train.finetune import FinetuneConfig, SplitConfig, finetune, make_splits
from scd_train.objectives import ObjectiveConfig, build_objective
from shards.format.manifest import write_dataset
from shards.format.qm9 import iter_qm9_csv
from shards.format.writer import WriterConfig
from shards.tools.cli import main

TINY = ObjectiveConfig(hidden=32, layers=2, heads=4, num_rbf=8)


@pytest.fixture(scope="module")
def qm9(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ft") / "qm9"
    write_dataset(iter_qm9_csv(qm9_csv(1), 120), root, config=WriterConfig(max_shard_samples=50))
    return root


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A checkpoint-like folder: model.safetensors + state.json with the TINY model config."""
    path = tmp_path_factory.mktemp("ckpt") / "step-00000001"
    path.mkdir()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        obj = build_objective(TINY)
    save_file({k: v.contiguous() for k, v in obj.state_dict().items()}, str(path / "model.safetensors"))
    (path / "state.json").write_text(json.dumps({
        "step": 1, "optimizer": {"param_groups": [], "state": {}}, "scheduler": {}, "sampler_states": [],
        "config": {"model": {"kind": "scd", "hidden": 32, "layers": 2, "heads": 4, "num_rbf": 8}}}))
    return path


def _cfg(qm9: Path, out: Path, **kw) -> FinetuneConfig:
    base = dict(data=str(qm9), out=str(out), property="homo", model=TINY, split=SplitConfig(60, 20, 20, seed=1),
                epochs=3, patience=3, batch_size=16, lr=2e-3, readout="mean", progress=False)
    base.update(kw)
    return FinetuneConfig(**base)


def test_splits_deterministic_and_disjoint() -> None:
    keys = [f"k{i:04d}" for i in range(500)]
    split = SplitConfig(train=100, val=50, test=80, seed=7)
    a, b = make_splits(keys, split), make_splits(list(reversed(keys)), split)
    assert a == b  # same seed -> same keys, whatever the input order
    assert [len(a[k]) for k in ("train", "val", "test")] == [100, 50, 80]
    assert not (set(a["train"]) & set(a["val"]) or set(a["train"]) & set(a["test"]) or set(a["val"]) & set(a["test"]))
    assert make_splits(keys, SplitConfig(100, 50, 80, seed=8))["train"] != a["train"]
    with pytest.raises(ValueError, match="too few labelled samples: 500 available, the split needs 501"):
        make_splits(keys, SplitConfig(400, 50, 51))


def test_finetune_uses_the_trainer_optimiser_with_a_head_rate(qm9, tmp_path) -> None:
    """Fine-tuning's optimiser is the trainer's: every trainable parameter in exactly one group, the head
    (and only it) at ``head_lr``, no weight decay on 1-D tensors; the schedule warms up linearly to the
    base rate at the end of the warmup epochs and decays to 0 at the last step (cosine)."""
    from scd_train.finetune import build_model, finetune_optimizer

    cfg = _cfg(qm9, tmp_path, weight_decay=0.1, warmup_epochs=2, epochs=5, head_lr=7e-3)
    model = build_model(cfg)
    opt, sched = finetune_optimizer(cfg, model, 2e-3, steps_per_epoch=4, head_lr=cfg.head_lr)
    head = {id(p) for p in model.head.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    grouped = [(id(p), g["initial_lr"], g["weight_decay"], p.ndim) for g in opt.param_groups for p in g["params"]]
    assert sorted(i for i, *_ in grouped) == sorted(id(p) for p in trainable)
    assert all((lr == 7e-3) == (i in head) for i, lr, _, _ in grouped)
    assert all(wd == 0.0 for _, _, wd, ndim in grouped if ndim <= 1)
    assert any(wd == 0.1 for *_, wd, ndim in grouped if ndim > 1)
    factors = []
    for _ in range(20):
        factors.append(sched.get_last_lr()[0] / 2e-3)
        opt.step()
        sched.step()
    assert factors[:8] == pytest.approx([(s + 1) / 8 for s in range(8)])
    assert factors[8] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.5 * (1 + np.cos(np.pi * 11 / 12)))
    assert all(a >= b for a, b in zip(factors[8:], factors[9:], strict=False))


def test_device_choice_shared_by_training_and_finetuning() -> None:
    from scd_train.dist import select_device

    assert select_device("cpu") == torch.device("cpu")
    assert select_device("cuda", local_rank=3) == torch.device("cuda", 3)
    assert select_device("cuda:1", local_rank=3) == torch.device("cuda", 1)
    assert select_device("auto", 2) == (torch.device("cuda", 2) if torch.cuda.is_available() else torch.device("cpu"))


def test_finetune_lowers_validation_error_and_is_deterministic(qm9, tmp_path) -> None:
    r1 = finetune(_cfg(qm9, tmp_path / "a"), log=lambda *_: None)
    curve = [c["val_mae_eV"] for c in r1["curve"]]
    assert r1["best_val_mae_eV"] < curve[0]  # epoch 0 is the untrained model
    assert r1["test_mae_meV"] == pytest.approx(1000 * r1["test_mae_eV"])
    saved = json.loads((tmp_path / "a" / "result.json").read_text())
    assert saved["splits"] == r1["splits"] and len(saved["splits"]["test"]) == 20
    assert (tmp_path / "a" / "model.safetensors").is_file()
    r2 = finetune(_cfg(qm9, tmp_path / "b"), log=lambda *_: None)
    assert r2["test_mae_eV"] == r1["test_mae_eV"] and r2["splits"] == r1["splits"]


def test_finetune_from_checkpoint_and_split_file(qm9, tiny_ckpt, tmp_path) -> None:
    from shards.format.reader import ShardDataset

    split = make_splits([g.key for g in ShardDataset(str(qm9))], SplitConfig(40, 10, 10, seed=3))
    (tmp_path / "s.json").write_text(json.dumps(split))
    r = finetune(_cfg(qm9, tmp_path / "o", checkpoint=str(tiny_ckpt), split_file=str(tmp_path / "s.json"), epochs=1),
                 log=lambda *_: None)
    assert r["splits"] == split and r["n"] == {"train": 40, "val": 10, "test": 10}


def test_backbone_config_read_from_checkpoint(qm9, tiny_ckpt, tmp_path) -> None:
    """No ``model:`` with a checkpoint: the backbone comes from its state.json (the default preset would
    not load: hidden 128 vs 32); a given ``model:`` is still checked against it."""
    r = finetune(_cfg(qm9, tmp_path / "o", checkpoint=str(tiny_ckpt), model=None, epochs=1), log=lambda *_: None)
    assert {k: r["model"][k] for k in ("hidden", "layers", "heads", "num_rbf")} == \
        {"hidden": 32, "layers": 2, "heads": 4, "num_rbf": 8}
    with pytest.raises(ValueError, match="layers: config 3 vs checkpoint 2"):
        finetune(_cfg(qm9, tmp_path / "p", checkpoint=str(tiny_ckpt), model=ObjectiveConfig(
            hidden=32, layers=3, heads=4, num_rbf=8)), log=lambda *_: None)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((tiny_ckpt / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="records no model config"):
        finetune(_cfg(qm9, tmp_path / "q", checkpoint=str(bare), model=None), log=lambda *_: None)


def test_evaluation_batches_respect_atom_budget(qm9, tmp_path) -> None:
    """Predictions do not depend on the evaluation atom budget (batches of 1 structure up to all)."""
    a = finetune(_cfg(qm9, tmp_path / "a", epochs=1, eval_max_atoms=20), log=lambda *_: None)
    b = finetune(_cfg(qm9, tmp_path / "b", epochs=1, eval_max_atoms=100_000), log=lambda *_: None)
    assert a["test_mae_eV"] == pytest.approx(b["test_mae_eV"], rel=1e-5)


def _run_cli(capsys, tmp_path: Path, cfg: dict, *sets: str) -> tuple[int, str]:
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = ["finetune", str(path)]
    for s in sets:
        args += ["--set", s]
    rc = main(args)
    return rc, capsys.readouterr().err.strip()


def test_one_line_errors(qm9, tiny_ckpt, tmp_path, capsys) -> None:
    cfg = {"data": str(qm9), "out": str(tmp_path / "o"), "model": {"hidden": 32, "layers": 2, "heads": 4, "num_rbf": 8},
           "split": {"train": 60, "val": 20, "test": 20}, "epochs": 1, "progress": False}
    rc, err = _run_cli(capsys, tmp_path, cfg, "property=nope")
    assert rc == 1 and "property 'nope' is not in" in err and "homo" in err and "\n" not in err
    rc, err = _run_cli(capsys, tmp_path, cfg, "split.train=200")
    assert rc == 1 and "too few labelled samples: 120 available" in err and "\n" not in err
    rc, err = _run_cli(capsys, tmp_path, cfg, f"checkpoint={tiny_ckpt}", "model.hidden=48")
    assert rc == 1 and "checkpoint backbone does not match the config (hidden: config 48 vs checkpoint 32)" in err
    assert "\n" not in err
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((tiny_ckpt / "model.safetensors").read_bytes())
    rc, err = _run_cli(capsys, tmp_path, cfg, f"checkpoint={bare}", "model.layers=3")
    assert rc == 1 and "does not match this model config" in err and "\n" not in err
    rc, err = _run_cli(capsys, tmp_path, {**cfg, "epochz": 3})
    assert rc == 1 and "epochz" in err


def test_embed_shape_determinism_and_probe(qm9, tiny_ckpt, tmp_path, capsys) -> None:
    out = tmp_path / "emb" / "e"
    assert main(["embed", str(tiny_ckpt), str(qm9), "--out", str(out), "--probe", "homo", "--batch-size", "32"]) == 0
    printed = capsys.readouterr().out
    assert "120 embeddings of width 32" in printed and "linear probe homo: 5-fold CV MAE" in printed
    a = np.load(f"{out}.npy")
    assert a.shape == (120, 32) and a.dtype == np.float32 and np.isfinite(a).all()
    keys = Path(f"{out}.keys.txt").read_text().split()
    assert len(keys) == 120 and keys[0] == "qm9-000001"
    assert main(["embed", str(tiny_ckpt), str(qm9), "--out", str(tmp_path / "f"), "--batch-size", "7"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "f.npy"), a, rtol=1e-5, atol=1e-6)  # batching-independent
    assert main(["embed", str(tiny_ckpt), str(qm9), "--out", str(tmp_path / "g"), "--batch-size", "32"]) == 0
    assert np.array_equal(np.load(tmp_path / "g.npy"), a)


def test_embed_structure_files(tiny_ckpt, tmp_path) -> None:
    from ase.build import molecule
    from ase.io import write

    write(tmp_path / "mols.xyz", [molecule("H2O"), molecule("CH4"), molecule("C6H6")])
    assert main(["embed", str(tiny_ckpt), str(tmp_path / "mols.xyz"), "--out", str(tmp_path / "m")]) == 0
    assert np.load(tmp_path / "m.npy").shape == (3, 32)
    assert (tmp_path / "m.keys.txt").read_text().split() == ["mols-0", "mols-1", "mols-2"]


def test_ridge_probe_recovers_linear_target() -> None:
    from scd_train.embed import ridge_cv

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 8))
    y = x @ rng.standard_normal(8) + 3.0 + 0.01 * rng.standard_normal(200)
    r = ridge_cv(x, y, alpha=1e-3, folds=5)
    assert r["mae"] < 0.05 < r["baseline_mae"]
    assert ridge_cv(x, y, alpha=1e-3, folds=5) == r


def test_pretraining_set_disjoint_from_finetune_sets(tmp_path) -> None:
    from scd_train.study import ingest_qm9, load_study_config, prepare_data
    from shards.format.reader import ShardDataset

    cfg = load_study_config(None, ["max_records=150", "ingest=builtin", "split.train=50", "split.val=20",
                                   "split.test=30"])
    dataset, mode = ingest_qm9(cfg, tmp_path)
    split_file, pre, splits = prepare_data(cfg, dataset, tmp_path)
    held = set(splits["train"]) | set(splits["val"]) | set(splits["test"])
    pre_keys = {g.key for g in ShardDataset(str(pre))}
    assert mode == "builtin" and len(held) == 100 and len(pre_keys) == 50 and not held & pre_keys
    assert json.loads(split_file.read_text())["train"] == splits["train"]
    (tmp_path / "again").mkdir()
    assert prepare_data(cfg, dataset, tmp_path / "again")[2] == splits


def test_study_config_keeps_defaults_and_rejects_unknown(tmp_path) -> None:
    from scd_train.study import load_study_config
    from shards.config import ConfigError

    (tmp_path / "s.yaml").write_text("finetune: {epochs: 3}\npretrain: {steps: 5}\n")
    cfg = load_study_config(tmp_path / "s.yaml", ["seeds=[4]"])
    assert cfg.finetune.epochs == 3 and cfg.finetune.readout == "mean" and cfg.pretrain.steps == 5
    assert cfg.seeds == (4,)
    (tmp_path / "bad.yaml").write_text("finetune: {epochz: 3}\n")
    with pytest.raises(ConfigError, match="epochz"):
        load_study_config(tmp_path / "bad.yaml")


TINY_STUDY = {"max_records": 160, "ingest": "builtin", "split": {"train": 40, "val": 20, "test": 20, "seed": 0},
              "model": {"hidden": 16, "layers": 1, "heads": 2, "num_rbf": 8},
              "pretrain": {"steps": 3, "max_atoms": 150, "warmup_steps": 1},
              "finetune": {"epochs": 2, "patience": 2, "batch_size": 20}, "seeds": [0, 1], "device": "cpu"}


def test_tiny_study_end_to_end(tmp_path, capsys) -> None:
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY_STUDY))
    out = tmp_path / "study"
    assert main(["study", "qm9", "--out", str(out), "--config", str(tmp_path / "tiny.yaml")]) == 0
    table = (out / "results.md").read_text()
    for arm in ("scratch", "denoise", "scd"):
        assert f"| {arm} |" in table
        for seed in (0, 1):
            assert (out / "runs" / f"{arm}-seed{seed}" / "result.json").is_file()
    assert (out / "learning_curves.png").stat().st_size > 1000
    assert {p.name for p in (out / "configs").iterdir()} >= {"study.yaml", "pretrain_scd.yaml", "pretrain_denoise.yaml"}
    summary = json.loads((out / "results.json").read_text())
    assert summary["seconds"] > 0 and set(summary["summary"]) == {"scratch", "denoise", "scd"}


def test_tiny_study_through_ingest_pipeline(tmp_path) -> None:
    pytest.importorskip("ray")
    from importlib.metadata import entry_points

    if "qm9csv" not in {ep.name for ep in entry_points(group="scd.converters")}:
        pytest.skip("missing dependency: scd-atoms (the qm9csv entry point; pip install -e .)")
    cfg = {**TINY_STUDY, "ingest": "pipeline", "seeds": [0], "arms": ["scratch", "scd"]}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "study"
    assert main(["study", "qm9", "--out", str(out), "--config", str(tmp_path / "tiny.yaml")]) == 0
    assert json.loads((out / "ingest.json").read_text())["mode"] == "pipeline"
    assert "| scd |" in (out / "results.md").read_text()


@pytest.mark.slow
def test_finetune_beats_the_mean_baseline_on_a_learnable_target(tmp_path) -> None:
    """Fine-tuning must learn, not just move off its random start: on a target the model can represent
    exactly (the heavy-atom fraction, computed here from the atomic numbers; mean readout), the test MAE
    is under 40% of predicting the train mean (the baseline computed here from the labels)."""
    graphs = [g.replace(properties={"heavy": float((g.atomic_numbers > 1).mean())}, property_units={"heavy": "eV"})
              for g in iter_qm9_csv(qm9_csv(1), 120)]
    label = {g.key: g.properties["heavy"] for g in graphs}
    write_dataset(graphs, tmp_path / "heavy", config=WriterConfig(max_shard_samples=50))
    cfg = FinetuneConfig(data=str(tmp_path / "heavy"), out=str(tmp_path / "out"), property="heavy", model=TINY,
                         split=SplitConfig(48, 12, 24, seed=1), epochs=8, patience=8, batch_size=8, lr=1e-2,
                         readout="mean", progress=False)
    r = finetune(cfg, log=lambda *_: None)
    train = np.array([label[k] for k in r["splits"]["train"]])
    test = np.array([label[k] for k in r["splits"]["test"]])
    baseline = float(np.abs(test - train.mean()).mean())
    assert r["test_mae_eV"] < 0.4 * baseline, (r["test_mae_eV"], baseline)


def test_finetune_progress_is_plain_lines_when_not_a_terminal(qm9, tmp_path, capsys, monkeypatch) -> None:
    """A log file gets one plain line per epoch (no bar, no carriage returns, no escape codes)."""
    monkeypatch.setenv("SCD_PROGRESS_EVERY", "0")
    finetune(_cfg(qm9, tmp_path / "p", epochs=2, patience=5, progress=True), log=lambda *_: None)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("finetune homo:")]
    assert [ln.split(",")[0] for ln in lines] == ["finetune homo: 1/2 epoch (50%)", "finetune homo: 2/2 epoch (100%)",
                                                  "finetune homo: 2/2 epoch (100%)"]
    assert all("val_meV=" in ln for ln in lines)
    assert "\r" not in err and "\x1b" not in err
