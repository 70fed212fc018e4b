"""The fast construction paths change no byte: shards of a fixed job are pinned by sha256 (computed before the
fast paths existed), and the trusted constructors used for batches refuse anything the validator would."""
from __future__ import annotations

import hashlib
import json
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
    digest, files = _fixed_job(tmp_path)
    assert len(files) >= 10  # several shards and their indices, so the pin covers shard boundaries too
    assert digest == PINNED, f"shard bytes, order, keys or reject reasons changed: {digest}"


if __name__ == "__main__":  # print the digest (to pin it)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        print(_fixed_job(Path(d)))


# --- the trusted construction path of FrameStack ------------------------------------------------------------

Z = np.array([8, 1, 1], dtype=np.uint8)


def _block(rows: list, writeable: bool = False) -> np.ndarray:
    arr = np.ascontiguousarray(np.array(rows, dtype=np.float32).reshape(len(rows), 3, 3))
    arr.flags.writeable = writeable
    return arr


def _outcome(make, *args, **kwargs):
    """('graph', encoded bytes) or ('error', field, reason) of one construction."""
    from shards.format.codec import encode
    from shards.format.schema import SchemaError

    try:
        return ("graph", encode(make(*args, **kwargs)))
    except SchemaError as exc:
        return ("error", exc.field, exc.reason)


def _frames() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    pos = rng.normal(size=(12, 3, 3)).tolist()
    frc = rng.normal(size=(12, 3, 3)).tolist()
    pos[1][0][0] = float("nan")
    pos[2][2][1] = float("inf")
    pos[3][1][2] = 3e19  # finite, but its squares overflow float32: refused like NaN
    frc[4][0][0] = float("nan")
    frc[5][2][2] = -float("inf")
    return _block(pos), _block(frc)


# per frame: (key, index, with_forces, scalars); hostile values in some of them
FRAME_ARGS = [
    ("ok-0", 0, True, {"energy": -1.5}),
    ("ok-1", 1, True, {"energy": 2.0}),
    ("ok-2", 2, True, {}),
    ("ok-3", 3, True, {}),
    ("ok-4", 4, True, {}),
    ("ok-5", 5, False, {}),  # NaN-free without its bad forces row: a sample
    ("bad.key", 6, True, {"energy": 1.0}),
    ("ok-7", -7, True, {}),
    ("ok-8", 8, True, {"energy": np.float32(0.5), "charge": np.int64(-1), "spin": 2}),
    ("ok-9", 9, True, {"energy": float("nan")}),
    ("ok-10", 10, True, {"properties": {"gap": 1.0, "bad": float("inf")}, "property_units": {"gap": "eV"}}),
    ("ok-11", 11, True, {"properties": {"gap": 1}, "property_units": {"lumo": "eV"}, "spin": 0}),
]


