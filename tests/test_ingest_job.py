"""Ingest jobs on Ray: job files and the deterministic plan (grouped small files, split big files), 1 vs 2
workers byte-identical (every file), idempotent re-runs, the flag form, exact accounting per file with
rejects, an unreadable file inside a grouped unit, a failing unit, SIGKILL then resume, shards near the
target size, the output-folder lock and temporary files."""
from __future__ import annotations

import gzip
import json
import math
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
from ingest.lock import LockedError, output_lock
from ingest.run import run_job
from scd_train.datakit import package_dir, qm9_csv
from shards.tools.cli import main as scd

BROKEN = Path(__file__).parent / "data" / "broken"
LOCAL = {**os.environ, "RAY_ADDRESS": ""}
CDK2 = "Contrib/Fastcluster/testdata/cdk2.sdf"


def four_domain_sources(qm9_rows: int = 600, per_unit: int = 100) -> list[dict]:
    """Data-kit files of all four domains; QM9 and the DCD are split into record/frame ranges."""
    import MDAnalysisTests.datafiles as mda

    rd, pm = package_dir("rdkit"), package_dir("pymatgen")
    return [
        {"source": "qm9", "converter": "qm9csv", "paths": [str(qm9_csv(1))], "max_records": qm9_rows,
         "records_per_unit": per_unit},
        {"source": "cdk2", "converter": "auto", "paths": [str(rd / CDK2)], "domain": "molecule"},
        {"source": "pdb", "converter": "auto", "paths": [mda.PDB_small, mda.PDB_multiframe],
         "options": {"models": "all"}, "domain": "protein"},
        {"source": "pymatgen", "converter": "auto", "paths": [str(pm / "util/structures/*.json")],
         "domain": "crystal"},
        {"source": "adk-md", "converter": "mdanalysis", "paths": [mda.DCD],
         "options": {"topology": mda.PSF, "stride": 10}, "records_per_unit": 4, "domain": "md"},
    ]


def small_files(root: Path) -> tuple[list[Path], list[Path], Path]:
    """A small-file corpus: cdk2.sdf cut into 47 one-molecule files (by its ``$$$$`` lines), 24 copies of
    ASE's mineral CIFs, and a truncated .cif.gz placed among the CIFs. Returns (sdfs, cifs, truncated)."""
    root.mkdir(parents=True, exist_ok=True)
    text = (package_dir("rdkit") / CDK2).read_text()
    blocks = [b for b in text.split("$$$$\n") if b.strip()]
    sdfs = []
    for i, block in enumerate(blocks):
        sdfs.append(root / f"mol_{i:03d}.sdf")
        sdfs[-1].write_text(block + "$$$$\n")
    minerals = sorted((package_dir("ase") / "test/testdata/minerals").glob("*.cif"))
    cifs = []
    for k in range(3):
        for p in minerals:
            cifs.append(root / f"xtal_{k}_{p.name}")
            cifs[-1].write_bytes(p.read_bytes())
    truncated = root / "xtal_1_zz_truncated.cif.gz"
    truncated.write_bytes(gzip.compress(minerals[0].read_bytes())[:120])
    return sdfs, cifs, truncated


def small_sources(root: Path, files_per_unit: int = 8) -> list[dict]:
    small_files(root)
    return [{"source": "mols", "converter": "auto", "paths": [str(root / "mol_*.sdf")], "domain": "molecule",
             "files_per_unit": files_per_unit},
            {"source": "xtals", "converter": "auto", "paths": [str(root / "xtal_*")], "files_per_unit": 10}]


def write_job(tmp: Path, name: str, sources: list[dict], **writer: int) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"output": str(tmp / name), "sources": sources,
                                    "writer": {"max_shard_samples": 64, **writer}}))
    return path


def outcomes(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "_units").glob("u*.json"))]


