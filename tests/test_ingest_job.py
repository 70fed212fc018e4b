"""Ingest jobs on Ray: job files and the deterministic plan, 1 vs 2 workers byte-identical (every file),
idempotent re-runs, the flag form, exact accounting with rejects, a failing unit, SIGKILL then resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest_ray import digest, ray_session  # noqa: F401 - the shared session fixture

from ingest.job import load_job, plan_units
from ingest.run import run_job
from scd_train.datakit import package_dir, qm9_csv
from shards.cli import main as scd

BROKEN = Path(__file__).parent / "data" / "broken"
LOCAL = {**os.environ, "RAY_ADDRESS": ""}


def four_domain_sources(qm9_rows: int = 600, per_unit: int = 100) -> list[dict]:
    """Data-kit files of all four domains; QM9 and the DCD are split into record/frame ranges."""
    import MDAnalysisTests.datafiles as mda

    rd, pm = package_dir("rdkit"), package_dir("pymatgen")
    return [
        {"source": "qm9", "converter": "qm9csv", "paths": [str(qm9_csv(1))], "max_records": qm9_rows,
         "records_per_unit": per_unit},
        {"source": "cdk2", "converter": "auto", "paths": [str(rd / "Contrib/Fastcluster/testdata/cdk2.sdf")],
         "domain": "molecule"},
        {"source": "pdb", "converter": "auto", "paths": [mda.PDB_small, mda.PDB_multiframe],
         "options": {"models": "all"}, "domain": "protein"},
        {"source": "pymatgen", "converter": "auto", "paths": [str(pm / "util/structures/*.json")],
         "domain": "crystal"},
        {"source": "adk-md", "converter": "mdanalysis", "paths": [mda.DCD],
         "options": {"topology": mda.PSF, "stride": 10}, "records_per_unit": 4, "domain": "md"},
    ]


def write_job(tmp: Path, name: str, sources: list[dict], **writer: int) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"output": str(tmp / name), "sources": sources,
                                    "writer": {"max_shard_samples": 64, **writer}}))
    return path


def test_job_file_env_vars_and_deterministic_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("SITE", str(qm9_csv(1).parent))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"output": "out", "sources": [
        {"source": "qm9", "converter": "qm9csv", "paths": ["$SITE/qm9_part1.csv"], "max_records": 250,
         "records_per_unit": 100}]}))
    cfg = load_job(job)
    assert cfg.output_dir() == tmp_path / "out"
    units = plan_units(cfg)
    assert [(u.start, u.stop) for u in units] == [(0, 100), (100, 200), (200, 250)]
    assert [u.prefix for u in units] == ["u000000", "u000001", "u000002"]
    assert units == plan_units(load_job(job)), "the plan depends only on the job and its inputs"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"output": "o", "sources": [
        {"source": "x", "converter": "qm9csv", "paths": [str(qm9_csv(1))], "domain": "protein"}]}))
    with pytest.raises(Exception, match="domain"):
        plan_units(load_job(bad))


def test_one_and_two_workers_byte_identical_and_rerun_idempotent(ray_session, tmp_path):  # noqa: F811
    a = run_job(load_job(write_job(tmp_path, "a", four_domain_sources())), workers=1, progress=False)
    b = run_job(load_job(write_job(tmp_path, "b", four_domain_sources())), workers=2, progress=False)
    assert a.ok and b.ok and a.units == b.units > 10
    da, db = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert any(k.startswith("index.zarr/") for k in da) and "manifest.json" in da and "rejects.jsonl" in da
    assert any(k.startswith("_units/") for k in da)
    assert da == db, sorted(k for k in da.keys() | db.keys() if da.get(k) != db.get(k))
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert set(manifest["domains"]) == {"molecule", "protein", "crystal", "md"}
    again = run_job(load_job(write_job(tmp_path, "a", four_domain_sources())), workers=2, progress=False)
    assert again.ok and again.skipped == again.units
    assert digest(tmp_path / "a") == da
    shard = next((tmp_path / "a").glob("u000002-*.tar"))
    shard.write_bytes(shard.read_bytes()[:-512])  # a damaged shard is detected by checksum and redone
    redo = run_job(load_job(write_job(tmp_path, "a", four_domain_sources())), workers=2, progress=False)
    assert redo.ok and redo.skipped == redo.units - 1
    assert digest(tmp_path / "a") == da


def test_flag_form_and_stale_units_of_a_changed_job(ray_session, tmp_path, capsys):  # noqa: F811
    sdf = package_dir("rdkit") / "Contrib/Fastcluster/testdata/cdk2.sdf"
    out = tmp_path / "flags"
    assert scd(["ingest", "run", "--domain", "molecule", "--input", str(sdf), "--out", str(out),
                "--no-progress", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["accounting"]["sources"]["molecule"] == {"inputs": 47, "accepted": 47, "rejected": 0}
    assert json.loads((out / "manifest.json").read_text())["n_samples"] == 47
    job = write_job(tmp_path, "shrink", [{"source": "qm9", "converter": "qm9csv", "paths": [str(qm9_csv(1))],
                                          "max_records": 300, "records_per_unit": 100}])
    assert scd(["ingest", "run", str(job), "--no-progress", "--set", "writer.max_shard_samples=50"]) == 0
    assert len(list((tmp_path / "shrink" / "_units").iterdir())) == 3
    write_job(tmp_path, "shrink", [{"source": "qm9", "converter": "qm9csv", "paths": [str(qm9_csv(1))],
                                    "max_records": 150, "records_per_unit": 100}], max_shard_samples=50)
    assert run_job(load_job(job), progress=False).ok
    assert sorted(p.name for p in (tmp_path / "shrink" / "_units").iterdir()) == ["u000000.json", "u000001.json"]
    assert scd(["shards", "verify", str(tmp_path / "shrink")]) == 0
    assert json.loads((tmp_path / "shrink" / "manifest.json").read_text())["n_samples"] == 150


def test_accounting_rejects_and_summary(ray_session, tmp_path):  # noqa: F811
    broken = {"source": "broken", "converter": "auto",
              "paths": [str(p) for p in sorted(BROKEN.glob("*")) if p.suffix in (".xyz", ".sdf", ".pdb", ".cif")]}
    res = run_job(load_job(write_job(tmp_path, "acc", [*four_domain_sources(200), broken])), progress=False)
    assert res.ok
    out = tmp_path / "acc"
    manifest = json.loads((out / "manifest.json").read_text())
    summary = json.loads((out / "ingest_summary.json").read_text())
    acc = manifest["accounting"]
    assert summary["accounting"] == acc and summary["failed"] == []
    for table in ("sources", "domains"):
        for name, row in acc[table].items():
            assert row["inputs"] == row["accepted"] + row["rejected"], (table, name, row)
        assert sum(r["accepted"] for r in acc[table].values()) == manifest["n_samples"]
    for name, row in acc["sources"].items():
        assert row["accepted"] == manifest["sources"].get(name, {"n_samples": 0})["n_samples"], name
    assert acc["sources"]["qm9"] == {"inputs": 200, "accepted": 200, "rejected": 0}
    assert acc["sources"]["broken"]["rejected"] > 0
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == acc["total"]["rejected"] == sum(acc["reject_reasons"].values())
    assert all(r["file"] and r["converter"] and r["reason"] and "record" in r for r in rejects)


def test_failing_unit_retried_then_recorded_others_finish(ray_session, tmp_path, capsys):  # noqa: F811
    job = write_job(tmp_path, "fail", four_domain_sources(300))
    out = tmp_path / "fail"
    out.mkdir()
    (out / "u000001-000000.tar").mkdir()  # the worker cannot clear this unit's leftovers: it raises
    res = run_job(load_job(job), progress=False)
    assert not res.ok and [f["unit"] for f in res.failed] == ["u000001"]
    assert "IsADirectoryError" in res.failed[0]["error"] and "Traceback" in res.failed[0]["error"]
    assert not (out / "manifest.json").exists(), "an incomplete dataset has no manifest"
    assert len(list((out / "_units").glob("*.json"))) == res.units - 1
    summary = json.loads((out / "ingest_summary.json").read_text())
    assert [f["unit"] for f in summary["failed"]] == ["u000001"]
    assert scd(["ingest", "run", str(job), "--no-progress"]) == 1
    assert "u000001" in capsys.readouterr().out
    (out / "u000001-000000.tar").rmdir()
    res = run_job(load_job(job), progress=False)
    assert res.ok and res.skipped == res.units - 1
    assert scd(["shards", "verify", str(out)]) == 0


def _ray_pids(session_pgid: int) -> list[int]:
    """Processes still alive in a killed process group (the driver's embedded Ray included)."""
    out = subprocess.run(["ps", "-eo", "pid=,pgid="], capture_output=True, text=True).stdout.split()
    return [int(p) for p, g in zip(out[::2], out[1::2]) if int(g) == session_pgid]


@pytest.mark.slow
def test_sigkill_mid_job_then_rerun_is_byte_identical(ray_session, tmp_path):  # noqa: F811
    sources = four_domain_sources(3000, per_unit=100)
    clean = run_job(load_job(write_job(tmp_path, "clean", sources)), progress=False)
    assert clean.ok
    job = write_job(tmp_path, "killed", sources)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "shards.cli", "ingest", "run", str(job), "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env=LOCAL)
    try:
        deadline = time.time() + 300
        while len(list(out.glob("_units/*.json"))) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its embedded Ray (same process group)
        proc.wait()
    for _ in range(100):
        if not _ray_pids(proc.pid):
            break
        time.sleep(0.1)
    assert not _ray_pids(proc.pid), "orphaned Ray processes"
    assert not (out / "manifest.json").exists()
    done = len(list(out.glob("_units/*.json")))
    assert done < clean.units, "killed mid-job"
    res = subprocess.run(cmd[:-3] + ["--no-progress", "--json"], capture_output=True, text=True, env=LOCAL)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["skipped"] >= done
    assert digest(tmp_path / "clean") == digest(out)
    assert scd(["shards", "verify", str(out)]) == 0
