"""Ingest accounting checked against counts obtained outside the ingest code: the known contents of the
broken-input corpus (written out below), record counts of the data-kit files read with RDKit / pymatgen /
the CSV module, and the samples actually present in the written tar files (counted with ``tarfile``).

The accounting identity inputs = accepted + rejected holds by construction in ``ingest/unit.py``; these
tests check each of the three numbers against the oracle instead."""
from __future__ import annotations

import csv
import itertools
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest_ray import ray_session  # noqa: F401 - the shared session fixture

from ingest.job import load_job, plan_units
from ingest.run import run_job
from ingest.unit import run_unit
from scd_train.datakit import package_dir, qm9_csv

BROKEN = Path(__file__).parent / "data" / "broken"
# broken file -> (accepted, rejected): what each file holds, worked out by reading the files
BROKEN_FILES = {
    "truncated.sdf": (1, 1), "garbage.sdf": (0, 1), "flat_2d.sdf": (0, 1), "zero_atoms.sdf": (0, 1),
    "garbage.pdb": (0, 1), "wrong_suffix.pdb": (0, 1), "unknown_element.pdb": (0, 1),
    "garbage.cif": (0, 1), "empty.cif": (0, 1), "truncated.cif": (0, 1), "disordered.cif": (0, 1),
    "garbage.xyz": (0, 1), "nan_coords.xyz": (1, 2), "zero_atoms.xyz": (0, 1), "unknown_element.xyz": (0, 1),
}
BROKEN_MD = {"mismatch.xtc": ("mdanalysis", 0, 1), "nan_frame.zarr": ("zarr_traj", 3, 1)}
QM9_ROWS = 150


def _cdk2() -> Path:
    return package_dir("rdkit") / "Contrib/Fastcluster/testdata/cdk2.sdf"


def _pymatgen_jsons() -> list[Path]:
    return sorted((package_dir("pymatgen") / "util/structures").glob("*.json"))


def expected() -> dict[str, tuple[int, int]]:
    """source -> (accepted, rejected), from outside the ingest code."""
    from pymatgen.core import Structure
    from rdkit import Chem

    n_cdk2 = sum(1 for _ in Chem.ForwardSDMolSupplier(str(_cdk2()), removeHs=False))
    ordered = [Structure.from_file(p).is_ordered for p in _pymatgen_jsons()]
    with open(qm9_csv(1), newline="") as fh:
        qm9 = sum(1 for _ in itertools.islice(csv.DictReader(fh), QM9_ROWS))
    return {
        "broken": (sum(a for a, _ in BROKEN_FILES.values()), sum(r for _, r in BROKEN_FILES.values())),
        "broken-md": (sum(v[1] for v in BROKEN_MD.values()), sum(v[2] for v in BROKEN_MD.values())),
        "cdk2": (n_cdk2, 0), "qm9": (qm9, 0), "pymatgen": (sum(ordered), len(ordered) - sum(ordered)),
    }


def _job(tmp: Path, name: str) -> Path:
    corpus = tmp / "corpus"
    if not corpus.exists():  # readers may write caches next to their inputs
        shutil.copytree(BROKEN, corpus)
    sources = [
        {"source": "broken", "converter": "auto", "paths": [str(corpus / n) for n in sorted(BROKEN_FILES)],
         "files_per_unit": 4},
        *({"source": "broken-md", "converter": conv, "paths": [str(corpus / n)]}
          for n, (conv, _, _) in sorted(BROKEN_MD.items())),
        {"source": "cdk2", "converter": "sdf", "paths": [str(_cdk2())]},
        {"source": "qm9", "converter": "qm9csv", "paths": [str(qm9_csv(1))], "max_records": QM9_ROWS,
         "records_per_unit": 50},
        {"source": "pymatgen", "converter": "pymatgen_json", "paths": [str(p) for p in _pymatgen_jsons()]},
    ]
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"output": str(tmp / name), "sources": sources,
                                    "writer": {"max_shard_samples": 40}}))
    return path


def samples_in_tars(root: Path, pattern: str = "**/*.tar") -> Counter[str]:
    """Samples per source prefix of their key, counted from the members of the tar files under ``root``."""
    counts: Counter[str] = Counter()
    for tar in sorted(root.glob(pattern)):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.isfile():
                    counts[m.name.rsplit("-", 1)[0]] += 1
    return counts


def test_units_account_for_every_record_against_the_oracle(tmp_path):
    """run_unit on every unit of the plan (no Ray): per source and per broken file, accepted and rejected
    equal the oracle, and the tars written hold exactly the accepted samples."""
    cfg = load_job(_job(tmp_path, "units"))
    out = tmp_path / "units"
    out.mkdir()
    totals: dict[str, Counter[str]] = {}
    per_file: dict[str, tuple[int, int]] = {}
    reject_records: Counter[str] = Counter()
    for unit in plan_units(cfg):
        o = run_unit(unit, str(out), cfg.writer)
        t = totals.setdefault(unit.source, Counter())
        t.update(inputs=o["inputs"], accepted=o["accepted"], rejected=o["rejected"])
        for row in o["files"]:
            per_file[Path(row["file"]).name] = (row["accepted"], row["rejected"])
        reject_records.update(Path(r["file"]).name for r in o["rejects"])
    want = expected()
    got = {s: (t["accepted"], t["rejected"]) for s, t in totals.items()}
    assert got == want
    assert all(t["inputs"] == sum(want[s]) for s, t in totals.items())
    assert {f: per_file[f] for f in BROKEN_FILES} == BROKEN_FILES
    assert {f: reject_records[f] for f in BROKEN_FILES} == {f: r for f, (_, r) in BROKEN_FILES.items()}
    written = samples_in_tars(out)
    assert {s: written[s] for s in want} == {s: a for s, (a, _) in want.items()}


@pytest.mark.slow
def test_ingest_job_accounting_against_the_oracle(ray_session, tmp_path):  # noqa: F811
    """The whole job on Ray: the manifest's accounting per source equals the oracle, rejects.jsonl lists
    each reject once, and the finished dataset's tars hold exactly the accepted samples."""
    res = run_job(load_job(_job(tmp_path, "job")), progress=False)
    assert res.ok, res.failed
    out = tmp_path / "job"
    manifest = json.loads((out / "manifest.json").read_text())
    want = expected()
    acc = manifest["accounting"]["sources"]
    assert {s: (acc[s]["accepted"], acc[s]["rejected"]) for s in want} == want
    assert {s: acc[s]["inputs"] for s in want} == {s: a + r for s, (a, r) in want.items()}
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == sum(r for _, r in want.values())
    dataset = samples_in_tars(out, "*.tar")  # the dataset's shards (unit tails packed into them)
    assert {s: dataset[s] for s in want} == {s: a for s, (a, _) in want.items()}
    assert manifest["n_samples"] == sum(a for a, _ in want.values())
