"""Conditioning diagnostics (issue 14): deterministic, logged to metrics.jsonl, the shuffled-c control really
feeds another molecule's c, the own-c loss equals the objective's own eval loss, and resume stays bitwise."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from scd_train.datakit import qm9_csv
from scd_train.diagnostics import Diagnostics, DiagnosticsConfig, derangement
from scd_train.objectives import ObjectiveConfig, build_objective
from scd_train.views import ViewConfig
from shards.config import ConfigError, from_dict
from shards.format.manifest import write_dataset
from shards.format.qm9 import iter_qm9_csv
from shards.format.writer import WriterConfig

TINY = {"hidden": 32, "layers": 2, "heads": 4, "num_rbf": 8}


@pytest.fixture(scope="module")
def qm9_sets(tmp_path_factory) -> tuple[Path, Path]:
    """A training set (molecules 0..59) and a held-out set (60..99) of QM9 with HOMO labels."""
    root = tmp_path_factory.mktemp("diag")
    graphs = list(iter_qm9_csv(qm9_csv(1), 100))
    write_dataset(graphs[:60], root / "train", config=WriterConfig(max_shard_samples=30))
    write_dataset(graphs[60:], root / "held", config=WriterConfig(max_shard_samples=30))
    return root / "train", root / "held"


def _objective(kind: str = "scd"):
    torch.manual_seed(0)
    return build_objective(ObjectiveConfig(kind=kind, **TINY))


def test_derangement_has_no_fixed_point_and_is_keyed():
    for n in (2, 3, 7, 40):
        for seed in range(5):
            p = derangement(n, seed)
            assert sorted(p.tolist()) == list(range(n))
            assert (p != np.arange(n)).all()
            assert np.array_equal(p, derangement(n, seed))
    assert not np.array_equal(derangement(40, 0), derangement(40, 1))
    with pytest.raises(ValueError):
        derangement(1, 0)


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(DiagnosticsConfig, {"held_out": "x", "every": 3}, "diagnostics")
    with pytest.raises(ConfigError):
        from_dict(DiagnosticsConfig, {"n_molecules": 1}, "diagnostics")


def test_diagnostics_deterministic_and_other_c_is_another_molecules(qm9_sets):
    _, held = qm9_sets
    cfg = DiagnosticsConfig(held_out=str(held), n_molecules=30, probe_property="homo", max_atoms=200)
    diag = Diagnostics(cfg, ViewConfig())
    assert len(diag.batches) > 1 and diag.n == 30
    obj = _objective()
    fed: list[torch.Tensor] = []
    denoise = obj.denoise

    def recording(batch, cond, generator=None):
        fed.append(cond.clone())
        return denoise(batch, cond, generator)

    obj.denoise = recording  # records what pass 2 is conditioned on; the computation is the real one
    obj.train()
    a = diag.evaluate(obj)
    assert obj.training, "evaluate restores the training mode"
    b = diag.evaluate(obj)
    c2 = Diagnostics(cfg, ViewConfig()).evaluate(obj)
    assert a == b == c2
    assert {"diag_loss_own_c", "diag_loss_mask", "diag_loss_other_c", "diag_c_spread", "diag_probe_mae"} <= set(a)

    # pass-2 conditions of the first evaluation, per batch in the order own, other, mask
    own = torch.cat(fed[0:3 * len(diag.batches):3])
    other = torch.cat(fed[1:3 * len(diag.batches):3])
    mask = torch.cat(fed[2:3 * len(diag.batches):3])
    obj.eval()
    with torch.no_grad():
        c = torch.cat([obj.embed(bt, "_clean")[0] for bt in diag.batches])
    assert torch.equal(own, c)
    perm = diag.perm.numpy()
    assert (perm != np.arange(diag.n)).all()
    assert torch.equal(other, c[perm])
    assert ((other - own).abs().amax(dim=1) > 0).all(), "some molecule was fed its own c"
    assert torch.equal(mask, obj.mask_token.detach().expand_as(mask))

    # independent oracles: the own-c loss is the SCD objective's own eval loss (no drop-cond in eval),
    # the spread is recomputed with numpy, the probe's baseline is the labels' mean absolute deviation
    with torch.no_grad():
        total = sum(float(obj(bt)[0]) for bt in diag.batches)
    atoms = sum(int(bt["n_atoms"].sum()) for bt in diag.batches)
    assert a["diag_loss_own_c"] == pytest.approx(total / atoms, rel=1e-5)
    ln = obj.cond_norm(c).detach().double().numpy()
    assert a["diag_c_spread"] == pytest.approx(float(np.std(ln, axis=0, ddof=1).mean()), rel=1e-9)
    y = np.array([g.properties["homo"] for g in list(iter_qm9_csv(qm9_csv(1), 90))[60:90]])
    assert a["diag_probe_baseline_mae"] == pytest.approx(float(np.abs(y - y.mean()).mean()), rel=1e-9)
    assert np.isfinite(a["diag_probe_mae"])
    assert a["diag_loss_other_c"] != a["diag_loss_own_c"]


def test_mask_loss_equals_the_denoising_objectives_loss(qm9_sets):
    _, held = qm9_sets
    diag = Diagnostics(DiagnosticsConfig(held_out=str(held), n_molecules=8), ViewConfig())
    obj = _objective("denoise").eval()
    with torch.no_grad():
        total = sum(float(obj(bt)[0]) for bt in diag.batches)
    atoms = sum(int(bt["n_atoms"].sum()) for bt in diag.batches)
    assert diag.evaluate(obj)["diag_loss_mask"] == pytest.approx(total / atoms, rel=1e-5)


def _train_config(tmp: Path, train: Path, held: Path, name: str) -> Path:
    cfg = {"run_dir": str(tmp / name), "steps": 6, "seed": 3, "log_every": 1, "checkpoint_every": 100,
           "tensorboard": False, "progress": False,
           "data": {"datasets": [str(train)], "max_atoms": 90, "seed": 3},
           "model": {"kind": "scd", **TINY}, "optim": {"lr": 1e-3, "warmup_steps": 2},
           "diagnostics": {"held_out": str(held), "eval_every": 3, "n_molecules": 10}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rows(run: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    diag = [r for r in rows if "diag_loss_own_c" in r]
    return [r for r in rows if "loss" in r], diag


def test_trainer_logs_diagnostics_and_resume_stays_bitwise(tmp_path, qm9_sets):
    from safetensors.torch import load_file

    from scd_train.config import load_train_config
    from scd_train.trainer import Trainer

    train, held = qm9_sets
    Trainer(load_train_config(_train_config(tmp_path, train, held, "full"))).fit()
    part = _train_config(tmp_path, train, held, "part")
    Trainer(load_train_config(part, ["stop_after=3"])).fit()
    Trainer(load_train_config(part)).fit()
    (full_train, full_diag), (part_train, part_diag) = _rows(tmp_path / "full"), _rows(tmp_path / "part")
    assert [r["step"] for r in full_diag] == [3, 6]
    assert [r["loss"] for r in full_train] == [r["loss"] for r in part_train]
    assert full_diag == part_diag
    a = load_file(str(sorted((tmp_path / "full").glob("step-*"))[-1] / "model.safetensors"))
    b = load_file(str(sorted((tmp_path / "part").glob("step-*"))[-1] / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "full" / "diagnostics.png").stat().st_size > 1000


def test_readme_documents_every_diagnostics_key_and_model_option():
    """The README's YAML block loads into the configs and names every diagnostics key and model option."""
    import dataclasses
    import re

    from shards.config import parse_yaml

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("### Conditioning diagnostics and model options", 1)[1]
    block = parse_yaml(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    assert set(block["diagnostics"]) == {f.name for f in dataclasses.fields(DiagnosticsConfig)}
    from_dict(DiagnosticsConfig, block["diagnostics"], "diagnostics")
    options = {"center_noise", "adaln", "layer_norm", "self_loops", "vector_cutoff"}
    assert set(block["model"]) == options
    model = from_dict(ObjectiveConfig, block["model"], "model")
    build_objective(dataclasses.replace(model, **TINY))
    for name in options:
        assert f"| `{name}` |" in section, f"{name} has no row in the options table"


def test_missing_held_out_is_a_one_line_config_error(tmp_path, qm9_sets):
    from scd_train.config import load_train_config

    train, _ = qm9_sets
    path = _train_config(tmp_path, train, tmp_path / "nowhere", "bad")
    with pytest.raises(ConfigError, match=r"diagnostics\.held_out: .*nowhere is not a shard dataset"):
        load_train_config(path)
