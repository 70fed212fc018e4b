"""Ingest without a shared filesystem: inputs listed and read from a bucket (and http), shards uploaded to a
bucket, against a real S3 API (moto's server on 127.0.0.1). A bucket run equals the local run byte for byte,
resumes after damage and after SIGKILL, reports 403 and a missing bucket in one line, never writes a local
folder named ``s3:``, and the result streams into the trainer and through ``scd shards`` like a local one."""
from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest_ray import digest
from s3help import bucket_digest, enforce_auth, moto_s3, read_only_keys, s3fs_for  # noqa: F401 - fixture

from ingest.job import JobConfig, SourceSpec, load_job, plan_units
from ingest.outcome import UnitOutcome
from ingest.run import run_job
from ingest.spool import forget_cached
from ingest.unit import run_unit
from scd_train.datakit import package_dir
from shards.config import ConfigError
from shards.format import storage
from shards.tools.cli import main as scd

BUCKET = "scd-ingest"
CORPUS = f"s3://{BUCKET}/corpus"
CDK2 = "Contrib/Fastcluster/testdata/cdk2.sdf"
REPO = Path(__file__).resolve().parents[1]
JOB = {"output": "out", "writer": {"max_shard_samples": 8}, "sources": [
    {"source": "mols", "converter": "auto", "paths": ["inputs/mol_*.sdf"], "domain": "molecule", "files_per_unit": 4},
    {"source": "xtals", "converter": "auto", "paths": ["inputs/xtal_*"], "files_per_unit": 4},
    {"source": "cdk2", "converter": "sdf", "paths": ["inputs/cdk2.sdf"], "records_per_unit": 15}]}


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch):
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A job folder: 12 one-molecule SDFs, 8 mineral CIFs and a truncated .cif.gz (a reject), and cdk2.sdf
    (47 molecules, split into record ranges); the job file names them relative to the folder."""
    root = tmp_path_factory.mktemp("corpus")
    inputs = root / "inputs"
    inputs.mkdir()
    text = (package_dir("rdkit") / CDK2).read_text()
    for i, block in enumerate([b for b in text.split("$$$$\n") if b.strip()][:12]):
        (inputs / f"mol_{i:02d}.sdf").write_text(block + "$$$$\n")
    minerals = sorted((package_dir("ase") / "test/testdata/minerals").glob("*.cif"))
    for p in minerals:
        shutil.copy(p, inputs / f"xtal_{p.name}")
    (inputs / "xtal_zz_truncated.cif.gz").write_bytes(gzip.compress(minerals[0].read_bytes())[:120])
    shutil.copy(package_dir("rdkit") / CDK2, inputs / "cdk2.sdf")
    (root / "job.yaml").write_text(yaml.safe_dump(JOB))
    return root


@pytest.fixture(scope="module")
def bucket(moto_s3, corpus) -> str:  # noqa: F811 - the fixture imported above
    """The corpus uploaded to ``s3://scd-ingest/corpus``."""
    fs = s3fs_for(moto_s3)
    fs.mkdir(BUCKET)
    fs.put(str(corpus / "inputs"), f"{BUCKET}/corpus/inputs", recursive=True)
    return CORPUS


@pytest.fixture(scope="module")
def ray_s3(moto_s3):  # noqa: F811
    """An embedded Ray whose workers see the S3 endpoint and credentials (started after the moto fixture set
    them; a Ray started earlier by another module is restarted, and this one stopped at the end)."""
    ray = pytest.importorskip("ray")
    from ingest.rayenv import embedded_ray_env

    if ray.is_initialized():
        ray.shutdown()
    embedded_ray_env()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def _remote_job(corpus: Path, out: str) -> JobConfig:
    return dataclasses.replace(load_job(corpus / "job.yaml"), output=out, input_root=CORPUS)


