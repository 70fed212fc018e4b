"""The fast construction paths change no byte: shards of a fixed job are pinned by sha256 (computed before the
fast paths existed), and the trusted constructors used for batches refuse anything the validator would."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ingest.plugin import Reject, safe_convert
from ingest.registry import get_converter
from scd_train.datakit import package_dir
from shards.format.writer import ShardWriter, WriterConfig
from tests.convhelp import mda_data, rdkit_file

# sha256 over every shard and index file plus the reject list of `_fixed_job`, computed on the code before the
# fast paths (commit 4981e61); any change of bytes, sample order, key or reject reason changes it
PINNED = "62a67a7e6c085a6fe45e8e781a051569e3be6c3119d7d280c077a7c1a7580765"
# numpy's AVX-512 kernels of sin and cos round some values differently from its AVX2 and baseline kernels, and
# pymatgen builds a CIF's lattice from its cell lengths and angles with them (cod_1010930: the last bits of two
# cell entries and a position differ). The job is run with those kernels off, so it gives the pinned bytes on any
# x86-64 machine (checked: baseline, AVX2, and AVX-512 with this setting); docs/ingest.md, "Reproducibility".
SAME_ON_EVERY_CPU = {"NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR"}
Z = np.array([8, 1, 1], dtype=np.uint8)  # water's atomic numbers


def _spice(path: Path) -> Path:
    import h5py

    rng = np.random.default_rng(11)
    with h5py.File(path, "w") as h5:
        for g, n in enumerate((3, 5, 4)):
            grp = h5.create_group(f"mol{g}")
            grp["atomic_numbers"] = np.array([8, 1, 1, 6, 7][:n], dtype=np.int16)
            conf = rng.normal(scale=2.0, size=(4, n, 3)).astype(np.float32)
            if g == 1:
                conf[2, 0, 1] = np.nan  # one bad conformation: a reject
            grp["conformations"] = conf
            grp["dft_total_energy"] = rng.normal(-76.0, 1.0, size=4)
            grp["dft_total_gradient"] = rng.normal(scale=0.01, size=(4, n, 3)).astype(np.float32)
            grp["formation_energy"] = rng.normal(size=4)
            grp.create_dataset("smiles", data=["CCO"], dtype=h5py.string_dtype())
            grp.create_dataset("subset", data=["pinned"], dtype=h5py.string_dtype())
    return path


def _ani(path: Path) -> Path:
    import h5py

    rng = np.random.default_rng(12)
    with h5py.File(path, "w") as h5:
        grp = h5.create_group("C1H4")
        grp["atomic_numbers"] = np.array([6, 1, 1, 1, 1], dtype=np.uint8)
        grp["coordinates"] = rng.normal(scale=1.5, size=(6, 5, 3)).astype(np.float32)
        grp["wb97x_dz.energy"] = rng.normal(-40.0, 0.1, size=6)
        grp["wb97x_dz.forces"] = rng.normal(scale=0.02, size=(6, 5, 3)).astype(np.float32)
    return path


def _npz(path: Path, layout: str) -> Path:
    rng = np.random.default_rng(13)
    coords = rng.normal(size=(7, 9, 3))
    coords[3, 4] = np.inf  # a bad frame
    z = np.array([6, 6, 8, 1, 1, 1, 1, 1, 1])
    if layout == "rmd17":
        np.savez(path, nuclear_charges=z, coords=coords, energies=rng.normal(size=7), forces=rng.normal(size=(7, 9, 3)))
    else:
        np.savez_compressed(path, z=z, R=coords, E=rng.normal(size=(7, 1)), F=rng.normal(size=(7, 9, 3)))
    return path


def _parquet(path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(14)
    rows = []
    for i in range(9):
        n = 2 + i % 3
        rows.append({"numbers": [6] + [1] * (n - 1), "pos": rng.normal(size=(n, 3)).tolist(),
                     "energy": float(rng.normal()), "forces": rng.normal(size=(n, 3)).tolist(), "q": i % 2,
                     "gap": float(i) / 3})
    rows[5]["numbers"][0] = 0  # a bad element
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
    return path


def _asedb(path: Path, backend: str) -> Path:
    import ase.db
    from ase.build import bulk, molecule
    from ase.calculators.singlepoint import SinglePointCalculator

    db = ase.db.connect(str(path), type=backend)
    for k, name in enumerate(("H2O", "CH4", "NH3")):
        m = molecule(name)
        m.calc = SinglePointCalculator(m, energy=-10.0 - k, forces=np.full((len(m), 3), 0.1 * k))
        db.write(m, data={"charge": 0, "spin": 1})
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    cu.calc = SinglePointCalculator(cu, energy=-14.5, forces=np.full((4, 3), 0.125),
                                    stress=np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06]))
    db.write(cu)
    if hasattr(db, "close"):
        db.close()
    return path


def _inputs(tmp: Path) -> list[tuple[str, Path, dict]]:
    cifs = sorted((package_dir("ase") / "test/testdata/minerals").glob("cod_*.cif"))[:3]
    parquet_opts = {"columns": {"atomic_numbers": "numbers", "positions": "pos", "energy": "energy",
                                "forces": "forces", "charge": "q"}, "properties": {"gap": "gap"},
                    "property_units": {"gap": "eV"}}
    return [
        ("sdf", rdkit_file("Contrib/Fastcluster/testdata/cdk2.sdf"), {}),
        ("pdb", mda_data() / "nmr_neopetrosiamide.pdb", {"models": "all"}),
        ("mmcif", mda_data() / "mmcif/1YJP.cif", {}),
        *[("cif", p, {}) for p in cifs],
        ("hdf5", _spice(tmp / "spice.hdf5"), {}),
        ("hdf5", _ani(tmp / "ani.h5"), {}),
        ("npz", _npz(tmp / "rmd17.npz", "rmd17"), {}),
        ("npz", _npz(tmp / "md17.npz", "md17"), {}),
        ("parquet", _parquet(tmp / "table.parquet"), parquet_opts),
        ("ase_db", _asedb(tmp / "rows.db", "db"), {}),
        ("ase_db", _asedb(tmp / "rows.aselmdb", "aselmdb"), {}),
    ]


def _fixed_job(tmp: Path) -> tuple[str, dict[str, str]]:
    """Convert every input with its converter into one writer (small shards); the digest of all files + rejects."""
    out = tmp / "out"
    rejects = []
    with ShardWriter(out, "pin", WriterConfig(max_shard_bytes=64 * 1024, max_shard_samples=11)) as w:
        for name, path, opts in _inputs(tmp):
            conv = get_converter(name)()
            for item in safe_convert(conv, path, conv.parse_options(opts), source=f"pin-{name}", file_id=path.name):
                if isinstance(item, Reject):
                    rejects.append([item.file, item.record, item.converter, item.reason])
                else:
                    w.add(item)
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}
    doc = json.dumps({"files": files, "rejects": rejects}, sort_keys=True).encode()
    return hashlib.sha256(doc).hexdigest(), files


def test_fixed_job_shards_are_byte_identical_to_the_pinned_digest(tmp_path) -> None:
    code = ("import json, sys; from pathlib import Path; from tests.test_fastpath import _fixed_job; "
            "digest, files = _fixed_job(Path(sys.argv[1])); print(json.dumps([digest, len(files)]))")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=Path(__file__).parent.parent,
                         env={**os.environ, **SAME_ON_EVERY_CPU}, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    digest, files = json.loads(run.stdout.strip().splitlines()[-1])
    assert files >= 10  # several shards and their indices, so the pin covers shard boundaries too
    assert digest == PINNED, f"shard bytes, order, keys or reject reasons changed: {digest}"


if __name__ == "__main__":  # print the digest (to pin it: run with SAME_ON_EVERY_CPU in the environment)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        print(_fixed_job(Path(d)))


@pytest.mark.parametrize("name,size", [("a.scd", 0), ("k" * 96 + ".scd", 1), ("x-1.scd", 511), ("x.scd", 512),
                                       ("y.scd", 8 ** 11 - 1), ("p" * 60 + "/" + "z" * 60 + ".scd", 77)])
def test_tar_header_is_the_header_tarfile_writes(name, size) -> None:
    import tarfile

    from shards.format.writer import tar_header

    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    assert tar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


def test_singular_cell_is_the_determinant_rule_near_the_threshold() -> None:
    """Periodic cells are refused when abs(det) < 1e-6; the fast decision agrees with np.linalg.det on cells
    far from, near and at the threshold, ill-conditioned ones, and non-finite ones."""
    from shards.format.validate import singular_cell

    rng = np.random.default_rng(9)
    cells = [np.eye(3) * 5.0, np.zeros((3, 3)), np.diag([1e-2, 1e-2, 1e-2]), np.diag([1e-2, 1e-2, 1.0001e-2]),
             np.diag([1e-2, 1e-2, 0.9999e-2]), np.diag([1e5, 1e5, 1e-16]), np.full((3, 3), np.nan)]
    for _ in range(3000):
        base = rng.normal(size=(3, 3)) * rng.choice([1e-3, 1.0, 1e4])
        base[2] = base[0] * rng.uniform(0.5, 2) + base[1] * rng.normal() + rng.normal(size=3) * rng.choice(
            [0.0, 1e-12, 1e-9, 1e-6, 1e-3])  # nearly dependent rows: determinants around the threshold
        cells.append(base)
    got = [singular_cell(c) for c in cells]
    expected = [bool(abs(np.linalg.det(c)) < 1e-6) for c in cells]
    assert got == expected
    assert 100 < sum(got) < len(got) - 100  # both outcomes well represented


def test_meta_json_writes_what_json_dumps_writes() -> None:
    import json

    from shards.format.codec import meta_json

    rng = np.random.default_rng(4)
    values = [0, -1, 2 ** 70, 1.0, -0.0, 1e-5, 1e16, 1.5e300, 5e-324, 0.1 + 0.2, "", "plain",
              "é\u2603\U0001f600\"\\\n\t\x00", {"b": 1.0, "a": 2.5}, {}, {"unit": "eV/Å"}, True, None,
              np.float64(1.25), [1, 2], {1: 2.0}, {"nested": {"x": 1}}]
    metas = [{}] + [{f"k{j}\u00e9": values[int(i)] for j, i in enumerate(rng.integers(0, len(values), size=k))}
                    for k in rng.integers(1, 8, size=300)]
    for meta in metas:
        assert meta_json(meta) == json.dumps(meta, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    for bad in ({"e": float("nan")}, {"e": float("inf")}, {"p": {"x": -float("inf")}}):
        with pytest.raises(ValueError):
            meta_json(bad)


def test_numpy_integer_index_is_stored_as_an_int() -> None:
    """A record index given as a numpy integer is accepted and encoded like the same plain int (it used to pass
    validation and then fail in the codec's JSON header)."""
    from shards.format.codec import decode, encode
    from shards.format.schema import NO_PBC, ZERO_CELL, AtomGraph

    common = {"key": "k", "domain": "molecule", "source": "s", "source_file": "f", "atomic_numbers": Z,
              "positions": np.zeros((3, 3), dtype=np.float32), "cell": ZERO_CELL, "pbc": NO_PBC}
    g = AtomGraph(index=np.int64(7), **common)
    assert type(g.index) is int and encode(g) == encode(AtomGraph(index=7, **common))
    assert decode(encode(g)).index == 7


def test_atom_graph_signature_is_the_schema() -> None:
    """AtomGraph's hand-written constructor (fields stored in one step) takes exactly the schema's fields, in
    order, the optional ones defaulting to None, and a validated copy still works."""
    import dataclasses
    import inspect

    from shards.format.schema import FIELDS, AtomGraph

    params = list(inspect.signature(AtomGraph.__init__).parameters.values())[1:]
    assert [p.name for p in params] == [f.name for f in FIELDS] == [f.name for f in dataclasses.fields(AtomGraph)]
    assert all((p.default is inspect.Parameter.empty) == f.required for p, f in zip(params, FIELDS, strict=True))
    assert all(p.default is None for p in params if p.default is not inspect.Parameter.empty)
    g = AtomGraph(key="k", domain="molecule", source="s", source_file="f", index=0, atomic_numbers=Z,
                  positions=np.zeros((3, 3)), cell=np.zeros((3, 3)), pbc=np.zeros(3, dtype=bool), energy=1)
    assert g.energy == 1.0 and type(g.energy) is float and g.replace(energy=2.5).energy == 2.5


@pytest.mark.parametrize("props,ok", [({"a": 1e308, "b": 1e308}, True), ({"a": 1.0, "b": float("nan")}, False),
                                      ({"a": float("inf"), "b": -float("inf")}, False), ({"a": 1}, True),
                                      ({"": 1.0}, False), ({}, True)])
def test_properties_check_by_sum_agrees_with_the_value_by_value_rule(props, ok) -> None:
    from shards.format.schema import AtomGraph, SchemaError

    make = dict(key="k", domain="molecule", source="s", source_file="f", index=0, atomic_numbers=Z,
                positions=np.zeros((3, 3)), cell=np.zeros((3, 3)), pbc=np.zeros(3, dtype=bool))
    if ok:
        g = AtomGraph(**make, properties=props)
        assert g.properties == {k: float(v) for k, v in props.items()}
        assert all(type(v) is float for v in g.properties.values())
    else:
        with pytest.raises(SchemaError):
            AtomGraph(**make, properties=props)


def test_spice_group_whose_conformations_are_a_link_is_one_reject(tmp_path) -> None:
    """The group listing reads shapes through low-level handles; a conformations dataset that is a soft link is
    not followed: the group is one reject naming the link, the other groups are samples."""
    import h5py

    path = _spice(tmp_path / "linked.hdf5")
    with h5py.File(path, "a") as h5:
        grp = h5.create_group("mol9")
        grp["atomic_numbers"] = np.array([8, 1, 1], dtype=np.int16)
        grp["conformations"] = h5py.SoftLink("/mol0/conformations")
    conv = get_converter("hdf5")()
    items = list(safe_convert(conv, path, conv.parse_options({}), source="s", file_id="linked.hdf5"))
    rejects = [i for i in items if isinstance(i, Reject)]
    assert len(items) == 13 and len([i for i in items if not isinstance(i, Reject)]) == 11
    assert rejects[-1].record == 12 and "conformations is a soft or external link" in rejects[-1].reason


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("config", [WriterConfig(), WriterConfig(max_shard_samples=3),
                                    WriterConfig(max_shard_bytes=6000)], ids=["one", "by-samples", "by-bytes"])
def test_copying_stored_members_writes_what_adding_each_sample_writes(real_graphs, tmp_path, config) -> None:
    """Compaction and tail packing copy runs of stored tar members in one piece (``add_stored``); the shards and
    indices are the bytes that re-adding every sample writes, whatever the shard limits, also when a member is
    not laid out as our writer lays it out (another header: that sample is re-added on its own)."""
    from shards.format.manifest import read_shard_index
    from shards.format.writer import TAR_BLOCK

    with ShardWriter(tmp_path / "src", prefix="s") as w:
        for g in real_graphs:
            w.add(g)
    assert len(w.shards) == 1
    src = tmp_path / "src" / w.shards[0].name
    data = bytearray(src.read_bytes())
    index = read_shard_index(src)
    head = index["offset"][2] - TAR_BLOCK  # the third member gets a nonzero mtime: still a valid tar member
    data[head + 136:head + 148] = b"%011o\0" % 7
    data[head + 148:head + 156] = b" " * 8
    data[head + 148:head + 155] = b"%06o\0" % sum(data[head:head + TAR_BLOCK])
    rows = list(zip(*(index[k] for k in ("key", "offset", "size", "n_atoms", "domain", "source", "trajectory",
                                         "checksum")), strict=True))
    for name, stored in (("plain", bytes(src.read_bytes())), ("odd", bytes(data))):
        with ShardWriter(tmp_path / f"each-{name}", prefix="c", config=config) as each:
            for key, off, size, n_atoms, domain, source, traj, _ in rows:
                each.add_encoded(key, stored[off:off + size], n_atoms=n_atoms, domain=domain, source=source,
                                 trajectory=traj)
        with ShardWriter(tmp_path / f"runs-{name}", prefix="c", config=config) as runs:
            runs.add_stored(stored, rows[:4])
            runs.add_stored(stored, rows[4:])
        assert _shards(tmp_path / f"runs-{name}") == _shards(tmp_path / f"each-{name}")
        assert [s.sha256 for s in runs.shards] == [s.sha256 for s in each.shards]
    assert len(each.shards) > (1 if config != WriterConfig() else 0)