@pytest.mark.parametrize("common,shared_ok", [
    ({"atomic_numbers": Z}, True),
    ({"atomic_numbers": np.array([8, 1, 1]), "trajectory_id": "traj"}, True),  # int64, writeable: coerced once
    ({"atomic_numbers": np.array([8, 0, 1], dtype=np.uint8)}, False),  # a shared bad element: every frame refused
    ({"atomic_numbers": Z, "cell": np.eye(3) * 0.0, "pbc": np.array([True, False, False])}, False),  # singular
    ({"atomic_numbers": Z, "cell": np.eye(3) * 5.0, "pbc": np.ones(3, dtype=bool)}, True),
    ({"atomic_numbers": Z, "domain": "Bad Domain"}, False),
    ({"atomic_numbers": Z, "trajectory_id": ""}, False),
], ids=["plain", "coerced", "bad-element", "singular-cell", "periodic", "bad-domain", "bad-trajectory"])
def test_frame_stack_accepts_and_refuses_exactly_as_the_validator(common, shared_ok) -> None:
    """Every frame built from a stack is the same sample (same bytes), or the same refusal (same field and
    reason), as ``AtomGraph(...)`` built from the frame's own arrays."""
    from shards.format.frames import FrameStack
    from shards.format.schema import NO_PBC, ZERO_CELL, AtomGraph

    pos, frc = _frames()
    full = {"domain": "molecule", "source": "s", "source_file": "f", "cell": ZERO_CELL, "pbc": NO_PBC, **common}
    stack = FrameStack(full, pos, frc)
    outcomes = []
    for i, (key, index, with_forces, scalars) in enumerate(FRAME_ARGS):
        fast = _outcome(stack.graph, i, key=key, index=index, with_forces=with_forces, **scalars)
        slow = _outcome(AtomGraph, key=key, index=index, positions=pos[i].copy(),
                        forces=frc[i].copy() if with_forces else None, **full, **scalars)
        assert fast == slow, (i, fast, slow)
        outcomes.append(fast[0])
    if shared_ok:  # by hand: frames 1-3 bad positions, 4 bad forces (5 drops its bad forces), 6 key, 7 index,
        # 9 energy, 10 a property, 11 spin
        assert outcomes == ["graph", "error", "error", "error", "error", "graph", "error", "error", "graph",
                            "error", "error", "error"]
    else:
        assert set(outcomes) == {"error"}


def test_frame_stack_builds_valid_frames_without_the_per_record_validator(monkeypatch) -> None:
    """The block checks replace the per-record validator for good frames only; a bad frame and an untrusted
    block (writeable, so the frame's arrays would be copied) still go through it."""
    import shards.format.schema as schema
    from shards.format.frames import FrameStack
    from shards.format.schema import NO_PBC, ZERO_CELL

    calls = []
    real = schema.validate_graph
    monkeypatch.setattr(schema, "validate_graph", lambda g, *a: (calls.append(g.key), real(g, *a)))
    pos, frc = _frames()
    common = {"domain": "molecule", "source": "s", "source_file": "f", "atomic_numbers": Z, "cell": ZERO_CELL,
              "pbc": NO_PBC}
    stack = FrameStack(common, pos, frc)
    assert calls == ["probe"]  # the shared fields, once
    g = stack.graph(0, key="k0", index=0, energy=1.0)
    assert calls == ["probe"] and np.shares_memory(g.positions, pos) and not g.positions.flags.writeable
    with pytest.raises(schema.SchemaError):
        stack.graph(1, key="k1", index=1)
    assert calls == ["probe", "k1"]
    loose = FrameStack(common, _block(pos.tolist(), writeable=True), frc)
    g2 = loose.graph(0, key="k0", index=0, energy=1.0)
    assert calls[-1] == "k0" and not np.shares_memory(g2.positions, pos) and g2.equals(g)
    with pytest.raises(TypeError):
        FrameStack({**common, "bonds": np.zeros((0, 2))}, pos)  # only graph-level fields are shared
    with pytest.raises(TypeError):
        stack.graph(0, key="k0", index=0, positions=pos[1])  # a frame cannot swap its arrays
    with pytest.raises(TypeError):
        FrameStack({**common, "charge": 0}, pos).graph(0, key="k0", index=0, charge=1)  # nor what frames share


def test_finite_rows_is_the_validators_rule_on_every_row() -> None:
    from shards.format.frames import finite_rows

    rng = np.random.default_rng(5)
    scale = np.sqrt(np.finfo(np.float32).max / 9)  # sums of squares around the float32 limit
    rows = (rng.uniform(0.3, 1.6, size=(4000, 3, 3)) * scale).astype(np.float32)
    rows[::7, 0, 0] = np.nan
    rows[::11, 1, 1] = -np.inf
    rows[::13] = rng.normal(size=(3, 3))
    rows.flags.writeable = False
    expected = [np.isfinite(np.vdot(r, r)) for r in rows]  # the validator's test, row by row
    got = finite_rows(rows).tolist()
    assert got == expected and 0 < sum(got) < len(got)


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


