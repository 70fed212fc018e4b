"""Container converters together: options, one item per record, the documented job sources, a split and resumed job.

Files come from :mod:`tests.containerfiles`."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest_ray import digest, ray_session  # noqa: F401 - the shared Ray session fixture

from ingest.plugin import Reject
from ingest.registry import get_converter
from tests.containerfiles import (
    PARQUET_OPTIONS,
    count_records,
    write_db,
    write_parquet,
    write_rmd17,
    write_spice,
)
from tests.convhelp import convert


def test_converters_reject_unknown_options() -> None:
    from shards.config import ConfigError

    for name, bad in (("hdf5", {"layout": "qm7"}), ("npz", {"energy_unit": "furlong"}),
                      ("parquet", {"columns": {"numbers": "z"}}), ("ase_db", {"colour": 1})):
        conv = get_converter(name)()
        with pytest.raises(ConfigError):
            conv.parse_options(bad)


def test_every_record_is_one_item(tmp_path) -> None:
    """Across all four formats, full conversions yield exactly count_records items, none twice."""
    cases = [("hdf5", write_spice(tmp_path / "s.hdf5"), {}), ("npz", write_rmd17(tmp_path / "r.npz"), {}),
             ("parquet", write_parquet(tmp_path / "p.parquet"), PARQUET_OPTIONS)]
    write_db(tmp_path / "d.aselmdb", "aselmdb")
    cases.append(("ase_db", tmp_path / "d.aselmdb", {}))
    for name, path, opts in cases:
        graphs, rejects = convert(name, path, opts)
        idx = [g.index for g in graphs] + [r.record for r in rejects if isinstance(r, Reject)]
        assert sorted(idx) == list(range(count_records(name, path, opts))), name


def test_documented_job_sources_are_valid() -> None:
    """The job sources in docs/converters.md's container section name real converters and valid options."""
    import re

    import yaml

    from ingest.job import SourceSpec
    from ingest.registry import discover
    from shards.config import from_dict

    text = (Path(__file__).parent.parent / "docs" / "converters.md").read_text()
    section = text[text.index("## Container formats"):]
    blocks = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    seen = set()
    for block in blocks:
        for raw in yaml.safe_load(block)["sources"]:
            spec = from_dict(SourceSpec, raw, where="docs")
            if spec.converter == "auto":
                claim = [c for c in discover().values() if any(spec.paths[0].lower().endswith(s) for s in c.suffixes)]
                assert len(claim) == 1, spec.paths
                conv = claim[0]()
            else:
                conv = get_converter(spec.converter)()
            conv.parse_options(spec.options)
            seen.add(conv.name)
    assert seen == {"ase_db", "hdf5", "npz", "parquet"}


@pytest.mark.slow
def test_ingest_job_splits_containers_and_resumes_byte_identical(ray_session, tmp_path) -> None:  # noqa: F811
    """A job over the four formats split into record ranges; a re-run after losing half the unit outcomes
    redoes exactly those units and writes the same bytes."""
    import json

    import yaml

    from ingest.job import load_job
    from ingest.run import run_job

    data = tmp_path / "data"
    data.mkdir()
    write_spice(data / "spice.hdf5")
    write_rmd17(data / "rmd17.npz")
    write_parquet(data / "hub.parquet")
    write_db(data / "omat.aselmdb", "aselmdb")
    sources = [{"source": "spice", "converter": "auto", "paths": [str(data / "spice.hdf5")], "records_per_unit": 2},
               {"source": "rmd17", "converter": "auto", "paths": [str(data / "rmd17.npz")], "records_per_unit": 3},
               {"source": "hub", "converter": "parquet", "paths": [str(data / "hub.parquet")], "records_per_unit": 4,
                "options": PARQUET_OPTIONS},
               {"source": "omat", "converter": "auto", "paths": [str(data / "omat.aselmdb")], "records_per_unit": 2}]
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"output": str(tmp_path / "out"), "sources": sources,
                                   "writer": {"max_shard_samples": 4}}))
    first = run_job(load_job(job), workers=2, progress=False)
    assert first.ok and first.units == 3 + 2 + 3 + 2  # 5 conformations, 4 frames, 10 rows, 3 rows
    total = first.accounting["total"]
    assert total["inputs"] == 5 + 4 + 10 + 3 and total["rejected"] == 3  # the three bad Parquet rows
    out = tmp_path / "out"
    before = digest(out)
    lost = sorted((out / "_units").glob("u*.json"))[::2]
    for p in lost:
        p.unlink()
    (out / "manifest.json").unlink()
    again = run_job(load_job(job), workers=1, progress=False)
    assert again.ok and again.skipped == again.units - len(lost)
    assert digest(out) == before
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["record"] for r in rejects) == [4, 5, 6]
