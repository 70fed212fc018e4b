"""NPZ container converter: the rMD17 and MD17 layouts (numpy, never unpickled).

Files come from :mod:`tests.containerfiles`."""
from __future__ import annotations

import numpy as np
import pytest

from ingest.registry import converter_for
from tests.containerfiles import (
    BOHR,
    HA,
    HA_PER_BOHR,
    KCAL,
    Z_ETHANOL,
    Boom,
    count_records,
    ethanol_frames,
    same_graphs,
    write_rmd17,
)
from tests.convhelp import convert


def test_rmd17_kcal_per_mol_to_ev(tmp_path) -> None:
    for compressed in (False, True):
        path = write_rmd17(tmp_path / f"rmd17_ethanol_{compressed}.npz", compressed)
        assert converter_for(path).name == "npz" and count_records("npz", path) == 4
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
    np.savez(path, z=np.array(Z_ETHANOL), R=ethanol_frames(3), E=np.array([[-100.0], [1.0], [2.0]]),
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
    coords = ethanol_frames(4)
    coords[2, 5, 1] = np.nan
    path = write_rmd17(tmp_path / "r.npz", coords=coords)
    whole, rejects = convert("npz", path)
    assert [g.index for g in whole] == [0, 1, 3]
    assert len(rejects) == 1 and rejects[0].record == 2 and "NaN" in rejects[0].reason
    a, _ = convert("npz", path, records=range(0, 2))
    b, rb = convert("npz", path, records=range(2, 6))
    assert same_graphs(a + b, whole)
    assert [(r.record, r.reason) for r in rb][1:] == [(4, "frame beyond the end of the trajectory"),
                                                      (5, "frame beyond the end of the trajectory")]
    bad_shape = write_rmd17(tmp_path / "shape.npz", forces=np.zeros((4, 8, 3)))
    g, rej = convert("npz", bad_shape)
    assert not g and [r.record for r in rej] == [0, 1, 2, 3] and all("forces" in r.reason for r in rej)
    bad_z = write_rmd17(tmp_path / "z.npz", nuclear_charges=np.array([6, 6, 8, 1, 1, 1, 1, 1, 300]))
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
