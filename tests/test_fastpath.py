"""The fast construction paths change no byte: shards of a fixed job are pinned by sha256 (computed before the
fast paths existed), and the trusted constructors used for batches refuse anything the validator would."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

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
