"""`scd shards report DIR --out DIR2` on an ingested four-domain dataset with rejects: PNGs and one HTML page."""
from __future__ import annotations

import json
from pathlib import Path

from conftest_ray import ray_session  # noqa: F401 - the shared session fixture
from test_ingest_job import BROKEN, four_domain_sources, write_job

from ingest.job import load_job
from ingest.run import run_job
from shards.tools.cli import main as scd

PNG = b"\x89PNG\r\n\x1a\n"


def test_report_of_an_ingested_dataset_with_rejects(ray_session, tmp_path, capsys):  # noqa: F811
    broken = {"source": "broken", "converter": "auto",
              "paths": [str(p) for p in sorted(BROKEN.glob("*")) if p.suffix in (".xyz", ".sdf", ".pdb", ".cif")]}
    res = run_job(load_job(write_job(tmp_path, "ds", [*four_domain_sources(200), broken])), progress=False)
    assert res.ok and res.accounting["total"]["rejected"] > 0
    out = tmp_path / "report"
    assert scd(["shards", "report", str(tmp_path / "ds"), "--out", str(out)]) == 0
    page = Path(capsys.readouterr().out.strip())
    assert page == out / "index.html"
    pngs = {"domains.png", "sources.png", "atoms_per_sample.png", "elements.png", "rejects.png"}
    assert pngs <= {p.name for p in out.iterdir()}
    for name in pngs:
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    text = page.read_text()
    for name in pngs:
        assert f"src='{name}'" in text
    for name in ("molecule", "protein", "crystal", "md", "qm9", "adk-md", "broken"):
        assert f"<td>{name}</td>" in text, name
    rejected = sum(1 for _ in (tmp_path / "ds" / "rejects.jsonl").read_text().splitlines())
    assert f"{rejected} rejected records" in text
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert f"{manifest['n_samples']} samples" in text