def test_frame_stack_graphs_build_what_the_validator_builds() -> None:
    """``FrameStack.graphs`` (one loop per block, block labels) gives, frame by frame, the same sample (same bytes)
    or the same refusal (same field and reason) as ``AtomGraph(...)`` with the frame's own arrays and labels."""
    from shards.format.frames import FrameStack
    from shards.format.schema import NO_PBC, ZERO_CELL, AtomGraph, SchemaError

    pos, frc = _frames()
    n = len(pos)
    energy = [1.5, None, 2.0, 3.0, 4.0, 5.0, 6.0, float("inf"), 7.0, float("nan"), 8.0, 9.0]
    gap = [0.1, 0.2, None, 0.3, 0.4, 0.5, 0.6, 0.7, float("-inf"), 0.9, "one", 1.1]
    keys = [f"ok-{i}" for i in range(n)]
    keys[6] = "bad.key"
    with_forces = [True] * n
    with_forces[5] = False  # frame 5's forces are NaN: without them it is a sample
    common = {"domain": "molecule", "source": "s", "source_file": "f", "atomic_numbers": Z, "cell": ZERO_CELL,
              "pbc": NO_PBC, "trajectory_id": "t"}
    stack = FrameStack(common, pos, frc, energy=energy, properties={"gap": gap, "lumo": [None] * n},
                       property_units={"gap": "eV", "lumo": "eV"})
    got = list(stack.graphs(keys, 40, lambda r, exc: (r, exc), with_forces=with_forces))
    outcomes = []
    for i, item in enumerate(got):
        props = {"gap": gap[i]} if gap[i] is not None else None
        slow = _outcome(AtomGraph, key=keys[i], index=40 + i, positions=pos[i].copy(),
                        forces=frc[i].copy() if with_forces[i] else None, energy=energy[i], properties=props,
                        property_units=props and {"gap": "eV"}, **common)
        if isinstance(item, AtomGraph):
            from shards.format.codec import encode

            fast = ("graph", encode(item))
        else:
            assert item[0] == 40 + i and isinstance(item[1], SchemaError)
            fast = ("error", item[1].field, item[1].reason)
        assert fast == slow, (i, fast, slow)
        outcomes.append(fast[0])
    # by hand: 1-3 bad positions, 4 bad forces, 6 key, 7 energy inf, 8 gap -inf, 9 energy NaN, 10 gap not a number
    assert outcomes == ["graph", "error", "error", "error", "error", "graph", "error", "error", "error", "error",
                        "error", "graph"]


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


def test_frame_stack_graphs_with_file_keys() -> None:
    """Given a file's ``FileKeys``, ``graphs`` makes the block's keys itself and checks them once: the same items as
    with the key list, and a source whose keys cannot match the key pattern refuses every frame by its key."""
    from shards.format.codec import encode
    from shards.format.frames import FrameStack
    from shards.format.schema import NO_PBC, ZERO_CELL, AtomGraph, FileKeys, SchemaError

    pos, frc = _frames()
    common = {"domain": "molecule", "source": "s", "source_file": "f", "atomic_numbers": Z, "cell": ZERO_CELL,
              "pbc": NO_PBC}
    stack = FrameStack(common, pos, frc, energy=[1.0] * len(pos))
    keys = FileKeys("s", "f")
    assert keys.valid and not FileKeys("_s", "f").valid
    listed = list(stack.graphs(keys.many(range(7, 7 + len(pos))), 7, lambda r, exc: (r, str(exc))))
    made = list(stack.graphs(keys, 7, lambda r, exc: (r, str(exc))))
    assert [encode(g) if isinstance(g, AtomGraph) else g for g in listed] == \
        [encode(g) if isinstance(g, AtomGraph) else g for g in made]
    assert sum(isinstance(g, AtomGraph) for g in made) == 7  # frames 1-5 have bad rows
    refused = list(stack.graphs(FileKeys("_s", "f"), 7, lambda r, exc: exc))
    assert len(refused) == len(pos) and all(isinstance(e, SchemaError) and e.field == "key" for e in refused)
