"""Container converters: ASE DB (SQLite, aselmdb), HDF5 (SPICE, ANI-1x), NPZ (rMD17, MD17), Parquet.

Files are written here in the published layouts with the real libraries (ase, ase-db-backends, h5py, numpy,
pyarrow); expected values in eV / Å are computed by hand and written out (1 Ha = 27.211386245988 eV,
1 bohr = 0.529177210903 Å, 1 kcal/mol = 4.184 / 96.48533212 eV).
"""
from __future__ import annotations

import os
import pickle
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest_ray import digest, ray_session  # noqa: F401 - the shared Ray session fixture

from ingest.plugin import Reject
from ingest.registry import converter_for, get_converter
from tests.convhelp import convert

BOHR = 0.529177210903  # Å
HA_PER_BOHR = 51.422067476325886  # eV/Å
HA = 27.211386245988  # eV
KCAL = 4.184 / 96.48533212331  # eV: thermochemical kcal over the Faraday constant in J/(mol V)


def _count(name: str, path: Path, options: dict | None = None) -> int | None:
    conv = get_converter(name)()
    return conv.count_records(path, conv.parse_options(options or {}))


def _same(a, b) -> bool:
    return len(a) == len(b) and all(x.equals(y) for x, y in zip(a, b, strict=True))


