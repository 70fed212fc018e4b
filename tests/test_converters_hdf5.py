"""HDF5 container converter: the SPICE and ANI-1x layouts (h5py).

Files come from :mod:`tests.containerfiles`."""
from __future__ import annotations

import numpy as np
import pytest

from ingest.registry import converter_for, get_converter
from tests.containerfiles import (
    BOHR,
    HA,
    count_records,
    same_graphs,
    write_ani1x,
    write_spice,
)
from tests.convhelp import convert


def test_spice_layout_bohr_hartree_gradients_and_charge(tmp_path) -> None:
    path = write_spice(tmp_path / "SPICE-test.hdf5")
    assert converter_for(path).name == "hdf5"
    assert count_records("hdf5", path) == 5
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


def test_ani1x_layout_hartree_per_angstrom_no_sign_flip(tmp_path) -> None:
    path = write_ani1x(tmp_path / "ani1x-release.h5")
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

    with h5py.File(write_spice(tmp_path / "a.h5"), "r") as h5:
        assert detect_layout(h5) == "spice"
    with h5py.File(write_ani1x(tmp_path / "b.h5"), "r") as h5:
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
    assert count_records("hdf5", path) == 3 + 2 + 1 + 1 + 1
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

    other = write_spice(tmp_path / "other.hdf5")
    path = write_spice(tmp_path / "main.hdf5")
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
    path = write_spice(tmp_path / "s.hdf5")
    whole, _ = convert("hdf5", path)
    parts = []
    for rng in (range(0, 2), range(2, 4), range(4, 5)):  # the first cut is inside the first group
        g, rej = convert("hdf5", path, records=rng)
        assert not rej and [x.index for x in g] == list(rng)
        parts += g
    assert same_graphs(parts, whole)
    resumed, _ = convert("hdf5", path, records=range(3, 5))
    assert same_graphs(resumed, whole[3:])
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