def test_job_file_env_vars_and_deterministic_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("SITE", str(qm9_csv(1).parent))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"output": "out", "sources": [
        {"source": "qm9", "converter": "qm9csv", "paths": ["$SITE/qm9_part1.csv"], "max_records": 250,
         "records_per_unit": 100}]}))
    cfg = load_job(job)
    assert cfg.output_dir() == tmp_path / "out"
    units = plan_units(cfg)
    assert [(u.items[0].start, u.items[0].stop) for u in units] == [(0, 100), (100, 200), (200, 250)]
    assert [u.prefix for u in units] == ["u000000", "u000001", "u000002"]
    assert units == plan_units(load_job(job)), "the plan depends only on the job and its inputs"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"output": "o", "sources": [
        {"source": "x", "converter": "qm9csv", "paths": [str(qm9_csv(1))], "domain": "protein"}]}))
    with pytest.raises(Exception, match="domain"):
        plan_units(load_job(bad))


def test_grouping_plan_is_pure_and_respects_the_budget(tmp_path):
    sdfs, cifs, truncated = small_files(tmp_path / "small")
    big = package_dir("rdkit") / CDK2
    size = big.stat().st_size
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"output": "out", "sources": [
        {"source": "mols", "paths": [str(tmp_path / "small/mol_*.sdf")], "files_per_unit": 8},
        {"source": "xtals", "paths": [str(tmp_path / "small/xtal_*")], "unit_bytes": 3 * max(
            p.stat().st_size for p in cifs)},
        {"source": "big", "paths": [str(big)], "unit_bytes": size // 3 + 1}]}))
    units = plan_units(load_job(job))
    mols = [u for u in units if u.source == "mols"]
    assert [len(u.items) for u in mols] == [8, 8, 8, 8, 8, 7]
    assert [i.path for u in mols for i in u.items] == [str(p) for p in sdfs], "consecutive, in sorted order"
    xtals = [u for u in units if u.source == "xtals"]
    assert [i.path for u in xtals for i in u.items] == sorted(str(p) for p in [*cifs, truncated])
    budget = 3 * max(p.stat().st_size for p in cifs)
    for u in xtals:
        assert len(u.items) == 1 or sum(Path(i.path).stat().st_size for i in u.items) <= budget
    assert all(i.converter == "auto" and i.start is None for u in mols + xtals for i in u.items), \
        "small files are neither sniffed nor counted in the driver"
    split = [u.items[0] for u in units if u.source == "big"]
    n_records = (big.read_text().count("$$$$\n"))
    assert len(split) == 3 and split[0].start == 0 and split[-1].stop == n_records
    assert all(a.stop == b.start for a, b in zip(split, split[1:], strict=False)) and split[0].converter == "sdf"

    def reversed_map(fn, batches):  # another execution order of the planning tasks, results in batch order
        return list(reversed([fn(b) for b in reversed(batches)]))

    assert plan_units(load_job(job), reversed_map) == units
    assert [u.number for u in units] == list(range(len(units)))


def test_one_and_two_workers_byte_identical_and_rerun_idempotent(ray_session, tmp_path):  # noqa: F811
    sources = [*four_domain_sources(), *small_sources(tmp_path / "small")]
    a = run_job(load_job(write_job(tmp_path, "a", sources)), workers=1, progress=False)
    b = run_job(load_job(write_job(tmp_path, "b", sources)), workers=2, progress=False)
    assert a.ok and b.ok and a.units == b.units > 10
    da, db = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert any(k.startswith("index.zarr/") for k in da) and "manifest.json" in da and "rejects.jsonl" in da
    assert any(k.startswith("_units/") for k in da) and any(k.startswith("pack-") for k in da)
    assert da == db, sorted(k for k in da.keys() | db.keys() if da.get(k) != db.get(k))
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert set(manifest["domains"]) == {"molecule", "protein", "crystal", "md"}
    sizes = [s["n_samples"] for s in manifest["shards"]]
    assert len(sizes) <= 2 * math.ceil(manifest["n_samples"] / 64), sizes  # near the 64-sample target
    assert sum(1 for n in sizes if n < 32) <= 1, sizes  # one short shard at most: the tails are packed
    again = run_job(load_job(write_job(tmp_path, "a", sources)), workers=2, progress=False)
    assert again.ok and again.skipped == again.units
    assert digest(tmp_path / "a") == da
    shard = next((tmp_path / "a").glob("u000002-*.tar"))
    shard.write_bytes(shard.read_bytes()[:-512])  # a damaged shard is detected by checksum and redone
    redo = run_job(load_job(write_job(tmp_path, "a", sources)), workers=2, progress=False)
    assert redo.ok and redo.skipped == redo.units - 1
    assert digest(tmp_path / "a") == da


def test_flag_form_and_stale_units_of_a_changed_job(ray_session, tmp_path, capsys):  # noqa: F811
    sdf = package_dir("rdkit") / CDK2
    out = tmp_path / "flags"
    assert scd(["ingest", "run", "--domain", "molecule", "--input", str(sdf), "--out", str(out),
                "--no-progress", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["accounting"]["sources"]["molecule"] == {"inputs": 47, "accepted": 47, "rejected": 0}
    assert json.loads((out / "manifest.json").read_text())["n_samples"] == 47
    job = write_job(tmp_path, "shrink", [{"source": "qm9", "converter": "qm9csv", "paths": [str(qm9_csv(1))],
                                          "max_records": 300, "records_per_unit": 100}])
    assert scd(["ingest", "run", str(job), "--no-progress", "--set", "writer.max_shard_samples=50"]) == 0
    assert len(list((tmp_path / "shrink" / "_units").glob("u*.json"))) == 3
    write_job(tmp_path, "shrink", [{"source": "qm9", "converter": "qm9csv", "paths": [str(qm9_csv(1))],
                                    "max_records": 150, "records_per_unit": 100}], max_shard_samples=50)
    assert run_job(load_job(job), progress=False).ok
    assert sorted(p.name for p in (tmp_path / "shrink" / "_units").glob("u*.json")) == ["u000000.json",
                                                                                       "u000001.json"]
    assert scd(["shards", "verify", str(tmp_path / "shrink")]) == 0
    assert json.loads((tmp_path / "shrink" / "manifest.json").read_text())["n_samples"] == 150


def test_accounting_per_file_with_rejects_and_a_broken_file_in_a_group(ray_session, tmp_path):  # noqa: F811
    broken_files = [p for p in sorted(BROKEN.glob("*")) if p.suffix in (".xyz", ".sdf", ".pdb", ".cif")]
    broken = {"source": "broken", "converter": "auto", "paths": [str(p) for p in broken_files]}
    sources = [*four_domain_sources(200), broken, *small_sources(tmp_path / "small")]
    res = run_job(load_job(write_job(tmp_path, "acc", sources)), progress=False)
    assert res.ok
    out = tmp_path / "acc"
    manifest = json.loads((out / "manifest.json").read_text())
    summary = json.loads((out / "ingest_summary.json").read_text())
    acc = manifest["accounting"]
    assert summary["accounting"] == acc and summary["failed"] == []
    rows = {(o["source"], f["file"], f["start"]): f for o in outcomes(out) for f in o["files"]}
    # independent record counts: QM9 rows asked for, `$$$$` lines, data_ blocks, one per small SDF file
    assert sum(f["inputs"] for (s, _, _), f in rows.items() if s == "qm9") == 200
    assert sum(f["inputs"] for (s, _, _), f in rows.items() if s == "cdk2") == (
        package_dir("rdkit") / CDK2).read_text().count("$$$$\n") == 47
    mols = {k[1]: f for k, f in rows.items() if k[0] == "mols"}
    assert len(mols) == 47 and all(f["inputs"] == f["accepted"] == 1 for f in mols.values())
    xtals = {Path(k[1]).name: f for k, f in rows.items() if k[0] == "xtals"}
    assert len(xtals) == 25
    for name, f in xtals.items():
        if name.endswith(".cif"):
            blocks = sum(1 for line in (tmp_path / "small" / name).read_text().splitlines()
                         if line.startswith("data_"))
            assert f["inputs"] == blocks and f["domain"] == "crystal", (name, f)
    assert xtals["xtal_1_zz_truncated.cif.gz"] == {**xtals["xtal_1_zz_truncated.cif.gz"], "inputs": 1, "rejected": 1}
    for table in ("sources", "domains"):
        for name, row in acc[table].items():
            assert row["inputs"] == row["accepted"] + row["rejected"], (table, name, row)
        assert sum(r["accepted"] for r in acc[table].values()) == manifest["n_samples"]
    for name, row in acc["sources"].items():
        assert row["accepted"] == manifest["sources"].get(name, {"n_samples": 0})["n_samples"], name
        assert row["inputs"] == sum(f["inputs"] for (s, _, _), f in rows.items() if s == name)
    assert acc["sources"]["mols"] == {"inputs": 47, "accepted": 47, "rejected": 0}
    broken_rows = [f for (s, _, _), f in rows.items() if s == "broken"]
    assert len(broken_rows) == len(broken_files) and acc["sources"]["broken"]["rejected"] > 0
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == acc["total"]["rejected"] == sum(acc["reject_reasons"].values())
    assert all(r["file"] and r["converter"] and r["reason"] and "record" in r for r in rejects)
    trunc = [r for r in rejects if r["file"].endswith("zz_truncated.cif.gz")]
    assert len(trunc) == 1 and trunc[0]["record"] is None and "EOFError" in trunc[0]["reason"], trunc
    group = next(o for o in outcomes(out) if any(f["file"].endswith("zz_truncated.cif.gz") for f in o["files"]))
    assert len(group["files"]) > 1 and group["accepted"] == sum(f["accepted"] for f in group["files"]) > 0
    assert group["rejected"] == 1, "one unreadable file of a grouped unit is one reject; the rest are samples"


def test_failing_unit_retried_then_recorded_others_finish(ray_session, tmp_path, capsys):  # noqa: F811
    job = write_job(tmp_path, "fail", four_domain_sources(300))
    out = tmp_path / "fail"
    out.mkdir()
    (out / "u000001-000000.tar").mkdir()  # the worker cannot clear this unit's leftovers: it raises
    res = run_job(load_job(job), progress=False)
    assert not res.ok and [f["unit"] for f in res.failed] == ["u000001"]
    assert "IsADirectoryError" in res.failed[0]["error"] and "Traceback" in res.failed[0]["error"]
    assert not (out / "manifest.json").exists(), "an incomplete dataset has no manifest"
    assert len(list((out / "_units").glob("u*.json"))) == res.units - 1
    summary = json.loads((out / "ingest_summary.json").read_text())
    assert [f["unit"] for f in summary["failed"]] == ["u000001"]
    assert scd(["ingest", "run", str(job), "--no-progress"]) == 1
    assert "u000001" in capsys.readouterr().out
    (out / "u000001-000000.tar").rmdir()
    res = run_job(load_job(job), progress=False)
    assert res.ok and res.skipped == res.units - 1
    assert scd(["shards", "verify", str(out)]) == 0


def test_output_lock_stale_lock_and_temp_files(ray_session, tmp_path, capsys):  # noqa: F811
    sdf = str(package_dir("rdkit") / CDK2)
    job = write_job(tmp_path, "locked", [{"source": "m", "paths": [sdf]}])
    out = tmp_path / "locked"
    out.mkdir()
    with output_lock(out):
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            run_job(load_job(job), progress=False)
        assert scd(["ingest", "run", str(job), "--no-progress"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and str(out) in err and "\n" not in err, err
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".ingest.lock").write_text(json.dumps({"pid": dead.pid, "host": "h", "started": 0}))
    planted = [out / ".u000000-000000.tar.tmp-99999", out / "_units" / ".u000000.json.tmp-99999",
               out / ".manifest.json.tmp-1"]
    planted[1].parent.mkdir()
    for p in planted:
        p.write_bytes(b"half-written")
    assert run_job(load_job(job), progress=False).ok
    assert f"stale lock of pid {dead.pid}" in capsys.readouterr().err
    assert not [p for p in out.rglob(".*") if p.name != ".ingest.lock"], "temporary files removed"
    assert (out / ".ingest.lock").read_bytes() == b"", "the lock is released"
    assert scd(["shards", "verify", str(out)]) == 0


def _ray_pids(session_pgid: int) -> list[int]:
    """Processes still alive in a killed process group (the driver's embedded Ray included)."""
    out = subprocess.run(["ps", "-eo", "pid=,pgid="], capture_output=True, text=True).stdout.split()
    return [int(p) for p, g in zip(out[::2], out[1::2], strict=True) if int(g) == session_pgid]


@pytest.mark.slow
def test_sigkill_mid_job_then_rerun_is_byte_identical(ray_session, tmp_path):  # noqa: F811
    sources = [*four_domain_sources(3000, per_unit=100), *small_sources(tmp_path / "small", files_per_unit=4)]
    clean = run_job(load_job(write_job(tmp_path, "clean", sources)), progress=False)
    assert clean.ok
    job = write_job(tmp_path, "killed", sources)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "shards", "ingest", "run", str(job), "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env=LOCAL)
    try:
        deadline = time.time() + 300
        while len(list(out.glob("_units/u*.json"))) < 3:
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
    done = len(list(out.glob("_units/u*.json")))
    assert done < clean.units, "killed mid-job"
    res = subprocess.run(cmd[:-3] + ["--no-progress", "--json"], capture_output=True, text=True, env=LOCAL)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["skipped"] >= done
    assert "stale lock" in res.stderr, "the killed job's lock is detected as stale"
    assert digest(tmp_path / "clean") == digest(out), "manifest.json, index.zarr, _units and shards included"
    assert scd(["shards", "verify", str(out)]) == 0


def test_write_errors_without_a_file_name_name_the_path_and_leave_no_temp_files(tmp_path):
    """A write that fails mid-file (here: RLIMIT_FSIZE -> EFBIG, the way a full disk gives ENOSPC) is raised
    with the unit and output folder in its message; the half-written temporary shard is removed."""
    sdf = str(package_dir("rdkit") / CDK2)
    job = write_job(tmp_path, "full", [{"source": "m", "converter": "sdf", "paths": [sdf]}])
    script = f"""
import resource, signal
from pathlib import Path
from ingest.job import load_job, plan_units
from ingest.unit import run_unit
from shards.format.writer import WriterConfig, write_atomic
cfg = load_job({str(job)!r})
unit = plan_units(cfg)[0]
out = cfg.output_dir()
out.mkdir()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (32768, 32768))
for attempt in (lambda: run_unit(unit, str(out), WriterConfig()),
                lambda: write_atomic(out / "big.json", b"x" * 65536)):
    try:
        attempt()
    except OSError as exc:
        print(exc)
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    out = tmp_path / "full"
    assert len(lines) == 2, res.stdout
    assert "File too large" in lines[0] and f"unit u000000 into {out}" in lines[0], lines[0]
    assert "File too large" in lines[1] and str(out / "big.json") in lines[1], lines[1]
    assert not [p.name for p in out.rglob("*") if ".tmp" in p.name], "temporary files removed"


def test_units_in_flight_queue_only_where_ray_cannot_run_more_than_the_workers(ray_session):  # noqa: F811
    """With as many workers as Ray has CPUs (or more), twice the workers are submitted: one unit waits at each
    worker, so none idles for a round trip to the driver between units. With fewer workers than CPUs, exactly the
    workers, since Ray would run any more at once. Without ``workers``: enough to keep every CPU busy and to show
    an autoscaler the demand."""
    from ingest.run import IN_FLIGHT_PER_CPU, MIN_IN_FLIGHT, in_flight_limit

    cpus = int(ray_session.cluster_resources()["CPU"])  # 2 when this fixture started Ray
    assert IN_FLIGHT_PER_CPU == 2
    assert [in_flight_limit(ray_session, w) for w in (cpus, cpus + 1)] == [2 * cpus, 2 * cpus + 2]
    assert [in_flight_limit(ray_session, w) for w in range(1, cpus)] == list(range(1, cpus))
    assert in_flight_limit(ray_session, None) == max(MIN_IN_FLIGHT, 2 * cpus)
