"""Ingest accounts samples under the domain they carry, as the manifest does: a converter whose options fix
the domain (``xyz`` with ``domain: md``) or leave it to each record (``ase_db`` with ``domain: auto``) is
counted by its samples' domains, not by its class's. The expected domains come from the job (what the
options ask for) and from reading the inputs with ASE; the counts from the manifest and the tar files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest_ray import ray_session  # noqa: F401 - the shared session fixture

from ingest.job import load_job, plan_units
from ingest.run import run_job
from ingest.unit import run_unit
from scd_train.datakit import package_dir
from shards.format.reader import ShardDataset


def _xyz() -> Path:
    """A multi-frame XYZ trajectory of the data kit (MDAnalysisTests)."""
    return package_dir("MDAnalysisTests") / "data" / "coordinates" / "test.xyz"


def _inputs(tmp: Path) -> tuple[Path, Path, int, int]:
    """The XYZ trajectory (with one garbage stretch appended: one reject) and an ASE DB of g2 molecules."""
    import ase.db
    import ase.io
    from ase.collections import g2

    n_frames = len(ase.io.read(_xyz(), index=":"))
    xyz = tmp / "traj.xyz"
    shutil.copy(_xyz(), xyz)
    with open(xyz, "a") as fh:
        fh.write("not a count line\n")
    db = tmp / "g2.db"
    molecules = [a for a in list(g2)[:12] if not a.pbc.any()]
    with ase.db.connect(str(db), append=False) as con:
        for atoms in molecules:
            con.write(atoms)
    return xyz, db, n_frames, len(molecules)


def _job(tmp: Path, xyz: Path, db: Path, name: str) -> Path:
    job = {"output": str(tmp / name), "sources": [
        {"source": "frames", "converter": "xyz", "domain": "md", "paths": [str(xyz)], "options": {"domain": "md"}},
        {"source": "g2db", "converter": "ase_db", "paths": [str(db)], "options": {"domain": "auto"}}]}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_file_rows_carry_the_domain_of_their_samples(tmp_path):
    """Per unit (no Ray): each file row's domain is the domain the options asked for, every sample has it,
    and the XYZ garbage stretch is rejected under ``md``."""
    xyz, db, n_frames, n_mols = _inputs(tmp_path)
    cfg = load_job(_job(tmp_path, xyz, db, "units"))  # a source declaring domain md accepts xyz with domain md
    out = tmp_path / "units"
    out.mkdir()
    rows, domains = {}, {}
    for unit in plan_units(cfg):
        o = run_unit(unit, str(out), cfg.writer)
        domains[unit.source] = dict(o.domains)
        rows.update({unit.source: [(f.domain, f.accepted, f.rejected) for f in o.files]})
    assert domains == {"frames": {"md": n_frames}, "g2db": {"molecule": n_mols}}
    assert rows["frames"] == [("md", n_frames, 1)]


def test_auto_picks_the_converter_whose_options_make_the_declared_domain(tmp_path):
    """``converter: auto`` with ``domain: md`` and ``options: {domain: md}`` picks xyz for a .xyz trajectory (its
    class domain is molecule; its options make md); without those options the error names the claimant."""
    from ingest.registry import converter_for

    xyz, _, n_frames, _ = _inputs(tmp_path)
    job = {"output": str(tmp_path / "auto"), "sources": [
        {"source": "frames", "domain": "md", "paths": [str(xyz)], "options": {"domain": "md"}}]}
    (tmp_path / "auto.yaml").write_text(yaml.safe_dump(job))
    cfg = load_job(tmp_path / "auto.yaml")
    (tmp_path / "auto").mkdir()
    outcomes = [run_unit(u, str(tmp_path / "auto"), cfg.writer) for u in plan_units(cfg)]
    assert [(f.converter, f.domain, f.accepted, f.rejected) for o in outcomes for f in o.files] == \
        [("xyz", "md", n_frames, 1)]
    with pytest.raises(KeyError, match=r"no converter of domain 'md' handles .*; claimed by xyz \(domain molecule\);"):
        converter_for(xyz, "md")


@pytest.mark.slow
def test_ingest_summary_domains_match_the_manifest(ray_session, tmp_path):  # noqa: F811
    """The whole job: ``ingest_summary.json`` and the manifest count the same samples per domain, and those
    are the samples in the shards (read back)."""
    xyz, db, n_frames, n_mols = _inputs(tmp_path)
    res = run_job(load_job(_job(tmp_path, xyz, db, "job")), progress=False)
    assert res.ok, res.failed
    out = tmp_path / "job"
    summary = json.loads((out / "ingest_summary.json").read_text())["accounting"]["domains"]
    manifest = json.loads((out / "manifest.json").read_text())
    read_back: dict[str, int] = {}
    for g in ShardDataset(str(out)):
        read_back[g.domain] = read_back.get(g.domain, 0) + 1
    assert read_back == {"md": n_frames, "molecule": n_mols}
    assert {d: r["accepted"] for d, r in summary.items() if r["accepted"]} == read_back
    assert {d: m["n_samples"] for d, m in manifest["domains"].items()} == read_back
    assert summary["md"] == {"inputs": n_frames + 1, "accepted": n_frames, "rejected": 1}
    assert manifest["accounting"]["domains"] == summary
