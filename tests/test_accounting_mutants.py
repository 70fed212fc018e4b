"""Unit accounting: a source's domain restricts the converter sniffing, and the outcome names its unit."""
from __future__ import annotations

import json

import yaml

from ingest.job import load_job, plan_units
from ingest.unit import completed, run_unit
from scd_train.datakit import qm9_csv


def _units(tmp_path, sources):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"output": str(tmp_path / "out"), "sources": sources}))
    cfg = load_job(job)
    (tmp_path / "out").mkdir()
    return cfg, plan_units(cfg)


def test_source_domain_restricts_the_sniffed_converter(tmp_path):
    """The same QM9 file is accepted when sniffed freely and is one reject when its source says protein."""
    csv = qm9_csv(1)
    cfg, units = _units(tmp_path, [
        {"source": "free", "converter": "auto", "paths": [str(csv)], "max_records": 2},
        {"source": "wrong", "converter": "auto", "domain": "protein", "paths": [str(csv)], "max_records": 2}])
    *free, wrong = [run_unit(u, str(tmp_path / "out"), cfg.writer).to_dict() for u in units]
    assert [o["source"] for o in free] == ["free"] * len(free) and wrong["source"] == "wrong"
    assert sum(o["accepted"] for o in free) == 2 and all(o["files"][0]["converter"] == "qm9csv" for o in free)
    assert (wrong["inputs"], wrong["accepted"], wrong["rejected"]) == (1, 0, 1)
    (reject,) = wrong["rejects"]
    assert reject["converter"] == "auto" and reject["record"] is None
    assert reject["reason"] == (f"cannot choose a converter: no converter of domain 'protein' handles {csv}; "
                                "claimed by qm9csv (domain molecule); "
                                "name one with converter: NAME (job file) or --converter NAME")


def test_outcome_names_its_unit_and_is_the_recorded_file(tmp_path):
    cfg, units = _units(tmp_path, [{"source": "qm9", "converter": "qm9csv", "paths": [str(qm9_csv(1))],
                                    "max_records": 4, "records_per_unit": 2}])
    out = tmp_path / "out"
    outcomes = [run_unit(u, str(out), cfg.writer) for u in units]
    assert [o.unit for o in outcomes] == [u.prefix for u in units]
    assert len({u.prefix for u in units}) == 2
    for u, o in zip(units, outcomes, strict=True):
        recorded = json.loads((out / "_units" / f"{u.prefix}.json").read_text())
        assert recorded == o.to_dict() and recorded["unit"] == u.prefix and recorded["source"] == "qm9"
        assert completed(out, u) == o
