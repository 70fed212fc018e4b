"""What `scd ingest run` tells a user: bad inputs fail before any work and leave no output folder;
the end-of-job table gives the reject reasons in full and points to rejects.jsonl; a job that accepts
nothing is not a success."""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import yaml
from conftest_ray import ray_session  # noqa: F401 - the shared session fixture

from scd_train.datakit import package_dir
from shards.tools.cli import main as scd

MINERALS = "test/testdata/minerals"


def _cifs(root: Path, n: int = 2) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for p in sorted((package_dir("ase") / MINERALS).glob("*.cif"))[:n]:
        out.append(root / p.name)
        shutil.copyfile(p, out[-1])
    return out


def _truncated(root: Path) -> Path:
    src = sorted((package_dir("ase") / MINERALS).glob("*.cif"))[0]
    path = root / "zz_truncated.cif.gz"
    path.write_bytes(gzip.compress(src.read_bytes())[:120])
    return path


def test_missing_named_input_is_an_error_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    rc = scd(["ingest", "run", "--domain", "crystal", "--input", str(tmp_path / "nope.cif"), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert "does not exist" in err[0] and "nope.cif" in err[0]
    assert not out.exists(), "a job that fails its configuration leaves no output folder"


def test_folder_input_says_it_is_a_folder(tmp_path, capsys):
    folder = tmp_path / "cifs"
    _cifs(folder)
    out = tmp_path / "out"
    rc = scd(["ingest", "run", "--domain", "crystal", "--input", str(folder), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert "it is a folder" in err[0] and str(folder / "*.cif") in err[0]
    assert not out.exists()


def test_config_error_inside_the_job_removes_the_new_output_folder(tmp_path, capsys):
    cif = _cifs(tmp_path / "in", 1)[0]
    job = tmp_path / "job.yaml"
    out = tmp_path / "out"
    job.write_text(yaml.safe_dump({"output": str(out), "sources": [
        {"source": "x", "converter": "sdf", "domain": "crystal", "paths": [str(cif)]}]}))
    assert scd(["ingest", "run", str(job), "--no-progress"]) == 1
    assert "is of domain 'molecule', not 'crystal'" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("a user's file")
    assert scd(["ingest", "run", str(job), "--no-progress"]) == 1
    assert (out / "keep.txt").read_text() == "a user's file", "an existing folder is never removed"


def test_table_gives_full_reasons_and_points_to_rejects(ray_session, tmp_path, capsys):  # noqa: F811
    folder = tmp_path / "in"
    _cifs(folder, 2)
    _truncated(folder)
    out = tmp_path / "out"
    assert scd(["ingest", "run", "--domain", "crystal", "--input", str(folder / "*"), "--out", str(out),
                "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "1 records rejected" in text
    reason_line = next(line for line in text.splitlines() if "cannot choose a converter" in line)
    assert "EOFError" in reason_line, "the reason is shown in full, not cut at its first colon"
    assert str(out / "rejects.jsonl") in text


def test_a_job_that_accepts_nothing_fails(ray_session, tmp_path, capsys):  # noqa: F811
    folder = tmp_path / "in"
    folder.mkdir()
    bad = _truncated(folder)
    out = tmp_path / "out"
    assert scd(["ingest", "run", "--domain", "crystal", "--input", str(bad), "--out", str(out),
                "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "none of the 1 input records was accepted" in captured.out
    assert str(out / "rejects.jsonl") in captured.out