class Boom:
    """Unpickling this creates a marker file: proof that a converter unpickled something."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


# --- HDF5 -------------------------------------------------------------------------------------------------


def _spice(path: Path) -> Path:
    import h5py

    water = np.array([[[0.0, 0.0, 0.0], [1.8, 0.0, 0.0], [0.0, 1.8, 0.0]],
                      [[0.0, 0.0, 0.1], [1.8, 0.0, 0.1], [0.0, 1.8, 0.1]]], dtype=np.float32)  # bohr
    with h5py.File(path, "w") as h5:
        g = h5.create_group("water")
        g["atomic_numbers"] = np.array([8, 1, 1], dtype=np.int16)
        g["conformations"] = water
        g["dft_total_energy"] = np.array([-76.4, -76.3])
        grad = np.zeros((2, 3, 3), dtype=np.float32)
        grad[0, 1, 0] = 0.01  # Ha/bohr on H1 along x
        grad[1, 2, 1] = -0.02
        g["dft_total_gradient"] = grad
        g["formation_energy"] = np.array([-0.5, 0.25])
        g.create_dataset("smiles", data=["[H:2][O:1][H:3]"], dtype=h5py.string_dtype())
        g.create_dataset("subset", data=["SPICE Water Clusters v1.0"], dtype=h5py.string_dtype())
        a = h5.create_group("ammonium")
        a["atomic_numbers"] = np.array([7, 1, 1, 1, 1], dtype=np.int16)
        a["conformations"] = np.arange(3 * 5 * 3, dtype=np.float32).reshape(3, 5, 3) * 0.5
        a["dft_total_energy"] = np.array([-56.5, -56.4, -56.3])
        a["dft_total_gradient"] = np.zeros((3, 5, 3), dtype=np.float32)
        a["formation_energy"] = np.array([0.1, 0.2, 0.3])
        a.create_dataset("smiles", data=["[NH4+]"], dtype=h5py.string_dtype())
        a.create_dataset("subset", data=["SPICE PubChem Set 1 Single Points Dataset v1.2"], dtype=h5py.string_dtype())
    return path


def test_spice_layout_bohr_hartree_gradients_and_charge(tmp_path) -> None:
    path = _spice(tmp_path / "SPICE-test.hdf5")
    assert converter_for(path).name == "hdf5"
    assert _count("hdf5", path) == 5
    graphs, rejects = convert("hdf5", path)
    assert not rejects and [g.index for g in graphs] == [0, 1, 2, 3, 4]
    # groups in link (name) order: ammonium (3 conformations), then water (2)
    assert [g.trajectory_id for g in graphs] == ["ammonium"] * 3 + ["water"] * 2
    nh4, w0, w1 = graphs[0], graphs[3], graphs[4]
    assert nh4.charge == 1 and w0.charge == 0 and nh4.atomic_numbers.tolist() == [7, 1, 1, 1, 1]
    np.testing.assert_allclose(w0.positions, [[0, 0, 0], [0.9525189796254, 0, 0], [0, 0.9525189796254, 0]],
                               atol=1e-6)
    np.testing.assert_allclose(nh4.positions[1], [1.5 * BOHR, 2.0 * BOHR, 2.5 * BOHR], rtol=1e-6)
    assert w0.energy == pytest.approx(-2078.949909193483, rel=1e-12)
    assert w1.energy == pytest.approx(-2076.228770568884, rel=1e-12)
    assert nh4.energy == pytest.approx(-1537.4433228983219, rel=1e-12)
    expected = np.zeros((3, 3))
    expected[1, 0] = -0.514220674763259  # gradient 0.01 Ha/bohr -> force -0.514 eV/Å
    np.testing.assert_allclose(w0.forces, expected, atol=1e-6)
    assert w1.forces[2, 1] == pytest.approx(1.028441349526518, rel=1e-6)
    assert w0.properties == {"formation_energy": pytest.approx(-13.605693122994)}
    assert w1.properties["formation_energy"] == pytest.approx(6.802846561497)
    assert w0.property_units == {"formation_energy": "eV"}
    assert all(g.domain == "molecule" and not g.pbc.any() for g in graphs)


def _ani1x(path: Path) -> Path:
    import h5py

    with h5py.File(path, "w") as h5:
        g = h5.create_group("C1H4")
        g["atomic_numbers"] = np.array([6, 1, 1, 1, 1], dtype=np.uint8)
        coords = np.zeros((2, 5, 3), dtype=np.float32)
        coords[:, 1:, 0] = [1.09, -1.09, 0.0, 0.0]
        coords[:, 1:, 1] = [0.0, 0.0, 1.09, -1.09]
        coords[1] += 0.25
        g["coordinates"] = coords  # Å
        g["wb97x_dz.energy"] = np.array([-40.0, -39.9])
        forces = np.zeros((2, 5, 3), dtype=np.float32)
        forces[0, 0, 2] = 0.05  # Ha/Å
        g["wb97x_dz.forces"] = forces
        g["ccsd(t)_cbs.energy"] = np.array([np.nan, -40.1])  # computed for a subset only
        g["wb97x_tz.energy"] = np.array([-40.2, np.nan])
        g["wb97x_tz.forces"] = np.full((2, 5, 3), np.nan, dtype=np.float32)
        g["wb97x_dz.dipole"] = np.zeros((2, 3))
    return path


def test_ani1x_layout_hartree_per_angstrom_no_sign_flip(tmp_path) -> None:
    path = _ani1x(tmp_path / "ani1x-release.h5")
    assert converter_for(path).name == "hdf5"
    graphs, rejects = convert("hdf5", path)
    assert not rejects and len(graphs) == 2
    g0, g1 = graphs
    assert g0.trajectory_id == "C1H4" and g0.atomic_numbers.tolist() == [6, 1, 1, 1, 1]
    np.testing.assert_allclose(g0.positions[1], [1.09, 0, 0], atol=1e-6)  # Å kept
    np.testing.assert_allclose(g1.positions[1], [1.34, 0.25, 0.25], atol=1e-6)
    assert g0.energy == pytest.approx(-1088.45544983952, rel=1e-12)
    assert g0.forces[0, 2] == pytest.approx(0.05 * HA, rel=1e-6)  # forces: same sign, Ha/Å -> eV/Å
    assert g0.properties == {"wb97x_tz.energy": pytest.approx(-40.2 * HA)}  # NaN labels are left out
    assert g1.properties == {"ccsd(t)_cbs.energy": pytest.approx(-40.1 * HA)}
    assert g0.charge is None  # ANI-1x records no charge (all neutral, but not stated per record)
    tz, _ = convert("hdf5", path, {"method": "wb97x_tz"})
    assert tz[0].energy == pytest.approx(-40.2 * HA) and tz[0].forces is None and tz[1].energy is None
    assert tz[0].properties == {"wb97x_dz.energy": pytest.approx(-40.0 * HA)}


def test_hdf5_layout_detection_and_unknown_layout_is_one_reject(tmp_path) -> None:
    import h5py

    from ingest.converters.hdf5 import detect_layout

    with h5py.File(_spice(tmp_path / "a.h5"), "r") as h5:
        assert detect_layout(h5) == "spice"
    with h5py.File(_ani1x(tmp_path / "b.h5"), "r") as h5:
        assert detect_layout(h5) == "ani1x"
    odd = tmp_path / "odd.h5"
    with h5py.File(odd, "w") as h5:
        h5.create_group("g")["atomic_numbers"] = np.array([1, 1])
        h5["g"]["xyz"] = np.zeros((1, 2, 3))
    graphs, rejects = convert("hdf5", odd)
    assert not graphs and len(rejects) == 1 and rejects[0].record is None
    assert "odd.h5" in rejects[0].reason and "SPICE" in rejects[0].reason and "ANI-1x" in rejects[0].reason
    not_hdf5 = tmp_path / "text.h5"
    not_hdf5.write_text("not hdf5")
    assert not get_converter("hdf5")().can_convert(not_hdf5)


def test_hdf5_bad_records_are_rejects_with_reasons(tmp_path) -> None:
    import h5py

    path = tmp_path / "bad.hdf5"
    with h5py.File(path, "w") as h5:
        a = h5.create_group("a_nan")
        a["atomic_numbers"] = np.array([1, 1])
        pos = np.zeros((3, 2, 3))
        pos[:, 1, 0] = 1.4
        pos[1, 0, 0] = np.nan
        a["conformations"] = pos
        a["dft_total_energy"] = np.zeros(3)
        b = h5.create_group("b_shapes")
        b["atomic_numbers"] = np.array([1, 1, 1])
        b["conformations"] = np.zeros((2, 2, 3))
        c = h5.create_group("c_element")
        c["atomic_numbers"] = np.array([1, 0])
        c["conformations"] = np.ones((1, 2, 3))
        d = h5.create_group("d_empty")
        d["atomic_numbers"] = np.zeros(0, dtype=int)
        d["conformations"] = np.zeros((1, 0, 3))
        e = h5.create_group("e_no_conformations")
        e["atomic_numbers"] = np.array([1])
    assert _count("hdf5", path) == 3 + 2 + 1 + 1 + 1
    graphs, rejects = convert("hdf5", path)
    assert [g.index for g in graphs] == [0, 2]
    reasons = {r.record: r.reason for r in rejects}
    assert sorted(reasons) == [1, 3, 4, 5, 6, 7]
    assert "positions" in reasons[1] and "NaN" in reasons[1]
    assert "does not match 3 atomic numbers" in reasons[3] and reasons[3] == reasons[4]
    assert "unknown element" in reasons[5]
    assert "zero atoms" in reasons[6]
    assert "no conformations" in reasons[7]


def test_hdf5_links_to_other_files_are_not_followed(tmp_path) -> None:
    import h5py

    other = _spice(tmp_path / "other.hdf5")
    path = _spice(tmp_path / "main.hdf5")
    with h5py.File(path, "a") as h5:
        h5["zz_linked"] = h5py.ExternalLink(str(other), "/water")
        h5["water"]["dft_total_energy_copy"] = h5py.ExternalLink(str(other), "/water/dft_total_energy")
    graphs, rejects = convert("hdf5", path)
    assert [g.trajectory_id for g in graphs] == ["ammonium"] * 3 + ["water"] * 2  # unread member: no harm
    assert len(rejects) == 1 and rejects[0].record == 5 and "external link" in rejects[0].reason
    with h5py.File(path, "a") as h5:
        h5["water"]["formation_energy_x"] = h5py.ExternalLink(str(other), "/water/formation_energy")
        h5["water"].move("formation_energy", "formation_energy_own")
        h5["water"].move("formation_energy_x", "formation_energy")
    graphs, rejects = convert("hdf5", path)
    assert len(graphs) == 3 and sorted(r.record for r in rejects) == [3, 4, 5]
    assert "formation_energy is a soft or external link" in rejects[0].reason


def test_hdf5_record_ranges_split_and_resume(tmp_path) -> None:
    path = _spice(tmp_path / "s.hdf5")
    whole, _ = convert("hdf5", path)
    parts = []
    for rng in (range(0, 2), range(2, 4), range(4, 5)):  # the first cut is inside the first group
        g, rej = convert("hdf5", path, records=rng)
        assert not rej and [x.index for x in g] == list(rng)
        parts += g
    assert _same(parts, whole)
    resumed, _ = convert("hdf5", path, records=range(3, 5))
    assert _same(resumed, whole[3:])
    _, beyond = convert("hdf5", path, records=range(4, 7))
    assert [(r.record, r.reason) for r in beyond] == [(5, "conformation beyond the end of the file"),
                                                       (6, "conformation beyond the end of the file")]


def test_hdf5_reads_only_the_slices_of_the_unit(tmp_path, monkeypatch) -> None:
    import h5py

    path = tmp_path / "big.h5"
    n_conf = 400
    with h5py.File(path, "w") as h5:
        g = h5.create_group("m")
        g["atomic_numbers"] = np.array([6, 8])
        g["coordinates"] = np.random.default_rng(0).normal(size=(n_conf, 2, 3))
        g["wb97x_dz.energy"] = np.zeros(n_conf)
    seen: list[tuple[str, object]] = []
    orig = h5py.Dataset.__getitem__

    def spy(self, key, *args, **kwargs):
        seen.append((self.name, key))
        return orig(self, key, *args, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    graphs, _ = convert("hdf5", path, records=range(100, 110))
    assert [g.index for g in graphs] == list(range(100, 110))
    coord_reads = [k for name, k in seen if name.endswith("coordinates")]
    assert coord_reads and all(isinstance(k, slice) and k.start >= 100 and k.stop <= 110 for k in coord_reads)


# --- NPZ --------------------------------------------------------------------------------------------------

Z_ETHANOL = [6, 6, 8, 1, 1, 1, 1, 1, 1]


def _frames(t: int = 4) -> np.ndarray:
    base = np.arange(27, dtype=np.float64).reshape(9, 3) * 0.1
    return np.stack([base + 0.01 * k for k in range(t)])


def _rmd17(path: Path, compressed: bool = False, **override) -> Path:
    t = 4
    arrays = dict(nuclear_charges=np.array(Z_ETHANOL), coords=_frames(t), energies=np.array([-100.0, 2.5, 0.0, 1.0]),
                  forces=np.full((t, 9, 3), 2.5), old_indices=np.array([10, 20, 30, 40]),
                  old_energies=np.zeros(t), old_forces=np.zeros((t, 9, 3)))
    arrays.update(override)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def test_rmd17_kcal_per_mol_to_ev(tmp_path) -> None:
    for compressed in (False, True):
        path = _rmd17(tmp_path / f"rmd17_ethanol_{compressed}.npz", compressed)
        assert converter_for(path).name == "npz" and _count("npz", path) == 4
        graphs, rejects = convert("npz", path)
        assert not rejects and [g.index for g in graphs] == [0, 1, 2, 3]
        g0, g1 = graphs[:2]
        assert g0.atomic_numbers.tolist() == Z_ETHANOL and g0.domain == "md"
        assert g0.trajectory_id == f"rmd17_ethanol_{compressed}"
        np.testing.assert_allclose(g1.positions[2], [0.61, 0.71, 0.81], atol=1e-6)
        assert g0.energy == pytest.approx(-4.3364104241800945, rel=1e-9)
        assert g1.energy == pytest.approx(0.10841026060450235, rel=1e-9)
        np.testing.assert_allclose(g0.forces, np.full((9, 3), 2.5 * KCAL), rtol=1e-6)
        assert g1.properties == {"md17_index": 20.0} and g1.property_units == {"md17_index": "-"}


def test_md17_layout_and_units_override(tmp_path) -> None:
    path = tmp_path / "md17_aspirin.npz"
    np.savez(path, z=np.array(Z_ETHANOL), R=_frames(3), E=np.array([[-100.0], [1.0], [2.0]]),
             F=np.ones((3, 9, 3)), name=np.array("ethanol"), theory=np.array("DFT: PBE+TS"), type=np.array("d"))
    graphs, rejects = convert("npz", path)
    assert not rejects and len(graphs) == 3
    assert graphs[0].energy == pytest.approx(-100.0 * KCAL, rel=1e-9) and graphs[0].properties is None
    np.testing.assert_allclose(graphs[2].forces, np.full((9, 3), KCAL), rtol=1e-6)
    ha, _ = convert("npz", path, {"energy_unit": "Ha", "length_unit": "bohr"})
    assert ha[0].energy == pytest.approx(-100.0 * HA)
    np.testing.assert_allclose(ha[1].positions[1], (np.array([0.3, 0.4, 0.5]) + 0.01) * BOHR, rtol=1e-6)
    np.testing.assert_allclose(ha[0].forces[0], [HA_PER_BOHR] * 3, rtol=1e-6)


def test_npz_split_resume_and_bad_frames(tmp_path) -> None:
    coords = _frames(4)
    coords[2, 5, 1] = np.nan
    path = _rmd17(tmp_path / "r.npz", coords=coords)
    whole, rejects = convert("npz", path)
    assert [g.index for g in whole] == [0, 1, 3]
    assert len(rejects) == 1 and rejects[0].record == 2 and "NaN" in rejects[0].reason
    a, _ = convert("npz", path, records=range(0, 2))
    b, rb = convert("npz", path, records=range(2, 6))
    assert _same(a + b, whole)
    assert [(r.record, r.reason) for r in rb][1:] == [(4, "frame beyond the end of the trajectory"),
                                                      (5, "frame beyond the end of the trajectory")]
    bad_shape = _rmd17(tmp_path / "shape.npz", forces=np.zeros((4, 8, 3)))
    g, rej = convert("npz", bad_shape)
    assert not g and [r.record for r in rej] == [0, 1, 2, 3] and all("forces" in r.reason for r in rej)
    bad_z = _rmd17(tmp_path / "z.npz", nuclear_charges=np.array([6, 6, 8, 1, 1, 1, 1, 1, 300]))
    g, rej = convert("npz", bad_z)
    assert not g and len(rej) == 4 and "unknown element" in rej[0].reason
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(3))
    g, rej = convert("npz", other)
    assert not g and len(rej) == 1 and rej[0].record is None and "other.npz" in rej[0].reason


def test_npz_object_arrays_are_refused_never_unpickled(tmp_path) -> None:
    marker = tmp_path / "unpickled"
    Boom.marker = str(marker)
    path = tmp_path / "evil.npz"
    np.savez(path, nuclear_charges=np.array([1, 1]), coords=np.zeros((2, 2, 3)),
             energies=np.array([Boom(), Boom()], dtype=object), forces=np.zeros((2, 2, 3)))
    assert not marker.exists()
    graphs, rejects = convert("npz", path)
    assert not graphs and rejects and all("never unpickled" in r.reason for r in rejects)
    assert not marker.exists()


# --- ASE DB -----------------------------------------------------------------------------------------------


def _write_db(path: Path, backend: str) -> list:
    import ase.db
    from ase import Atoms
    from ase.build import bulk, molecule
    from ase.calculators.singlepoint import SinglePointCalculator

    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    cu.calc = SinglePointCalculator(cu, energy=-14.5, forces=np.full((4, 3), 0.125),
                                    stress=np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06]))
    water = molecule("H2O")
    water.calc = SinglePointCalculator(water, energy=-14.2, forces=np.zeros((3, 3)))
    oh = Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.97]])
    rows = [cu, water, oh]
    db = ase.db.connect(str(path), type=backend)
    db.write(cu, sid=7)
    db.write(water, data={"charge": 0, "spin": 1})  # OMol25 style: charge and spin in data
    db.write(oh, charge=-1, spin=1)  # key-value pairs
    if hasattr(db, "close"):
        db.close()
    return rows


@pytest.mark.parametrize("backend,suffix", [("db", ".db"), ("aselmdb", ".aselmdb")])
def test_ase_db_rows_with_results_charge_spin(tmp_path, backend, suffix) -> None:
    path = tmp_path / f"omat{suffix}"
    rows = _write_db(path, backend)
    mtime = os.stat(path).st_mtime_ns
    assert converter_for(path).name == "ase_db" and _count("ase_db", path) == 3
    graphs, rejects = convert("ase_db", path, {"properties": {"sid": "-"}})
    assert not rejects and [g.index for g in graphs] == [0, 1, 2]
    assert len({g.key for g in graphs}) == 3 and "sid" not in {g.key for g in graphs}  # keys are not option names
    cu, water, oh = graphs
    assert cu.domain == "crystal" and cu.pbc.all() and water.domain == "molecule" and not water.pbc.any()
    np.testing.assert_allclose(cu.cell, np.eye(3) * 3.6)
    np.testing.assert_allclose(cu.positions, rows[0].positions, atol=1e-6)
    np.testing.assert_allclose(water.positions, rows[1].positions, atol=1e-6)
    assert cu.energy == -14.5 and np.allclose(cu.forces, 0.125)
    assert cu.properties == {"stress_xx": 0.01, "stress_yy": 0.02, "stress_zz": 0.03, "stress_yz": 0.04,
                             "stress_xz": 0.05, "stress_xy": 0.06, "sid": 7.0}
    assert cu.property_units["stress_xy"] == "eV/Å^3" and cu.property_units["sid"] == "-"
    assert (water.charge, water.spin) == (0, 1) and (oh.charge, oh.spin) == (-1, 1)
    assert oh.energy is None and oh.forces is None and cu.charge is None
    assert os.stat(path).st_mtime_ns == mtime  # read-only: the fingerprint of a unit stays valid
    a, _ = convert("ase_db", path, records=range(0, 1))
    b, rb = convert("ase_db", path, records=range(1, 4))
    assert _same(a + b, convert("ase_db", path)[0])
    assert [(r.record, r.reason) for r in rb] == [(3, "row beyond the end of the database")]


@pytest.mark.parametrize("backend,suffix", [("db", ".db"), ("aselmdb", ".aselmdb")])
def test_ase_db_bad_rows(tmp_path, backend, suffix) -> None:
    import ase.db
    from ase import Atoms

    path = tmp_path / f"bad{suffix}"
    db = ase.db.connect(str(path), type=backend)
    db.write(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]]))
    db.write(Atoms("H2", positions=[[0, 0, 0], [0, 0, np.nan]]))
    db.write(Atoms("XH", positions=[[0, 0, 0], [0, 0, 1.0]]))  # Z = 0: ASE's dummy atom
    db.write(Atoms())
    if hasattr(db, "close"):
        db.close()
    graphs, rejects = convert("ase_db", path)
    assert [g.index for g in graphs] == [0]
    reasons = {r.record: r.reason for r in rejects}
    assert "NaN" in reasons[1] and "unknown element" in reasons[2] and "zero atoms" in reasons[3]


def test_ase_db_refuses_pickled_lmdb_and_foreign_sqlite(tmp_path) -> None:
    import sqlite3

    import lmdb

    marker = tmp_path / "unpickled"
    Boom.marker = str(marker)
    legacy = tmp_path / "data.lmdb"  # the legacy OC20 layout: pickled objects under ascii integer keys
    env = lmdb.open(str(legacy), subdir=False, map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"0", pickle.dumps(Boom(), protocol=4))
        txn.put(b"length", pickle.dumps(1, protocol=4))
    env.close()
    assert converter_for(legacy).name == "ase_db"
    graphs, rejects = convert("ase_db", legacy)
    assert not graphs and len(rejects) == 1 and rejects[0].record is None
    reason = rejects[0].reason
    assert "pickled" in reason and "never unpickled" in reason and "data.lmdb" in reason
    assert not marker.exists()
    compressed = tmp_path / "zpickle.aselmdb"
    env = lmdb.open(str(compressed), subdir=False, map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"1", zlib.compress(pickle.dumps(Boom(), protocol=4)))
    env.close()
    _, rejects = convert("ase_db", compressed)
    assert len(rejects) == 1 and "pickle" in rejects[0].reason and not marker.exists()
    foreign = tmp_path / "app.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE t (x INTEGER)")
    con.commit()
    con.close()
    before = foreign.read_bytes()
    _, rejects = convert("ase_db", foreign)
    assert len(rejects) == 1 and "systems table" in rejects[0].reason
    assert foreign.read_bytes() == before  # ase.db would have created its tables in it
    text = tmp_path / "notes.db"
    text.write_text("hello")
    assert not get_converter("ase_db")().can_convert(text)


# --- Parquet ----------------------------------------------------------------------------------------------


def _parquet(path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i in range(10):
        n = 2 + i % 3
        pos = [[0.1 * i + a, 0.5 * a, 1.0] for a in range(n)]
        rows.append({"numbers": [6] + [1] * (n - 1), "symbols": ["C"] + ["H"] * (n - 1), "pos": pos,
                     "pos_flat": [x for p in pos for x in p],
                     "energy_kcal": -100.0 + i, "forces": [[2.5, 0.0, -2.5]] * n, "q": i % 2, "mult": 1,
                     "gap_ev": 0.5 + i, "cell": [[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]] if i == 9 else None,
                     "smiles": "C"})
    rows[4]["pos"][1] = [1.0, 2.0]  # an inner list of 2: mismatched shape
    rows[5]["numbers"][0] = 0
    rows[6]["pos"] = None
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
    return path


PARQUET_OPTIONS = {"columns": {"atomic_numbers": "numbers", "positions": "pos", "energy": "energy_kcal",
                               "forces": "forces", "charge": "q", "spin": "mult", "cell": "cell"},
                   "properties": {"gap": "gap_ev"}, "property_units": {"gap": "eV"}, "energy_unit": "kcal/mol"}


def test_parquet_column_mapping_units_and_rejects(tmp_path) -> None:
    path = _parquet(tmp_path / "hub.parquet")
    assert converter_for(path).name == "parquet" and _count("parquet", path) == 10
    graphs, rejects = convert("parquet", path, PARQUET_OPTIONS)
    assert [g.index for g in graphs] == [0, 1, 2, 3, 7, 8, 9]
    reasons = {r.record: r.reason for r in rejects}
    assert "inner lists are not of length 3" in reasons[4]
    assert "unknown element" in reasons[5] and "null" in reasons[6]
    g1 = graphs[1]
    assert g1.atomic_numbers.tolist() == [6, 1, 1]
    np.testing.assert_allclose(g1.positions, [[0.1, 0, 1], [1.1, 0.5, 1], [2.1, 1.0, 1]], atol=1e-6)
    assert g1.energy == pytest.approx(-99.0 * KCAL, rel=1e-9)
    np.testing.assert_allclose(g1.forces, [[0.108410260604, 0, -0.108410260604]] * 3, rtol=1e-6)
    assert (g1.charge, g1.spin) == (1, 1) and g1.properties == {"gap": 1.5} and g1.property_units == {"gap": "eV"}
    assert g1.domain == "molecule" and graphs[-1].domain == "crystal" and graphs[-1].pbc.all()
    np.testing.assert_allclose(graphs[-1].cell, np.eye(3) * 5.0)
    flat = dict(PARQUET_OPTIONS, columns=dict(PARQUET_OPTIONS["columns"], positions="pos_flat"))
    flat_graphs, _ = convert("parquet", path, flat)
    assert np.array_equal(flat_graphs[1].positions, g1.positions)
    by_symbol = dict(PARQUET_OPTIONS, columns=dict(PARQUET_OPTIONS["columns"], atomic_numbers="symbols"))
    symbol_graphs, _ = convert("parquet", path, by_symbol)
    assert symbol_graphs[1].atomic_numbers.tolist() == [6, 1, 1] and len(symbol_graphs) == 8  # row 5 is fine here


def test_parquet_ranges_across_row_groups_and_missing_columns(tmp_path) -> None:
    path = _parquet(tmp_path / "hub.parquet")
    whole, _ = convert("parquet", path, PARQUET_OPTIONS)
    parts = []
    for rng in (range(0, 3), range(3, 7), range(7, 10)):  # cuts inside the row groups of 4
        g, rej = convert("parquet", path, PARQUET_OPTIONS, records=rng)
        assert sorted([x.index for x in g] + [r.record for r in rej]) == list(rng)
        parts += g
    assert _same(parts, whole)
    _, beyond = convert("parquet", path, PARQUET_OPTIONS, records=range(9, 11))
    assert [(r.record, r.reason) for r in beyond] == [(10, "row beyond the end of the table")]
    wrong = dict(PARQUET_OPTIONS, columns={"atomic_numbers": "Z", "positions": "pos"})
    graphs, rejects = convert("parquet", path, wrong)
    assert not graphs and len(rejects) == 1 and rejects[0].record is None and "'Z'" in rejects[0].reason


def test_converters_reject_unknown_options() -> None:
    from shards.config import ConfigError

    for name, bad in (("hdf5", {"layout": "qm7"}), ("npz", {"energy_unit": "furlong"}),
                      ("parquet", {"columns": {"numbers": "z"}}), ("ase_db", {"colour": 1})):
        conv = get_converter(name)()
        with pytest.raises(ConfigError):
            conv.parse_options(bad)


def test_every_record_is_one_item(tmp_path) -> None:
    """Across all four formats, full conversions yield exactly count_records items, none twice."""
    cases = [("hdf5", _spice(tmp_path / "s.hdf5"), {}), ("npz", _rmd17(tmp_path / "r.npz"), {}),
             ("parquet", _parquet(tmp_path / "p.parquet"), PARQUET_OPTIONS)]
    _write_db(tmp_path / "d.aselmdb", "aselmdb")
    cases.append(("ase_db", tmp_path / "d.aselmdb", {}))
    for name, path, opts in cases:
        graphs, rejects = convert(name, path, opts)
        idx = [g.index for g in graphs] + [r.record for r in rejects if isinstance(r, Reject)]
        assert sorted(idx) == list(range(_count(name, path, opts))), name


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
    _spice(data / "spice.hdf5")
    _rmd17(data / "rmd17.npz")
    _parquet(data / "hub.parquet")
    _write_db(data / "omat.aselmdb", "aselmdb")
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