@pytest.fixture(scope="module")
def local_run(ray_s3, corpus) -> Path:
    res = run_job(load_job(corpus / "job.yaml"), progress=False)
    assert res.ok and res.skipped == 0, res.failed
    return corpus / "out"


def _recorded(name: str) -> bool:
    """Unit outcome records: they hold the inputs' fingerprints (mtimes here, ETags in a bucket)."""
    return name.startswith("_units/u") and name.endswith(".json")


def _outcomes(fs, root: str) -> list[str]:
    fs.invalidate_cache()
    return sorted(p for p in fs.find(f"{root}/_units") if _recorded(p[len(root) + 1:]))


def _same_as_local(local: Path, fs, url: str) -> None:
    """Every object equals the local file of the same name, outcome records up to their fingerprints."""
    remote = bucket_digest(fs, url)
    files = {k: v for k, v in digest(local).items() if k != ".ingest.lock"}
    assert sorted(remote) == sorted(files), "the same names"
    assert {k: v for k, v in remote.items() if not _recorded(k)} == {k: v for k, v in files.items()
                                                                     if not _recorded(k)}
    for name in filter(_recorded, files):
        a, b = json.loads((local / name).read_bytes()), json.loads(fs.cat_file(f"{url[5:]}/{name}"))
        assert a.pop("fingerprint") != b.pop("fingerprint") and a == b, name


def test_an_output_url_stays_a_url(tmp_path):
    """``--out s3://b/x`` and ``output: s3://b/x`` are kept verbatim; asking for a local folder is an error, so
    nothing can create ``s3:/b/x`` under the working directory."""
    import argparse

    from ingest.run_cli import job_from_args

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({**JOB, "output": "s3://b/x/"}))
    cfg = load_job(job)
    assert cfg.output_location() == "s3://b/x"
    with pytest.raises(ConfigError, match="s3://b/x is a URL"):
        cfg.output_dir()
    args = argparse.Namespace(job=job, overrides=[], out="gs://b/y", domain=None, input=[])
    assert job_from_args(args).output_location() == "gs://b/y"
    flags = argparse.Namespace(job=None, overrides=[], out="s3://b/z", domain="molecule", source=None,
                               converter="auto", input=["s3://b/in/*.sdf", "local.sdf"])
    cfg = job_from_args(flags)
    assert cfg.output == "s3://b/z" and cfg.sources[0].paths == ("s3://b/in/*.sdf", str(Path("local.sdf").resolve()))


def test_object_names_never_leave_the_prefix():
    from shards.format.sink import ObjectSink, check_name

    for ok in ("u000001-000000.tar", "_units/u000001.json", "_units/tails/u1-000000.tar.idx.json", "index.zarr/c/0"):
        assert check_name(ok) == ok
    for bad in ("../x", "a/../b", "a//b", "/abs", ".hidden", "_units", "a/.b", "", "a b", "x/", "a/%2e%2e"):
        with pytest.raises(storage.FetchError, match="refusing object name"):
            check_name(bad)
    assert check_name("_units", folder=True) == "_units"
    for url in ("https://host/ds", "/local/ds", "file:///local/ds"):
        with pytest.raises(ValueError, match="not an object-storage URL"):
            ObjectSink(url)


def test_unit_outcome_round_trips_and_rejects_broken_records(tmp_path):
    """The typed outcome writes the recorded JSON and reads it back equal; a record whose counts disagree
    or with an unknown key is refused (a re-run then redoes the unit)."""
    spec = SourceSpec(source="m", paths=(str(package_dir("rdkit") / CDK2),), converter="sdf", records_per_unit=20)
    cfg = JobConfig(output=str(tmp_path / "o"), sources=(spec,))
    o = run_unit(plan_units(cfg)[2], str(tmp_path / "o"), cfg.writer)
    recorded = (tmp_path / "o" / "_units" / "u000002.json").read_bytes()
    assert o.to_json() == recorded and UnitOutcome.from_json(recorded) == o
    assert (o.inputs, o.accepted + o.rejected, len(o.files)) == (7, 7, 1) and o.tail is not None
    doc = json.loads(recorded)
    for broken in ({**doc, "accepted": doc["accepted"] + 1}, {**doc, "extra": 1}, {**doc, "shards": [{"name": 1}]},
                   {**doc, "inputs": -1}):
        with pytest.raises(ValueError, match="not a unit outcome"):
            UnitOutcome.from_dict(broken)


