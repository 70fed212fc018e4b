"""Hostile checkpoints and configs: every damage is one line naming the file, and training falls back."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scd_train.views import ViewConfig
from shards.config import ConfigError, load_yaml
from shards.tools.cli import main as scd_main
from tests.integrityhelp import deep, load_json, member, molecules_dataset, one_line, positions_at


@pytest.fixture(scope="module")
def molecules(real_graphs, tmp_path_factory) -> Path:
    """The 20 g2 molecules of ``molecules_dataset``, written once for this module."""
    return molecules_dataset(real_graphs, tmp_path_factory)


# ---------------------------------------------------------------------------------- 9. checkpoints
def _train_state(seed: int):
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return model, opt, sched


def _checkpointer(run: Path, model, opt, sched):
    from scd_train.checkpoint import Checkpointer

    return Checkpointer(run, {"model": model, "optimizer": opt, "scheduler": sched})


def _two_checkpoints(run: Path) -> dict[int, dict]:
    weights = {}
    for step in (1, 2):
        model, opt, sched = _train_state(step)
        _checkpointer(run, model, opt, sched).save(step, {"step": step})
        weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return weights


@pytest.mark.parametrize("damage", ["model.safetensors", "optim.safetensors", "state.json", "state-structure"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage):
    from scd_train.checkpoint import CheckpointError

    run = tmp_path / "run"
    weights = _two_checkpoints(run)
    newest = run / "step-00000002"
    if damage == "state-structure":
        state = load_json(newest / "state.json")
        state["optimizer"] = ["not", "a", "mapping"]
        (newest / "state.json").write_text(json.dumps(state))
        bad = newest / "state.json"
    else:
        bad = newest / damage
        data = bad.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    model, opt, sched = _train_state(7)
    with pytest.raises(CheckpointError) as err:
        _checkpointer(run, model, opt, sched).load(newest)
    one_line(str(err.value), str(bad))

    with caplog.at_level(logging.WARNING, logger="scd_train.checkpoint"):
        path, state = _checkpointer(run, model, opt, sched).load_latest()
    assert path == run / "step-00000001" and state is not None and state["step"] == 1
    assert all(np.array_equal(model.state_dict()[k].numpy(), v.numpy()) for k, v in weights[1].items())
    warned = [r.getMessage() for r in caplog.records if r.name == "scd_train.checkpoint"]
    assert len(warned) == 1
    one_line(warned[0], "step-00000002", str(bad))


@pytest.mark.parametrize("text,expect", [('{"config": []}', "'config' must be an object, got list"),
                                         ('{"config": {"model": 3}}', "'model' must be an object, got int"),
                                         ("{\"step\": 1", "not valid JSON"),
                                         (deep(100), "nested")])
def test_finetune_and_embed_read_checkpoint_state_structurally(tmp_path, text, expect):
    from scd_train.checkpoint import CheckpointError
    from scd_train.embed import load_objective
    from scd_train.finetune import model_config_from_checkpoint

    ckpt = tmp_path / "step-00000001"
    ckpt.mkdir()
    (ckpt / "state.json").write_text(text)
    (ckpt / "model.safetensors").write_bytes(b"")
    for read in (model_config_from_checkpoint, load_objective):
        with pytest.raises(CheckpointError) as err:
            read(ckpt)
        one_line(str(err.value), str(ckpt / "state.json"), expect)


def test_orphan_temp_folders_are_removed_at_start(tmp_path):
    from scd_train.checkpoint import list_checkpoints, remove_stale_temp

    run = tmp_path / "run"
    _two_checkpoints(run)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    orphan = run / f".tmp-step-00000003-{int(dead.stdout)}"
    (orphan / "sub").mkdir(parents=True)
    (orphan / "model.safetensors").write_bytes(b"half")
    live = run / f".tmp-step-00000003-{1}"  # pid 1 is alive: a save in flight is left alone
    live.mkdir()
    assert remove_stale_temp(run) == [orphan]
    assert not orphan.exists() and live.exists()
    assert [p.name for p in list_checkpoints(run)] == ["step-00000001", "step-00000002"]


@pytest.mark.slow
def test_training_resumes_from_the_newest_valid_checkpoint(molecules, tmp_path, caplog):
    import yaml

    from scd_train.config import load_train_config
    from scd_train.trainer import Trainer

    def config(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "run_dir": str(tmp_path / name), "steps": 6, "seed": 3, "log_every": 1, "checkpoint_every": 2,
            "tensorboard": False, "progress": False, "keep_checkpoints": 5,
            "data": {"datasets": [str(molecules)], "max_atoms": 60, "seed": 3},
            "model": {"kind": "scd", "backbone": "et", "preset": "small", "hidden": 16, "layers": 1, "heads": 2,
                      "num_rbf": 8}}))
        return path

    def losses(run: Path) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]

    Trainer(load_train_config(config("full"))).fit()
    part = config("part")
    Trainer(load_train_config(part, ["stop_after=4"])).fit()
    run = tmp_path / "part"
    damaged = run / "step-00000004" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    orphan = run / ".tmp-step-00000006-999999999"
    orphan.mkdir()
    with caplog.at_level(logging.WARNING, logger="scd_train.checkpoint"):
        trainer = Trainer(load_train_config(part))
    assert trainer.step == 2 and not orphan.exists()
    warned = [r.getMessage() for r in caplog.records if r.name == "scd_train.checkpoint"]
    assert len(warned) == 1
    one_line(warned[0], str(damaged))
    trainer.fit()
    assert losses(run) == losses(tmp_path / "full") and len(losses(run)) == 6


def test_skipped_corrupt_samples_are_logged_and_counted_on_after_a_resume(molecules, tmp_path):
    """With ``on_corrupt: skip``, every metrics row and ``realised_mix.json`` carry the running count of
    samples whose bytes failed their checksum; a resumed run goes on from the checkpoint's count (it used to
    start again at 0) and logs what the uninterrupted run logs."""
    import shutil

    import yaml

    from scd_train.config import load_train_config
    from scd_train.trainer import Trainer

    data = tmp_path / "ds"
    shutil.copytree(molecules, data)
    name, off, size, _ = member(data, 3)
    blob = bytearray((data / name).read_bytes())
    blob[positions_at(bytes(blob), off, size)[0]] ^= 0x01
    (data / name).write_bytes(bytes(blob))

    def config(run: str) -> Path:
        path = tmp_path / f"{run}.yaml"
        path.write_text(yaml.safe_dump({
            "run_dir": str(tmp_path / run), "steps": 6, "seed": 3, "log_every": 1, "checkpoint_every": 3,
            "tensorboard": False, "progress": False,
            "data": {"datasets": [str(data)], "max_atoms": 60, "seed": 3, "on_corrupt": "skip"},
            "model": {"kind": "scd", "backbone": "et", "preset": "small", "hidden": 16, "layers": 1, "heads": 2,
                      "num_rbf": 8}}))
        return path

    def counts(run: str) -> list[tuple[int, int]]:
        rows = map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
        return [(r["step"], r["corrupt_skipped"]) for r in rows]

    Trainer(load_train_config(config("full"))).fit()
    full = counts("full")
    assert len(full) == 6 and full[-1][1] > full[2][1] > 0  # 20 molecules: the pass repeats every few steps
    Trainer(load_train_config(config("part"), ["stop_after=3"])).fit()
    Trainer(load_train_config(config("part"))).fit()
    assert counts("part") == full
    assert load_json(tmp_path / "part" / "realised_mix.json")["corrupt_skipped"] == full[-1][1]


# ---------------------------------------------------------------------------------------- 12. config
def _train_yaml(tmp_path: Path, dataset: Path, extra: str = "") -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(f"run_dir: {tmp_path / 'run'}\ndata:\n  datasets: [{dataset}]\n{extra}")
    return path


@pytest.mark.parametrize("text,value", [("3e-4", 3e-4), ("1e5", 1e5), ("-2.5E-3", -2.5e-3), ("2", 2.0)])
def test_exponent_numbers_parse_from_set_and_yaml(molecules, tmp_path, text, value):
    from scd_train.config import load_train_config

    path = _train_yaml(tmp_path, molecules)
    assert load_train_config(path, [f"optim.lr={text}"]).optim.lr == float(text) == value
    path = _train_yaml(tmp_path, molecules, f"optim:\n  lr: {text}\n")
    assert load_train_config(path).optim.lr == value


def test_integer_keys_take_whole_exponent_numbers(molecules, tmp_path):
    from scd_train.config import load_train_config

    cfg = load_train_config(_train_yaml(tmp_path, molecules, "steps: 1e5\n"), ["checkpoint_every=2e3"])
    assert (cfg.steps, cfg.checkpoint_every) == (100_000, 2_000)
    assert isinstance(cfg.steps, int)
    with pytest.raises(ConfigError, match=r"steps: expected an integer, got 1500.5"):
        load_train_config(_train_yaml(tmp_path, molecules, "steps: 1.5005e3\n"))


@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan", "1e999"])
def test_non_finite_numbers_are_config_errors(molecules, tmp_path, capsys, text):
    from scd_train.config import load_train_config

    path = _train_yaml(tmp_path, molecules)
    with pytest.raises(ConfigError) as err:
        load_train_config(path, [f"optim.lr={text}"])
    one_line(str(err.value), str(path), "optim.lr", "finite")
    assert scd_main(["train", str(path), "--set", f"optim.lr={text}"]) == 1
    one_line(capsys.readouterr().err, "optim.lr", "finite")


def test_yaml_numbers_in_other_configs(tmp_path):
    path = tmp_path / "views.yaml"
    path.write_text("noisy_sigma: 4e-2\ncutoff: 6e0\n")
    cfg = load_yaml(ViewConfig, path)
    assert (cfg.noisy_sigma, cfg.cutoff) == (0.04, 6.0)
    path.write_text("cutoff: .inf\n")
    with pytest.raises(ConfigError, match=r"views.yaml.cutoff: expected a finite number"):
        load_yaml(ViewConfig, path)
