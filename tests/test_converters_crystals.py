"""Crystal converters on real CIFs (COD via ASE, pyxtal), POSCAR written by pymatgen, pymatgen JSON."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from scd_train.datakit import package_dir
from tests.convhelp import convert

MINERALS = sorted((package_dir("ase") / "test/testdata/minerals").glob("cod_*.cif"))
PMG = package_dir("pymatgen") / "util/structures"


def _frac(g) -> np.ndarray:
    return g.positions.astype(np.float64) @ np.linalg.inv(g.cell)


def _assert_wrapped(g) -> None:
    f = _frac(g)
    assert g.pbc.all() and abs(np.linalg.det(g.cell)) > 1.0
    assert (f >= -1e-5).all() and (f < 1.0 + 1e-5).all()


@pytest.mark.parametrize("path", MINERALS, ids=lambda p: p.stem)
def test_cod_cifs_match_pymatgen(path: Path) -> None:
    from pymatgen.core import Structure

    (g,), rejects = convert("cif", path)
    ref = Structure.from_file(path)
    assert not rejects and g.n_atoms == len(ref) and g.domain == "crystal"
    np.testing.assert_allclose(g.cell, ref.lattice.matrix, atol=1e-6)
    _assert_wrapped(g)


def test_multiblock_cif_gives_several_samples(tmp_path: Path) -> None:
    path = tmp_path / "two.cif"
    path.write_text(MINERALS[0].read_text() + "\n" + MINERALS[1].read_text())
    graphs, rejects = convert("cif", path)
    singles = [convert("cif", p)[0][0] for p in MINERALS[:2]]
    assert not rejects and [g.index for g in graphs] == [0, 1]
    assert [g.n_atoms for g in graphs] == [g.n_atoms for g in singles]


def test_poscar_written_by_pymatgen_wraps_positions(tmp_path: Path) -> None:
    from pymatgen.core import Structure
    from pymatgen.io.vasp import Poscar

    s = Structure.from_file(PMG / "LiFePO4.json")
    s.translate_sites(list(range(len(s))), [0.7, -0.4, 1.3])  # push sites out of the cell
    path = tmp_path / "POSCAR"
    path.write_text(Poscar(s).get_str(significant_figures=12))
    (g,), rejects = convert("poscar", path)
    assert not rejects and g.n_atoms == 28
    _assert_wrapped(g)
    assert sorted(g.atomic_numbers.tolist()) == sorted(site.specie.Z for site in s)


def test_primitive_and_conventional_cells() -> None:
    conv, _ = convert("pymatgen_json", PMG / "Si.json", {"cell": "conventional"})
    prim, _ = convert("pymatgen_json", PMG / "Si.json", {"cell": "primitive"})
    assert conv[0].n_atoms == 8 and prim[0].n_atoms == 2
    assert abs(np.linalg.det(conv[0].cell)) == pytest.approx(4 * abs(np.linalg.det(prim[0].cell)), rel=1e-3)
    _assert_wrapped(conv[0])


def test_disordered_rejected_unless_majority() -> None:
    path = PMG / "Li10GeP2S12.json"
    graphs, (rej,) = convert("pymatgen_json", path)
    assert not graphs and "disordered" in rej.reason and rej.record == 0
    (g,), rejects = convert("pymatgen_json", path, {"order": "majority"})
    assert not rejects and g.n_atoms > 0
    _assert_wrapped(g)


def test_every_ordered_pymatgen_json_converts() -> None:
    """Each of pymatgen's JSON structures: ordered -> exactly one sample with pymatgen's atoms and cell
    (as_is), disordered -> exactly one reject saying so; pymatgen decides which is which."""
    from pymatgen.core import Structure

    ordered = 0
    for path in sorted(PMG.glob("*.json")):
        ref = Structure.from_file(path)
        graphs, rejects = convert("pymatgen_json", path)
        if ref.is_ordered:
            ordered += 1
            assert not rejects and len(graphs) == 1, (path.name, rejects)
            (g,) = graphs
            assert g.n_atoms == len(ref) and g.atomic_numbers.tolist() == [site.specie.Z for site in ref]
            np.testing.assert_allclose(g.cell, ref.lattice.matrix, atol=1e-5)
            _assert_wrapped(g)
        else:
            assert not graphs and len(rejects) == 1 and "disordered" in rejects[0].reason, path.name
    assert ordered >= 20