def test_remote_plan_names_files_as_the_local_plan(bucket, corpus):
    """Listing the bucket gives the local plan: same file ids, grouping and record ranges; the items carry
    the listed (size, ETag)."""
    local = plan_units(load_job(corpus / "job.yaml"))
    remote = plan_units(_remote_job(corpus, f"s3://{BUCKET}/unused"))
    assert [[(i.file_id, i.converter, i.start, i.stop) for i in u.items] for u in local] == \
        [[(i.file_id, i.converter, i.start, i.stop) for i in u.items] for u in remote]
    assert all(i.path == f"{CORPUS}/{i.file_id}" and i.remote is not None and i.remote[0] == (
        corpus / i.file_id).stat().st_size for u in remote for i in u.items)
    assert [u.items[0].start for u in remote if u.source == "cdk2"] == [0, 15, 30, 45]


@pytest.fixture(scope="module")
def bucket_run(bucket, corpus, ray_s3) -> str:
    """The job with inputs and output in the bucket."""
    out = f"s3://{BUCKET}/out"
    res = run_job(_remote_job(corpus, out), progress=False)
    assert res.ok and res.output == out and res.skipped == 0 and res.units == 10
    return out


@pytest.mark.slow  # Ray start-up and three ingest runs: ~40 s on 2 busy cores
def test_bucket_ingest_equals_local_and_streams(moto_s3, bucket_run, corpus, local_run):  # noqa: F811
    out = bucket_run
    fs = s3fs_for(moto_s3)
    _same_as_local(local_run, fs, out)
    assert not (Path.cwd() / "s3:").exists()
    assert scd(["shards", "verify", out]) == 0
    from shards.format.audit import inspect_dataset

    assert {k: v for k, v in inspect_dataset(out).items() if k != "root"} == \
        {k: v for k, v in inspect_dataset(str(local_run)).items() if k != "root"}
    from scd_train.config import DataConfig
    from scd_train.data import make_stream

    def batches(root: str, **kw):
        return list(itertools.islice(make_stream(DataConfig(datasets=(root,), seed=2, max_atoms=200, **kw)), 4))

    local, remote = batches(str(local_run)), batches(out, cache_dir=str(corpus / "cache"))
    assert [b["keys"] for b in local] == [b["keys"] for b in remote] and local[0]["keys"]
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(local, remote, strict=True) for k in a
               if isinstance(a[k], np.ndarray))


