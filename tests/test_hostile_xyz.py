"""Hostile XYZ files from real G2 frames: each bad frame is one reject with its record index, nothing is dropped."""
from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pytest
import yaml

from ingest.registry import get_converter
from shards.format.schema import AtomGraph
from tests.convhelp import convert
from tests.hostilehelp import accounted, g2_frames, hostile_xyz

# ---------------------------------------------------------------- XYZ: a bad frame costs that frame only

@pytest.mark.parametrize("gz", [False, True])
def test_xyz_bad_frames_are_one_reject_each(tmp_path: Path, gz: bool) -> None:
    data, bad, positions = hostile_xyz()
    path = tmp_path / ("frames.xyz.gz" if gz else "frames.xyz")
    path.write_bytes(gzip.compress(data) if gz else data)
    samples, rejects = convert("xyz", path)
    by_index = accounted(samples, rejects, len(positions))
    assert {r.record: r.reason for r in rejects} == bad
    for i, item in by_index.items():
        if i not in bad:
            assert isinstance(item, AtomGraph)
            np.testing.assert_allclose(item.positions, positions[i], atol=1e-5)
    conv = get_converter("xyz")()
    assert conv.count_records(path, conv.parse_options({})) == len(positions)


def test_xyz_record_ranges_cover_the_file_once(tmp_path: Path) -> None:
    data, bad, positions = hostile_xyz()
    path = tmp_path / "frames.xyz"
    path.write_bytes(data)
    seen: list[int] = []
    for rng in (range(0, 4), range(4, 8), range(8, 12), range(12, 14)):
        samples, rejects = convert("xyz", path, records=rng)
        beyond = [r.record for r in rejects if r.reason == "record beyond the end of the file"]
        assert beyond == [r for r in rng if r >= len(positions)]
        seen += [g.index for g in samples] + [r.record for r in rejects if r.record not in beyond]
        assert {r.record for r in rejects if r.record in bad} == {i for i in bad if i in rng}
    assert sorted(seen) == list(range(len(positions)))


def test_xyz_without_any_frame_is_one_file_reject(tmp_path: Path) -> None:
    path = tmp_path / "junk.xyz"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not a molecule at all\n")
    samples, (rej,) = convert("xyz", path)
    assert not samples and rej.record is None and rej.reason.startswith("no XYZ frame in the file")


def test_xyz_accounting_in_a_planned_job_counts_records(tmp_path: Path) -> None:
    """Through the job planner and units (split into record ranges): per-file inputs equal the file's records."""
    from ingest.job import load_job, plan_units
    from ingest.unit import run_unit
    from shards.format.writer import WriterConfig

    data, bad, positions = hostile_xyz()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.xyz").write_bytes(data)
    (tmp_path / "in" / "b.xyz").write_bytes(b"".join(t for t, _ in g2_frames(5)))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"output": "out", "sources": [
        {"source": "x", "converter": "xyz", "paths": [str(tmp_path / "in" / "*.xyz")], "records_per_unit": 5}]}))
    cfg = load_job(job)
    (tmp_path / "out").mkdir()
    rows = [row for unit in plan_units(cfg)
            for row in run_unit(unit, str(tmp_path / "out"), WriterConfig()).to_dict()["files"]]
    per_file: dict[str, list[int]] = {}
    for row in rows:
        acc = per_file.setdefault(Path(row["file"]).name, [0, 0, 0])
        acc[0] += row["inputs"]
        acc[1] += row["accepted"]
        acc[2] += row["rejected"]
    assert per_file["a.xyz"] == [len(positions), len(positions) - len(bad), len(bad)]
    assert per_file["b.xyz"] == [5, 5, 0]


@pytest.mark.parametrize("stride", [1, 2])
def test_xyz_trajectory_bad_frames_are_one_reject_each(tmp_path: Path, stride: int) -> None:
    """ase_traj reads multi-frame XYZ with the same records: record r is file record r * stride."""
    data, bad, positions = hostile_xyz()
    path = tmp_path / "traj.xyz.gz"
    path.write_bytes(gzip.compress(data))
    samples, rejects = convert("ase_traj", path, {"stride": stride})
    chosen = list(range(0, len(positions), stride))
    by_index = accounted(samples, rejects, len(chosen))
    assert {r.record: r.reason for r in rejects} == {k // stride: why for k, why in bad.items() if k % stride == 0}
    for r, item in by_index.items():
        if isinstance(item, AtomGraph):
            np.testing.assert_allclose(item.positions, positions[chosen[r]], atol=1e-5)
            assert item.properties["frame"] == chosen[r]


def test_xyz_absurd_atom_count_is_one_reject(tmp_path: Path) -> None:
    frames = g2_frames(3)
    path = tmp_path / "absurd.xyz"
    first = frames[0][0].split(b"\n", 1)
    path.write_bytes(b"9999999999\n" + first[1] + frames[1][0] + frames[2][0])
    samples, (rej,) = convert("xyz", path)
    assert [g.index for g in samples] == [1, 2] and rej.record == 0
    assert rej.reason.startswith("the atom-count line says 9999999999 atoms, more than a sample may hold")


def test_xyz_blank_lines_and_vec_lattices_do_not_end_the_file(tmp_path: Path) -> None:
    """ASE's own reader stops at the first blank line; every frame after it is still a record here."""
    frames = g2_frames(4)
    vec = b"VEC1 6.0 0.0 0.0\nVEC2 0.0 7.0 0.0\nVEC3 0.0 0.0 8.0\n"
    path = tmp_path / "gaps.xyz"
    path.write_bytes(frames[0][0] + vec + b"\n\n" + frames[1][0] + b"\n" + frames[2][0] + b"   \n" + frames[3][0])
    samples, rejects = convert("xyz", path)
    by_index = accounted(samples, rejects, 4)
    assert not rejects
    assert np.allclose(by_index[0].cell, np.diag([6.0, 7.0, 8.0])) and by_index[0].pbc.all()
    for i, g in by_index.items():
        np.testing.assert_allclose(g.positions, frames[i][1], atol=1e-5)


def test_real_molecules_as_xyz_are_all_accepted(tmp_path: Path) -> None:
    import ase.io
    from ase.collections import g2, s22

    mols = [*g2, *s22]
    buf = io.StringIO()
    for atoms in mols:
        ase.io.write(buf, atoms, format="extxyz")
    path = tmp_path / "g2_s22.xyz.gz"
    path.write_bytes(gzip.compress(buf.getvalue().encode()))
    samples, rejects = convert("xyz", path)
    assert not rejects and len(samples) == len(mols) == 162 + 22
    for g, atoms in zip(samples, mols, strict=True):
        assert g.atomic_numbers.tolist() == atoms.numbers.tolist()
