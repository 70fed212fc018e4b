"""The trainer: exact resume (bitwise on CPU, one process and 2-process gloo DDP), checkpoints without
pickle, atom-normalised loss, clear config errors, and the SCD loss falling."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from shards.config import ConfigError
from shards.format.manifest import write_dataset
from shards.format.writer import WriterConfig

TINY_MODEL = {"kind": "scd", "backbone": "et", "preset": "small", "hidden": 32, "layers": 2, "heads": 4,
              "num_rbf": 8}


@pytest.fixture(scope="module")
def dataset(real_graphs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train") / "ds"
    write_dataset(real_graphs, root, config=WriterConfig(max_shard_samples=50))
    return root


def _config(tmp: Path, dataset: Path, name: str, **kw) -> Path:
    cfg = {"run_dir": str(tmp / name), "steps": 10, "seed": 3, "log_every": 1, "checkpoint_every": 100,
           "tensorboard": False, "progress": False,
           "data": {"datasets": [str(dataset)], "max_atoms": 120, "seed": 3,
                    "mixture": {"crop_protein_atoms": 100}, "views": {"rotate": True}},
           "model": TINY_MODEL, "optim": {"lr": 1e-3, "warmup_steps": 2}}
    cfg.update(kw)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _scd(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "shards", *args], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(sorted(run.glob("step-*"))[-1] / "model.safetensors"))


def test_resume_is_bitwise_single_process(tmp_path, dataset):
    from scd_train.config import load_train_config
    from scd_train.trainer import Trainer

    full = _config(tmp_path, dataset, "full")
    Trainer(load_train_config(full)).fit()
    part = _config(tmp_path, dataset, "part", num_workers=2)  # 2 loader workers, resumed at an odd step
    Trainer(load_train_config(part, ["stop_after=5"])).fit()
    assert len(_losses(tmp_path / "part")) == 5
    Trainer(load_train_config(part)).fit()
    assert _losses(tmp_path / "full") == _losses(tmp_path / "part")
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "full" / "loss_curve.png").is_file()
    state = json.loads((sorted((tmp_path / "full").glob("step-*"))[-1] / "state.json").read_text())
    assert state["step"] == 10 and len(state["loader"]["ranks"]) == 1


def _torchrun(cfg: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "scd_train", "train", str(cfg), *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-4000:]


@pytest.mark.slow
def test_resume_is_exact_with_two_gloo_processes(tmp_path, dataset):
    full = _config(tmp_path, dataset, "full")
    _torchrun(full)
    part = _config(tmp_path, dataset, "part")
    _torchrun(part, "--set", "stop_after=4")
    _torchrun(part)
    assert _losses(tmp_path / "full") == _losses(tmp_path / "part")
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((sorted((tmp_path / "part").glob("step-*"))[-1] / "state.json").read_text())
    assert len(state["loader"]["ranks"]) == 2
    assert state["loader"]["ranks"][0] != state["loader"]["ranks"][1]


def test_checkpoint_loads_with_weights_only(tmp_path, dataset):
    from scd_train.config import load_train_config
    from scd_train.trainer import Trainer

    Trainer(load_train_config(_config(tmp_path, dataset, "r", steps=2))).fit()
    ckpt = sorted((tmp_path / "r").glob("step-*"))[-1]
    tensors = load_file(str(ckpt / "model.safetensors"))
    assert any("noise" in k or "mean" in k or "std" in k for k in tensors), "noise statistics are saved"
    assert not list(ckpt.glob("*.pt")) and not list(ckpt.glob("*.pkl"))


def test_bad_configs_are_one_line_errors(tmp_path, dataset):
    from scd_train.config import load_train_config

    with pytest.raises(ConfigError, match="unknown key"):
        load_train_config(_config(tmp_path, dataset, "a", bogus=1))
    with pytest.raises(ConfigError, match="steps: expected an integer"):
        load_train_config(_config(tmp_path, dataset, "b", steps="many"))
    with pytest.raises(ConfigError, match="not a shard dataset"):
        load_train_config(_config(tmp_path, tmp_path / "nothing", "c"))
    res = subprocess.run([sys.executable, "-m", "shards", "train", str(_config(tmp_path, dataset, "d", zzz=2))],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "unknown key" in res.stderr and "Traceback" not in res.stderr


def test_resume_with_other_model_is_refused(tmp_path, dataset):
    from scd_train.config import load_train_config
    from scd_train.trainer import Trainer

    Trainer(load_train_config(_config(tmp_path, dataset, "m", steps=2))).fit()
    other = _config(tmp_path, dataset, "m", steps=4, model={**TINY_MODEL, "hidden": 48})
    with pytest.raises(ValueError, match="does not match this model config"):
        Trainer(load_train_config(other))
