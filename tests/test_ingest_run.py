"""Ray ingest jobs: byte-identical output for 1 and 2 workers, idempotent re-runs, SIGKILL mid-job then
resume, exact accounting (inputs = accepted + rejected), failing units recorded, and the data report."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ingest.job import load_job
from ingest.run import run_job
from scd_train.datakit import package_dir, qm9_csv

BROKEN = Path(__file__).parent / "data" / "broken"


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for every in-process ingest test (ray.init costs seconds)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray


def _job(tmp: Path, name: str, *, qm9_rows: int = 600, extra: list | None = None) -> Path:
    import MDAnalysisTests.datafiles as mda

    rd, pm = package_dir("rdkit"), package_dir("pymatgen")
    sources = [
        {"source": "qm9", "converter": "qm9csv", "paths": [str(qm9_csv(1))], "max_records": qm9_rows,
         "records_per_unit": 100},
        {"source": "cdk2", "converter": "auto", "paths": [str(rd / "Contrib/Fastcluster/testdata/cdk2.sdf")]},
        {"source": "pdb", "converter": "auto", "paths": [mda.PDB_small, mda.PDB_multiframe],
         "options": {"models": "all"}},
        {"source": "pymatgen", "converter": "auto", "paths": [str(pm / "util/structures/*.json")]},
        {"source": "adk-md", "converter": "mdanalysis", "paths": [mda.DCD],
         "options": {"topology": mda.PSF, "stride": 10}, "records_per_unit": 4},
        *(extra or []),
    ]
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"output": str(tmp / name), "sources": sources,
                                    "writer": {"max_shard_samples": 64}}))
    return path


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_one_and_two_workers_are_byte_identical_and_rerun_is_idempotent(ray_session, tmp_path):
    a = run_job(load_job(_job(tmp_path, "a")), workers=1, progress=False)
    b = run_job(load_job(_job(tmp_path, "b")), workers=2, progress=False)
    assert a.ok and b.ok and a.units == b.units > 10
    da, db = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert da.keys() == db.keys() and any(k.startswith("index.zarr") for k in da)
    manifest_a = json.loads((tmp_path / "a" / "manifest.json").read_text())
    manifest_b = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest_a == manifest_b
    differ = [k for k in da if da[k] != db[k] and k != "manifest.json"]
    assert not differ, differ
    again = run_job(load_job(_job(tmp_path, "a")), workers=2, progress=False)
    assert again.skipped == again.units
    assert _digest(tmp_path / "a") == da


def test_accounting_with_broken_inputs(ray_session, tmp_path):
    broken = {"source": "broken", "converter": "auto",
              "paths": [str(p) for p in sorted(BROKEN.glob("*")) if p.suffix in (".xyz", ".sdf", ".pdb", ".cif")]}
    res = run_job(load_job(_job(tmp_path, "acc", qm9_rows=200, extra=[broken])), progress=False)
    assert res.ok
    out = tmp_path / "acc"
    manifest = json.loads((out / "manifest.json").read_text())
    acc = manifest["accounting"]
    for table in ("sources", "domains"):
        for name, row in acc[table].items():
            assert row["inputs"] == row["accepted"] + row["rejected"], (table, name, row)
    assert acc["total"]["accepted"] == manifest["n_samples"]
    assert acc["sources"]["broken"]["rejected"] > 0
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == acc["total"]["rejected"]
    assert all(r["reason"] and r["converter"] and r["file"] for r in rejects)
    assert acc["sources"]["qm9"] == {"inputs": 200, "accepted": 200, "rejected": 0}
    summary = json.loads((out / "ingest_summary.json").read_text())
    assert summary["accounting"] == acc
    report = subprocess.run([sys.executable, "-m", "shards.cli", "shards", "report", str(out), "--out",
                             str(tmp_path / "report")], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    names = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"index.html", "domains.png", "sources.png", "atoms_per_sample.png", "elements.png",
            "rejects.png"} <= names


def test_failing_unit_is_recorded_and_others_finish(ray_session, tmp_path):
    job = _job(tmp_path, "fail", qm9_rows=300)
    out = tmp_path / "fail"
    out.mkdir()
    (out / "u000001-000000.tar").mkdir()
    res = run_job(load_job(job), progress=False)
    assert not res.ok and [f["unit"] for f in res.failed] == ["u000001"]
    assert "Error" in res.failed[0]["error"]
    assert not (out / "manifest.json").exists(), "an incomplete dataset has no manifest"
    done = {p.stem for p in (out / "_units").glob("*.json")}
    assert len(done) == res.units - 1
    cli = subprocess.run([sys.executable, "-m", "shards.cli", "ingest", "run", str(job), "--no-progress"],
                         capture_output=True, text=True)
    assert cli.returncode == 1 and "u000001" in cli.stdout
    (out / "u000001-000000.tar").rmdir()
    res = run_job(load_job(job), progress=False)
    assert res.ok and res.skipped == res.units - 1


@pytest.mark.slow
def test_sigkill_mid_job_then_rerun_is_byte_identical(ray_session, tmp_path):
    clean = run_job(load_job(_job(tmp_path, "clean", qm9_rows=2000)), progress=False)
    assert clean.ok
    job = _job(tmp_path, "killed", qm9_rows=2000)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "shards.cli", "ingest", "run", str(job), "--workers", "1",
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "RAY_ADDRESS": ""})
    deadline = time.time() + 300
    while len(list((out / "_units").glob("*.json"))) < 3 if (out / "_units").exists() else True:
        assert time.time() < deadline and proc.poll() is None, "the job ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    res = subprocess.run([sys.executable, "-m", "shards.cli", "ingest", "run", str(job), "--no-progress"],
                         capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = _digest(tmp_path / "clean"), _digest(out)
    a.pop("manifest.json")
    b.pop("manifest.json")
    assert a == b
    verify = subprocess.run([sys.executable, "-m", "shards.cli", "shards", "verify", str(out)],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
