"""Shards: bit-exact round trips, byte-identical rewrites, interop with tar and webdataset, http,
fetch by key, and clear errors on every kind of corruption."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from shards.format.audit import verify_dataset
from shards.format.codec import CodecError, decode, encode
from shards.format.manifest import write_dataset
from shards.format.reader import ShardDataset, ShardError
from shards.format.schema import AtomGraph, SchemaVersionError
from shards.format.writer import ShardWriter, WriterConfig

SMALL = WriterConfig(max_shard_bytes=64 * 1024, max_shard_samples=40)


def _rich(g: AtomGraph) -> AtomGraph:
    """Add every optional field so that round trips cover the whole schema."""
    n = g.n_atoms
    rng = np.random.default_rng(g.index)
    return g.replace(charge=-1, spin=2, energy=-123.456789, forces=rng.normal(size=(n, 3)),
                     properties={"homo": -6.5, "gap": 7.25}, property_units={"homo": "eV", "gap": "eV"},
                     bonds=np.array([[0, n - 1]]), bond_order=[1.5], residue_index=np.arange(n),
                     residue_name=np.full(n, b"ALA"), chain=np.full(n, b"B"), atom_name=np.full(n, b"CA"),
                     hetero=np.arange(n) % 2 == 0, trajectory_id="traj-7", frame_time=2.5)


def _dataset(graphs, root: Path) -> dict:
    return write_dataset(graphs, root, config=SMALL)


def test_codec_round_trip_bit_exact(real_graphs):
    for g in list(real_graphs) + [_rich(g) for g in real_graphs[:5]]:
        data = encode(g)
        back = decode(data)
        assert back.equals(g), g.key
        assert encode(back) == data


def test_codec_rejects_garbage_and_truncation(real_graphs):
    data = encode(real_graphs[0])
    with pytest.raises(CodecError):
        decode(data[: len(data) // 2])
    with pytest.raises(CodecError, match="magic"):
        decode(b"XXXX" + data[4:])
    with pytest.raises(SchemaVersionError):
        decode(data[:4] + (9).to_bytes(2, "little") + data[6:])
    with pytest.raises(CodecError):
        decode(bytes(range(256)) * 4)


def test_dataset_round_trip_and_fetch_by_key(real_graphs, tmp_path):
    graphs = list(real_graphs)
    manifest = _dataset(graphs, tmp_path / "ds")
    assert manifest["n_samples"] == len(graphs) and len(manifest["shards"]) > 2
    ds = ShardDataset(str(tmp_path / "ds"))
    back = list(ds)
    assert len(back) == len(graphs) and all(a.equals(b) for a, b in zip(graphs, back, strict=True))
    for g in (graphs[0], graphs[len(graphs) // 2], graphs[-1]):
        assert ds.get(g.key).equals(g)
    with pytest.raises(KeyError):
        ds.get("no-such-key")
    counts = manifest["domains"]
    assert counts["protein"]["n_samples"] == 1 and counts["protein"]["max_atoms"] == 3341
    assert sum(v["n_samples"] for v in counts.values()) == len(graphs)


def test_rewrite_is_byte_identical(real_graphs, tmp_path):
    _dataset(real_graphs, tmp_path / "a")
    _dataset(real_graphs, tmp_path / "b")

    def digest(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    a, b = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert a == b and any(k.startswith("index.zarr") for k in a)


def test_plain_tar_and_webdataset_read_our_shards(real_graphs, tmp_path):
    import webdataset as wds

    graphs = list(real_graphs[:60])
    _dataset(graphs, tmp_path / "ds")
    shards = sorted(str(p) for p in (tmp_path / "ds").glob("*.tar"))
    listed = []
    for s in shards:
        out = subprocess.run(["tar", "tf", s], capture_output=True, text=True, check=True).stdout.split()
        listed += out
    assert listed == [f"{g.key}.scd" for g in graphs]
    with tarfile.open(shards[0]) as tar:
        m = tar.getmembers()[0]
        assert (m.mtime, m.uid, m.gid, m.mode) == (0, 0, 0, 0o644)
    pipeline = wds.WebDataset(shards, shardshuffle=False).map(lambda s: decode(s["scd"]))
    back = list(pipeline)
    assert [g.key for g in back] == [g.key for g in graphs]
    assert all(a.equals(b) for a, b in zip(graphs, back, strict=True))


def test_http_reading(real_graphs, http_root):
    base, folder = http_root
    graphs = list(real_graphs[:50])
    _dataset(graphs, folder / "ds")
    ds = ShardDataset(f"{base}/ds")
    assert [g.key for g in ds] == [g.key for g in graphs]
    assert ds.get(graphs[33].key).equals(graphs[33])
    with pytest.raises(FileNotFoundError, match="not a shard dataset"):
        ShardDataset(f"{base}/missing")


def test_writer_abort_leaves_no_shard(real_graphs, tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, config=SMALL) as w:
        for g in real_graphs[:50]:
            w.add(g)
        raise RuntimeError("crash mid-shard")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert not any(".tmp" in n for n in names)
    tars = [n for n in names if n.endswith(".tar")]
    assert all((tmp_path / (t + ".idx.json")).exists() for t in tars)
    with pytest.raises(ValueError, match="duplicate sample key"), ShardWriter(tmp_path / "dup") as w:
        w.add(real_graphs[0])
        w.add(real_graphs[0])


@pytest.fixture()
def sound(real_graphs, tmp_path) -> Path:
    root = tmp_path / "ds"
    _dataset(real_graphs[:80], root)
    assert verify_dataset(str(root)).ok
    return root


def _run_verify(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shards", "shards", "verify", str(root)],
                          capture_output=True, text=True)


def test_verify_cli_ok(sound):
    res = _run_verify(sound)
    assert res.returncode == 0, res.stderr
    assert "80 samples verified: OK" in res.stdout


def test_truncated_shard_detected(sound):
    shard = sound / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    res = _run_verify(sound)
    assert res.returncode == 1 and "shard-000001.tar" in res.stderr and "Traceback" not in res.stderr
    with pytest.raises(ShardError, match="shard-000001.tar.*truncated"):
        list(ShardDataset(str(sound)).iter_shard("shard-000001.tar"))


def test_flipped_byte_detected(sound):
    shard = sound / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    res = _run_verify(sound)
    assert res.returncode == 1 and "shard-000000.tar: sha256 does not match" in res.stderr


def test_missing_index_detected(sound):
    (sound / "shard-000001.tar.idx.json").unlink()
    res = _run_verify(sound)
    assert res.returncode == 1 and "missing index for shard shard-000001.tar" in res.stderr


def test_index_tar_disagreement_detected(sound):
    ipath = sound / "shard-000000.tar.idx.json"
    doc = json.loads(ipath.read_text())
    doc["offset"][1] += 512
    ipath.write_text(json.dumps(doc))
    res = _run_verify(sound)
    assert res.returncode == 1 and "shard-000000.tar" in res.stderr and "disagree" in res.stderr


def test_unknown_schema_version_refused(sound):
    mpath = sound / "manifest.json"
    doc = json.loads(mpath.read_text())
    doc["schema_version"] = "2.0"
    mpath.write_text(json.dumps(doc))
    res = _run_verify(sound)
    assert res.returncode == 1 and "manifest.json: schema version 2.0 is not supported" in res.stderr
    assert "Traceback" not in res.stderr


def test_missing_dataset_is_clear(tmp_path):
    res = _run_verify(tmp_path / "nothing")
    assert res.returncode == 1 and "not a shard dataset" in res.stderr


def test_export_formats_open_in_ase_and_pymatgen(real_graphs, tmp_path):
    import ase.io
    from pymatgen.core import Structure

    root = tmp_path / "ds"
    _dataset(real_graphs, root)
    mol = real_graphs[3]
    crystal = next(g for g in real_graphs if g.domain == "crystal")
    protein = next(g for g in real_graphs if g.domain == "protein")
    for g, fmt in ((mol, "extxyz"), (crystal, "cif"), (protein, "pdb"), (crystal, "extxyz")):
        out = tmp_path / f"{g.key}.{fmt}"
        res = subprocess.run([sys.executable, "-m", "shards", "shards", "export", str(root), g.key,
                              "--format", fmt, "--out", str(out)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        atoms = ase.io.read(out, format={"pdb": "proteindatabank"}.get(fmt, fmt))
        assert list(atoms.numbers) == g.atomic_numbers.tolist()
        np.testing.assert_allclose(atoms.positions, g.positions, atol=2e-3)
    s = Structure.from_file(tmp_path / f"{crystal.key}.cif")
    assert len(s) == crystal.n_atoms
    res = subprocess.run([sys.executable, "-m", "shards", "shards", "export", str(root), mol.key,
                          "--format", "cif"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 1 and "not periodic" in res.stderr


def test_inspect_json(sound):
    res = subprocess.run([sys.executable, "-m", "shards", "shards", "inspect", str(sound), "--json"],
                         capture_output=True, text=True, check=True)
    info = json.loads(res.stdout)
    assert info["samples"] == 80 and info["domains"]["molecule"]["samples"] == 80
    assert info["atoms"]["min_atoms"] <= info["atoms"]["median_atoms"] <= info["atoms"]["max_atoms"]
