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
from importlib.metadata import version
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
DISORDERED = "Li10GeP2S12.json"  # the one disordered structure among pymatgen's JSON files
CONVERTER_OF = {"cdk2": "sdf", "qm9": "qm9csv", "pymatgen": "pymatgen_json", "majority": "pymatgen_json",
                "broken-md": None, "broken": None}


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
        "majority": (1, 0),  # the disordered structure, taken with its majority species (a converter option)
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
        {"source": "majority", "converter": "pymatgen_json", "options": {"order": "majority"},
         "paths": [str(p) for p in _pymatgen_jsons() if p.name == DISORDERED]},
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
    domains: dict[str, Counter[str]] = {}
    for unit in plan_units(cfg):
        o = run_unit(unit, str(out), cfg.writer).to_dict()
        t = totals.setdefault(unit.source, Counter())
        t.update(inputs=o["inputs"], accepted=o["accepted"], rejected=o["rejected"])
        for row in o["files"]:
            per_file[Path(row["file"]).name] = (row["accepted"], row["rejected"])
            assert row["inputs"] == sum(BROKEN_FILES.get(Path(row["file"]).name, (row["inputs"], 0)))
            assert row["converter"] == (CONVERTER_OF[unit.source] or row["converter"])
            if unit.source == "broken" and row["converter"] != "auto":
                assert row["converter"] == {".sdf": "sdf", ".pdb": "pdb", ".cif": "cif", ".xyz": "xyz"}[
                    Path(row["file"]).suffix]
        if CONVERTER_OF[unit.source]:
            assert o["converters"] == {CONVERTER_OF[unit.source]: f"scd-atoms=={version('scd-atoms')}"}
        reject_records.update(Path(r["file"]).name for r in o["rejects"])
        domains.setdefault(unit.source, Counter()).update(o["domains"])
    want = expected()
    got = {s: (t["accepted"], t["rejected"]) for s, t in totals.items()}
    assert got == want
    assert all(t["inputs"] == sum(want[s]) for s, t in totals.items())
    assert {f: per_file[f] for f in BROKEN_FILES} == BROKEN_FILES
    assert domains["cdk2"] == {"molecule": want["cdk2"][0]} and domains["qm9"] == {"molecule": want["qm9"][0]}
    assert domains["pymatgen"] == {"crystal": want["pymatgen"][0]}
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


def _one_unit(tmp: Path, **writer: int):
    """A one-file job (a copy of cdk2.sdf, 47 records) and its single unit."""
    sdf = tmp / "in" / "cdk2.sdf"
    sdf.parent.mkdir(exist_ok=True)
    shutil.copy(_cdk2(), sdf)
    job = tmp / "one.yaml"
    job.write_text(yaml.safe_dump({"output": str(tmp / "one"), "writer": {"max_shard_samples": 20, **writer},
                                   "sources": [{"source": "cdk2", "converter": "sdf", "paths": [str(sdf)]}]}))
    cfg = load_job(job)
    (unit,) = plan_units(cfg)
    out = tmp / "one"
    out.mkdir(exist_ok=True)
    return cfg, unit, out, sdf


