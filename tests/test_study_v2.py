"""`scd study qm9-v2` end to end at a tiny size: every arm, target and regime in the table, artefacts, resume,
and the time estimate."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shards.config import ConfigError
from shards.tools.cli import main

TINY = {"max_records": 110, "ingest": "builtin", "split": {"train": 24, "val": 12, "test": 12, "seed": 0},
        "train_sizes": [24, 12], "targets": ["homo", "gap"], "seeds": [0], "device": "cpu", "threads": 1,
        "model": {"hidden": 16, "layers": 1, "heads": 2, "num_rbf": 8},
        "pretrain": {"steps": 2, "max_atoms": 150, "warmup_steps": 1},
        "finetune": {"steps": 3, "warmup_steps": 1, "batch_size": 12},
        "diagnostics": {"every": 1, "molecules": 6}, "estimate_steps": 2}
REPO = Path(__file__).resolve().parents[1]
ARMS = ("scratch", "denoise", "denoise_2x", "scd")


@pytest.mark.slow
def test_tiny_study_v2_end_to_end_and_resume(tmp_path) -> None:
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    out = tmp_path / "study"
    assert main(["study", "qm9-v2", "--out", str(out), "--config", str(tmp_path / "tiny.yaml")]) == 0
    table = (out / "results.md").read_text()
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert set(summary) == {"n24", "n12"}
    for reg, n in (("n24", 24), ("n12", 12)):
        assert f"## {n} labelled training molecules" in table
        assert set(summary[reg]) == {"homo", "gap"}
        for target in ("homo", "gap"):
            assert set(summary[reg][target]) == set(ARMS)
            for arm in ARMS:
                r = json.loads((out / "runs" / reg / target / f"{arm}-seed0" / "result.json").read_text())
                assert r["n"]["train"] == n and r["property"] == target and r["steps_run"] == 3
                assert summary[reg][target][arm]["test_meV"] == [pytest.approx(r["test_mae_meV"])]
                assert (r["config"]["checkpoint"] is None) == (arm == "scratch")
    for arm in ARMS:
        # one row per regime table, and one in the diagnostics table for a pretrained arm
        assert table.count(f"| {arm} |") == 2 + (arm != "scratch")
    # denoise_2x pretrains twice the steps of denoise; every pretrained arm logged diagnostics each step
    assert json.loads((out / "pretrain" / "denoise_2x" / "done.json").read_text())["steps"] == 4
    assert json.loads((out / "pretrain" / "denoise" / "done.json").read_text())["steps"] == 2
    for arm, steps in (("denoise", [1, 2]), ("denoise_2x", [1, 2, 3, 4]), ("scd", [1, 2])):
        rows = [json.loads(line) for line in (out / "diagnostics" / f"{arm}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == steps and all("diag_loss_other_c" in r for r in rows)
        assert (out / "diagnostics" / f"{arm}.png").stat().st_size > 1000
    for name in ("learning_curves.png", "diagnostics.png"):
        assert (out / name).stat().st_size > 1000
    splits = {n: json.loads((out / f"splits_n{n}.json").read_text()) for n in (24, 12)}
    assert splits[12]["train"] == splits[24]["train"][:12] and splits[12]["test"] == splits[24]["test"]
    # resume: a second run reuses every finished part and writes the same table
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("result.json")}
    assert main(["study", "qm9-v2", "--out", str(out), "--config", str(tmp_path / "tiny.yaml")]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("result.json")} == before
    assert json.loads((out / "results.json").read_text())["summary"] == summary


def test_study_v2_estimate_runs_nothing_else(tmp_path, capsys) -> None:
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "estimate": True}))
    out = tmp_path / "est"
    assert main(["study", "qm9-v2", "--out", str(out), "--config", str(tmp_path / "tiny.yaml")]) == 0
    est = json.loads((out / "estimate.json").read_text())
    assert set(est["pretrain_step_s"]) == {"denoise", "scd"}
    for clock in ("wall", "cpu"):
        assert est["total_s"][clock] > 0
        assert est["total_s"][clock] == pytest.approx(sum(p[clock] for p in est["parts_s"].values()))
    assert "estimated wall time" in capsys.readouterr().out
    assert not (out / "runs").exists() and not (out / "results.md").exists()


def test_study_v2_config_rejects_unknown_arms_and_sizes(tmp_path) -> None:
    from scd_train.study_v2 import load_study_v2_config

    cfg = load_study_v2_config(None)
    assert cfg.arms == ARMS and cfg.targets == ("homo", "lumo", "gap") and len(cfg.seeds) == 3
    assert cfg.finetune.aux_denoise_weight == 0.1 and cfg.finetune.readout == "sum" and cfg.finetune.loss == "mse"
    with pytest.raises(ConfigError, match="denoise_3x"):
        load_study_v2_config(None, ["arms=[scratch,denoise_3x]"])
    with pytest.raises(ConfigError, match="train_sizes"):
        load_study_v2_config(None, ["train_sizes=[5000]"])
    (tmp_path / "bad.yaml").write_text("diagnostics: {evry: 3}\n")
    with pytest.raises(ConfigError, match="evry"):
        load_study_v2_config(tmp_path / "bad.yaml")


def test_gpu_study_config_loads() -> None:
    """The shipped GPU config names only known keys and keeps the protocol defaults it does not set."""
    from scd_train.study_v2 import load_study_v2_config

    cfg = load_study_v2_config(Path(__file__).resolve().parents[1] / "docs" / "study-qm9-v2" / "study-gpu.yaml")
    assert cfg.device == "cuda" and cfg.model.hidden == 256 and cfg.train_sizes == (10000, 1000)
    assert cfg.finetune.aux_denoise_weight == 0.1 and cfg.finetune.rotate and cfg.finetune.steps == 2000


@pytest.mark.slow
def test_two_parts_share_the_study_and_reproduce_one_process(tmp_path) -> None:
    """`--set parts=2 --set part=i` in two processes on one folder: each pretrains and fine-tunes its own half
    (a run waits for the other part's checkpoint), and the tables equal those of one process."""
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    one = tmp_path / "one"
    assert main(["study", "qm9-v2", "--out", str(one), "--config", str(tmp_path / "tiny.yaml")]) == 0
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "shards", "study", "qm9-v2", "--out", str(two), "--config",
           str(tmp_path / "tiny.yaml"), "--set", "parts=2", "--set", "wait_poll_s=0.2"]
    procs = [subprocess.Popen([*cmd, "--set", f"part={i}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=REPO) for i in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert [sorted(re.findall(r"^pretrain (\w+):", log, re.M)) for log in logs] == [["denoise", "scd"],
                                                                                       ["denoise_2x"]]
    ran = [re.findall(r"^fine-tune (n\d+ \w+ \w+ seed \d)", log, re.M) for log in logs]
    assert len(ran[0]) == len(ran[1]) == 8 and not set(ran[0]) & set(ran[1])
    assert json.loads((two / "results.json").read_text())["summary"] == \
        json.loads((one / "results.json").read_text())["summary"]
    # every run's result is the same whichever process ran it
    for r1 in (one / "runs").rglob("result.json"):
        r2 = json.loads((two / r1.relative_to(one)).read_text())
        assert r2["test_mae_meV"] == json.loads(r1.read_text())["test_mae_meV"]


def test_part_must_be_below_parts() -> None:
    from scd_train.study_v2 import load_study_v2_config

    assert load_study_v2_config(None, ["parts=3", "part=2"]).part == 2
    with pytest.raises(ConfigError, match="part must be in"):
        load_study_v2_config(None, ["parts=2", "part=2"])