@pytest.mark.slow  # the module's Ray and two ingest runs, then six training steps
def test_trainer_streams_the_bucket_dataset_like_the_local_one(bucket_run, local_run, tmp_path):
    """Three SCD steps from the bucket (through the shard cache) log the same losses as from the folder."""
    from scd_train.config import load_train_config
    from scd_train.trainer import Trainer

    model = {"kind": "scd", "backbone": "et", "preset": "small", "hidden": 16, "layers": 1, "heads": 2, "num_rbf": 8}
    losses = []
    for name, root in (("local", str(local_run)), ("bucket", bucket_run)):
        data = {"datasets": [root], "max_atoms": 400, "seed": 5, "views": {"rotate": True}}
        if name == "bucket":
            data["cache_dir"] = str(tmp_path / "cache")
        cfg = {"run_dir": str(tmp_path / name), "steps": 3, "seed": 5, "log_every": 1, "checkpoint_every": 10_000,
               "tensorboard": False, "progress": False, "data": data, "model": model,
               "optim": {"lr": 1e-3, "warmup_steps": 1}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        Trainer(load_train_config(tmp_path / f"{name}.yaml")).fit()
        rows = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses.append([json.loads(r)["loss"] for r in rows if r.strip()])
    assert len(losses[0]) == 3 and all(np.isfinite(losses[0])) and losses[0] == losses[1]
    assert any((tmp_path / "cache").iterdir()), "shards came through the cache"


@pytest.mark.slow  # Ray start-up and three ingest runs: ~40 s on 2 busy cores
def test_resume_skips_intact_units_and_redoes_damaged_ones(moto_s3, bucket, corpus, local_run, ray_s3):  # noqa: F811
    """A shard replaced by other bytes and a lost outcome: those two units run again, every other one is
    skipped (its uploaded objects still have the recorded sha256), and the bucket equals the local run."""
    out = f"s3://{BUCKET}/resume"
    cfg = _remote_job(corpus, out)
    assert run_job(cfg, progress=False).ok
    fs = s3fs_for(moto_s3)
    outcomes = _outcomes(fs, f"{BUCKET}/resume")
    first = json.loads(fs.cat_file(outcomes[0]))
    assert first["shards"], "the first unit wrote a full shard"
    shard = f"{BUCKET}/resume/{first['shards'][0]['name']}"
    data = fs.cat_file(shard)
    fs.pipe_file(shard, data[:600] + bytes([data[600] ^ 1]) + data[601:])
    fs.rm(outcomes[-1])
    fs.rm(f"{BUCKET}/resume/manifest.json")
    res = run_job(cfg, progress=False)
    assert res.ok and res.skipped == res.units - 2
    _same_as_local(local_run, fs, out)


def test_read_only_credentials_and_missing_bucket_are_one_line_errors(moto_s3, bucket, corpus, tmp_path):  # noqa: F811
    """Through the command line, from a fresh folder: exit 1, one line naming the URL, and no local folder
    named after the URL (``s3:/...``)."""
    keys = read_only_keys(moto_s3)
    cmd = [sys.executable, "-m", "shards", "ingest", "run", str(corpus / "job.yaml"), "--no-progress", "--out"]
    missing = subprocess.run([*cmd, "s3://no-such-bucket/cod"], capture_output=True, text=True, cwd=tmp_path,
                             timeout=300)
    enforce_auth(moto_s3, True)
    try:
        denied = subprocess.run([*cmd, f"s3://{BUCKET}/denied"], capture_output=True, text=True, cwd=tmp_path,
                                timeout=300, env={**os.environ, **keys})
    finally:
        enforce_auth(moto_s3, False)
    for proc, url, words in ((missing, "s3://no-such-bucket/cod", "does not exist"),
                             (denied, f"s3://{BUCKET}/denied", "access denied")):
        err = proc.stderr.strip()
        assert proc.returncode == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert url in err and words in err.lower(), err
    assert not list(tmp_path.iterdir()), "nothing written locally"
    assert not s3fs_for(moto_s3).exists(f"{BUCKET}/denied/manifest.json")


def test_a_config_error_leaves_the_bucket_as_it_was(moto_s3, bucket, corpus):  # noqa: F811
    """Inputs that do not exist: the job stops before any work, removes its driver record and leaves an
    existing dataset (its manifest) in place."""
    fs = s3fs_for(moto_s3)
    fs.pipe_file(f"{BUCKET}/kept/manifest.json", b"{}")
    for out in ("never", "kept"):
        cfg = dataclasses.replace(_remote_job(corpus, f"s3://{BUCKET}/{out}"), input_root=f"s3://{BUCKET}/nothing")
        with pytest.raises(ConfigError, match=f"no files match 's3://{BUCKET}/nothing/inputs/mol_"):
            run_job(cfg, progress=False)
    fs.invalidate_cache()
    assert fs.find(f"{BUCKET}/never") == [] and fs.find(f"{BUCKET}/kept") == [f"{BUCKET}/kept/manifest.json"]


def test_http_inputs_and_the_spool_bound(http_root, corpus, tmp_path, monkeypatch):
    """Inputs served over http give the same units, byte for byte, as the local files; an input over
    ``spool_bytes`` is one reject naming the limit; the spool is empty afterwards; http globs are refused."""
    base, served = http_root
    shutil.copytree(corpus / "inputs", served / "inputs")
    spool = tmp_path / "spool"
    monkeypatch.setenv("SCD_SPOOL_DIR", str(spool))
    mols = SourceSpec(source="mols", paths=tuple(f"inputs/mol_{i:02d}.sdf" for i in range(12)), domain="molecule",
                      files_per_unit=12)
    cdk2 = SourceSpec(source="cdk2", paths=("inputs/cdk2.sdf",), converter="sdf", records_per_unit=15)
    cdk2_big = dataclasses.replace(cdk2, source="cdk2big", unit_bytes=4096)  # larger than a unit: counted via cache
    cfg = dataclasses.replace(load_job(corpus / "job.yaml"), sources=(mols, cdk2))
    remote = dataclasses.replace(cfg, input_root=base)
    remote_units = plan_units(remote)
    split = [u for u in remote_units if u.items[0].split]
    assert len(split) == 4 and all(u.items[0].file_id == "inputs/cdk2.sdf" for u in split)
    assert http_root.gets.count("/inputs/cdk2.sdf") == 1  # the count, in planning, into the node's cache
    counted = dataclasses.replace(remote, sources=(dataclasses.replace(mols, records_per_unit=5),))
    assert not any(u.items[0].split for u in plan_units(counted))  # one record each: counted, never split
    assert len(list((spool / "scd-cache").iterdir())) == 1, "only the file that its count splits stays cached"
    for u_local, u_http in zip(plan_units(cfg), remote_units, strict=True):
        a, b = run_unit(u_local, str(tmp_path / "a"), cfg.writer), run_unit(u_http, str(tmp_path / "b"), cfg.writer)
        assert dataclasses.replace(a, fingerprint="") == dataclasses.replace(b, fingerprint="")
    da, db = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert {k: v for k, v in da.items() if not _recorded(k)} == {k: v for k, v in db.items() if not _recorded(k)}
    assert len(da) > 8
    # the count and the four range units of cdk2.sdf read one cached download; whole files are downloaded by
    # their unit (and by the count of the job that counted them)
    assert http_root.gets.count("/inputs/cdk2.sdf") == 1 and http_root.gets.count("/inputs/mol_00.sdf") == 2
    (entry,) = (spool / "scd-cache").iterdir()
    assert [f.name for f in entry.iterdir()] == ["cdk2.sdf"]
    assert (entry / "cdk2.sdf").read_bytes() == (corpus / "inputs/cdk2.sdf").read_bytes()
    forget_cached((i.path, i.remote) for u in split for i in u.items if i.remote)
    assert not list((spool / "scd-cache").iterdir())
    before = http_root.gets.count("/inputs/cdk2.sdf")
    big = dataclasses.replace(remote, sources=(cdk2_big,))
    for u in plan_units(big):
        run_unit(u, str(tmp_path / "big"), big.writer)
    assert http_root.gets.count("/inputs/cdk2.sdf") == before + 1  # counted and converted from one download
    sizes = {p: (corpus / p).stat().st_size for p in mols.paths}
    limit = sorted(sizes.values())[len(sizes) // 2]
    small = dataclasses.replace(remote, spool_bytes=limit)
    (unit, *_) = plan_units(small)
    o = run_unit(unit, str(tmp_path / "c"), small.writer, small.spool_bytes)
    too_big = sorted(f for f, n in sizes.items() if n > limit)
    assert too_big and len(too_big) < len(sizes) and sorted(r.file for r in o.rejects) == too_big
    assert all(r.record is None and f"spool limit of {limit} bytes" in r.reason for r in o.rejects)
    assert o.accepted == len(sizes) - len(too_big) and o.inputs == len(sizes)
    assert spool.is_dir() and [p.name for p in spool.iterdir()] == ["scd-cache"], "every download removed"
    globbed = dataclasses.replace(remote, sources=(dataclasses.replace(mols, paths=("inputs/mol_*.sdf",)),))
    with pytest.raises(ConfigError, match="http.s. cannot be listed"):
        plan_units(globbed)


@pytest.mark.slow  # Ray start-up and three ingest runs: ~40 s on 2 busy cores
def test_compact_keys_export_report_accept_urls(moto_s3, bucket_run, local_run, tmp_path, capsys):  # noqa: F811
    out = bucket_run
    assert scd(["shards", "compact", out, "--out", f"s3://{BUCKET}/compacted", "--max-shard-samples", "20"]) == 0
    assert scd(["shards", "compact", str(local_run), "--out", str(tmp_path / "compacted"),
                "--max-shard-samples", "20"]) == 0
    fs = s3fs_for(moto_s3)
    local = {k: v for k, v in digest(tmp_path / "compacted").items() if k != "manifest.json"}
    remote = bucket_digest(fs, f"s3://{BUCKET}/compacted")
    assert {k: v for k, v in remote.items() if k != "manifest.json"} == local
    a = json.loads((tmp_path / "compacted" / "manifest.json").read_bytes())
    b = json.loads(fs.cat_file(f"{BUCKET}/compacted/manifest.json"))
    assert a["shards"] == b["shards"] and a["index"] == b["index"] and a["n_samples"] == b["n_samples"]
    assert scd(["shards", "verify", f"s3://{BUCKET}/compacted"]) == 0
    capsys.readouterr()
    assert scd(["shards", "keys", out]) == 0
    remote_keys = capsys.readouterr().out.split()
    assert scd(["shards", "keys", str(local_run)]) == 0
    assert remote_keys == capsys.readouterr().out.split() and len(remote_keys) == b["n_samples"]
    for root, name in ((out, "remote.xyz"), (str(local_run), "local.xyz")):
        assert scd(["shards", "export", root, remote_keys[-1], "--out", str(tmp_path / name)]) == 0
    assert (tmp_path / "remote.xyz").read_bytes() == (tmp_path / "local.xyz").read_bytes()
    assert scd(["shards", "report", out, "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    n_rejects = len((local_run / "rejects.jsonl").read_text().splitlines())
    assert n_rejects and f"{n_rejects} rejected records" in page, "the bucket's rejects.jsonl is read"
    assert (tmp_path / "report" / "rejects.png").is_file()


@pytest.mark.slow
def test_sigkill_then_resume_equals_local(moto_s3, bucket, corpus, local_run, tmp_path):  # noqa: F811
    out = f"s3://{BUCKET}/killed"
    cmd = [sys.executable, "-m", "shards", "ingest", "run", str(corpus / "job.yaml"), "--out", out, "--set",
           f"input_root={CORPUS}", "--workers", "1", "--no-progress"]
    env = {**os.environ, "RAY_ADDRESS": "", "SCD_SPOOL_DIR": str(tmp_path / "spool")}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, env=env)
    fs = s3fs_for(moto_s3)

    def done() -> int:
        return len(_outcomes(fs, f"{BUCKET}/killed"))

    try:
        deadline = time.time() + 300
        while done() < 2:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its embedded Ray (one process group)
        proc.wait()
    finished = done()
    assert not fs.exists(f"{BUCKET}/killed/manifest.json")
    res = subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(res.stdout)
    assert finished <= result["skipped"] < result["units"], "completed units skipped, the rest redone"
    assert "taking over" in res.stderr, "the killed driver's record is reported"
    _same_as_local(local_run, fs, out)