def test_a_finished_unit_is_recognised_until_anything_changes(tmp_path):
    """completed() returns the recorded outcome only while the input, every shard, the tail and the outcome
    file are as recorded: 47 records -> shards of 20 + 20 and a tail of 7 (under half of 20)."""
    import os

    from ingest.unit import TAILS_DIR, completed, outcome_path

    cfg, unit, out, sdf = _one_unit(tmp_path)
    outcome = run_unit(unit, str(out), cfg.writer)
    assert [s.n_samples for s in outcome.shards] == [20, 20] and outcome.tail and outcome.tail.n_samples == 7
    assert samples_in_tars(out, "*.tar")["cdk2"] == 40 and samples_in_tars(out / TAILS_DIR)["cdk2"] == 7
    assert completed(out, unit) == outcome
    tail = out / TAILS_DIR / outcome.tail.name
    data = tail.read_bytes()
    tail.write_bytes(data[:600] + bytes([data[600] ^ 1]) + data[601:])
    assert completed(out, unit) is None, "a damaged tail"
    tail.write_bytes(data)
    assert completed(out, unit) == outcome
    shard = out / outcome.shards[1].name
    shard_bytes = shard.read_bytes()
    shard.write_bytes(shard_bytes[:-512])
    assert completed(out, unit) is None, "a damaged shard"
    shard.write_bytes(shard_bytes)
    index = out / (outcome.shards[0].name + ".idx.json")
    index.rename(index.with_suffix(".bak"))
    assert completed(out, unit) is None, "a missing shard index"
    index.with_suffix(".bak").rename(index)
    assert completed(out, unit) == outcome
    st = sdf.stat()
    os.utime(sdf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert completed(out, unit) is None, "the input changed (mtime)"
    os.utime(sdf, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert completed(out, unit) == outcome
    outcome_path(out, unit.prefix).write_text("{not json")
    assert completed(out, unit) is None
    outcome_path(out, unit.prefix).write_text("[]")
    assert completed(out, unit) is None
    outcome_path(out, unit.prefix).unlink()
    assert completed(out, unit) is None


def test_missing_input_fingerprint_and_leftovers_cleared(tmp_path):
    from ingest.unit import TAILS_DIR, clear_leftovers, outcome_path, unit_fingerprint

    cfg, unit, out, sdf = _one_unit(tmp_path)
    run_unit(unit, str(out), cfg.writer)
    present = unit_fingerprint(unit)
    sdf.rename(sdf.with_suffix(".gone"))
    missing = unit_fingerprint(unit)
    assert missing != present and missing == unit_fingerprint(unit) and len(missing) >= 16
    (out / f".{unit.prefix}-000009.tar.tmp").write_bytes(b"x")
    (out / "u999999-000000.tar").write_bytes(b"another unit's shard")
    clear_leftovers(out, unit.prefix)
    clear_leftovers(out, unit.prefix)  # idempotent
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["u999999-000000.tar"]
    assert not list((out / TAILS_DIR).iterdir()) and not outcome_path(out, unit.prefix).exists()


@pytest.mark.parametrize(("n_bytes", "n_samples", "tail"), [
    (4999, 4, True), (4000, 4, True), (5000, 4, False), (6000, 1, False), (4999, 5, False), (1, 6, False),
    (0, 0, True),
])
def test_tail_is_under_half_the_target_in_bytes_and_samples(n_bytes, n_samples, tail):
    from ingest.unit import is_tail
    from shards.format.writer import ShardInfo, WriterConfig

    cfg = WriterConfig(max_shard_bytes=10_000, max_shard_samples=10)
    assert is_tail(ShardInfo("s.tar", n_samples, n_bytes, "0" * 64, 0), cfg) is tail


def test_per_file_rows_sniff_failures_and_domain_hints(tmp_path):
    """Each file's row in the outcome: a file no converter handles is one reject naming the file; a source's
    domain picks mmCIF (protein) for a .cif file; record ranges of a split file are the unit's."""
    import MDAnalysisTests.datafiles as mda

    (tmp_path / "mystery.dat").write_bytes(b"\x00\x01 not a structure")
    cif = Path(mda.PDB_small).parent / "mmcif" / "1YJP.cif"
    job = tmp_path / "rows.yaml"
    job.write_text(yaml.safe_dump({"output": str(tmp_path / "rows"), "sources": [
        {"source": "mystery", "converter": "auto", "paths": [str(tmp_path / "mystery.dat")]},
        {"source": "hinted", "converter": "auto", "domain": "molecule", "paths": [str(tmp_path / "mystery.dat")]},
        {"source": "protein", "converter": "auto", "domain": "protein", "paths": [str(cif)]},
        {"source": "qm9", "converter": "qm9csv", "paths": [str(qm9_csv(1))], "max_records": 5,
         "records_per_unit": 3}]}))
    cfg = load_job(job)
    (tmp_path / "rows").mkdir()
    outcomes = [run_unit(u, str(tmp_path / "rows"), cfg.writer).to_dict() for u in plan_units(cfg)]
    rows = [row for o in outcomes for row in o["files"]]
    base = {"file": str(tmp_path / "mystery.dat"), "converter": "auto", "start": None, "stop": None,
            "inputs": 1, "accepted": 0, "rejected": 1}
    assert rows[0] == {**base, "file": rows[0]["file"], "domain": "unknown"}
    assert rows[1] == {**base, "file": rows[1]["file"], "domain": "molecule"}
    assert Path(rows[0]["file"]).name == "mystery.dat"
    (reject,) = outcomes[0]["rejects"]
    assert reject == {"file": rows[0]["file"], "record": None, "converter": "auto",
                      "reason": f"cannot choose a converter: no converter handles {tmp_path / 'mystery.dat'}; "
                                "name one with converter: NAME (job file) or --converter NAME"}
    assert (rows[2]["converter"], rows[2]["domain"], rows[2]["inputs"], rows[2]["accepted"]) == \
        ("mmcif", "protein", 1, 1)
    assert [(r["start"], r["stop"], r["inputs"], r["accepted"], r["domain"]) for r in rows[3:]] == \
        [(0, 3, 3, 3, "molecule"), (3, 5, 2, 2, "molecule")]
    assert [o["inputs"] for o in outcomes] == [1, 1, 1, 3, 2]
