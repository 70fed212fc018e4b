"""Molecule converters on real files: SDF (plain, gzipped, 2D), SMILES, XYZ / extended XYZ, QM9 CSV."""
from __future__ import annotations

import gzip
import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest

from scd_train.datakit import qm9_csv
from tests.convhelp import convert, rdkit_file

EGFR = rdkit_file("Contrib/PBF/testData/egfr.sdf")
CDK2 = rdkit_file("Contrib/Fastcluster/testdata/cdk2.sdf")
EV_PER_HARTREE = 27.211386245988  # unit factors written out here, not imported from the converter under test
# QM9 CSV column -> (stored property, factor to the stored unit)
QM9_LABELS = {
    "HOMO_au": ("homo", EV_PER_HARTREE), "LUMO_au": ("lumo", EV_PER_HARTREE),
    "HOMO_LUMO_gap_au": ("gap", EV_PER_HARTREE), "InternalEnergy_0K_au": ("u0", EV_PER_HARTREE),
    "InternalEnergy_298K_au": ("u298", EV_PER_HARTREE), "Enthalphy_298K_au": ("h298", EV_PER_HARTREE),
    "GibbsFreeEnergy_298K_au": ("g298", EV_PER_HARTREE), "ZPVE_au": ("zpve", EV_PER_HARTREE),
    "Dipole_debye": ("mu", 1.0), "Polarizability_bohr3": ("alpha", 1.0), "R2_bohr2": ("r2", 1.0),
    "Heatcapacity_Cv_cal_mol_K": ("cv", 1.0),
}


def _rdkit_mols(path: Path, n: int) -> list:
    from rdkit import Chem

    return list(itertools.islice(Chem.ForwardSDMolSupplier(str(path), removeHs=False), n))


def test_sdf_keeps_hydrogens_bonds_and_positions() -> None:
    graphs, rejects = convert("sdf", EGFR, records=range(0, 5))
    assert not rejects and [g.index for g in graphs] == list(range(5))
    for g, mol in zip(graphs, _rdkit_mols(EGFR, 5), strict=True):
        assert g.n_atoms == mol.GetNumAtoms() and (g.atomic_numbers == 1).any()
        assert g.n_bonds == mol.GetNumBonds()
        np.testing.assert_allclose(g.positions, mol.GetConformer().GetPositions(), atol=1e-4)
        assert g.charge == 0 and not g.periodic


def test_sdf_gz_equals_plain_and_counts(tmp_path: Path) -> None:
    gz = tmp_path / "cdk2.sdf.gz"
    with open(CDK2, "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    from ingest.registry import get_converter

    conv = get_converter("sdf")()
    assert conv.count_records(gz, conv.parse_options({})) == conv.count_records(CDK2, conv.parse_options({})) == 47
    a, _ = convert("sdf", CDK2, records=range(40, 47))
    b, _ = convert("sdf", gz, records=range(40, 47))
    assert len(a) == len(b) == 7 and all(np.array_equal(x.positions, y.positions) for x, y in zip(a, b, strict=True))
    _, beyond = convert("sdf", CDK2, records=range(46, 49))
    assert [r.record for r in beyond] == [47, 48]


def test_sdf_formal_charges_give_total_charge(tmp_path: Path) -> None:
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles("C[NH3+].[O-]C(=O)CC([O-])=O"))
    AllChem.EmbedMolecule(mol, randomSeed=1)
    path = tmp_path / "charged.sdf"
    with Chem.SDWriter(str(path)) as w:
        w.write(mol)
    (g,), rejects = convert("sdf", path)
    assert not rejects and g.charge == -1 and g.n_atoms == mol.GetNumAtoms()


def test_2d_sdf_rejected_unless_embedded(tmp_path: Path) -> None:
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.MolFromSmiles("CCO")
    AllChem.Compute2DCoords(mol)
    path = tmp_path / "flat.mol"
    path.write_text(Chem.MolToMolBlock(mol))
    graphs, (rej,) = convert("sdf", path)
    assert not graphs and "2D" in rej.reason and rej.converter == "sdf"
    (g,), _ = convert("sdf", path, {"embed_2d": True})
    assert g.n_atoms == 9 and np.ptp(g.positions[:, 2]) > 0.1


def test_smiles_etkdg_conformers_are_seeded() -> None:
    smi = rdkit_file("Data/NCI/first_5K.smi")
    a, rej = convert("smiles", smi, {"conformers": 3, "seed": 7}, records=range(0, 6))
    b, _ = convert("smiles", smi, {"conformers": 3, "seed": 7}, records=range(3, 6))
    assert not rej and len(a) == 6
    assert a[0].n_atoms == 15 and (a[0].atomic_numbers == 1).sum() == 6  # CC1=CC(=O)C=CC1=O: C7H6O2
    assert not np.allclose(a[0].positions, a[1].positions)  # different conformers
    assert all(np.array_equal(x.positions, y.positions) for x, y in zip(a[3:], b, strict=True))
    d = np.linalg.norm(a[0].positions[a[0].bonds[:, 0]] - a[0].positions[a[0].bonds[:, 1]], axis=1)
    assert d.min() > 0.9 and d.max() < 1.6  # force-field relaxed bond lengths (Å)


def test_xyz_and_extxyz_multiframe(tmp_path: Path) -> None:
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.collections import g2

    frames = [g2["CH4"], g2["H2O"], g2["C6H6"]]
    plain = tmp_path / "mols.xyz"
    ase.io.write(plain, frames, format="xyz")
    graphs, rejects = convert("xyz", plain)
    assert not rejects and [g.n_atoms for g in graphs] == [5, 3, 12]
    np.testing.assert_allclose(graphs[2].positions, g2["C6H6"].positions, atol=1e-5)
    labelled = []
    for i, a in enumerate(frames):
        a = a.copy()
        a.calc = SinglePointCalculator(a, energy=-1.5 * i, forces=np.full((len(a), 3), 0.1 * i))
        labelled.append(a)
    ext = tmp_path / "mols.extxyz"
    ase.io.write(ext, labelled, format="extxyz")
    graphs, _ = convert("xyz", ext, records=range(1, 3))
    assert [g.index for g in graphs] == [1, 2] and graphs[1].energy == pytest.approx(-3.0)
    from ingest.registry import get_converter

    assert get_converter("xyz")().count_records(ext, None) == 3
    np.testing.assert_allclose(graphs[1].forces, 0.2, atol=1e-6)


def test_qm9_csv_labels_in_ev() -> None:
    import ast
    import csv


    graphs, rejects = convert("qm9csv", qm9_csv(1), records=range(0, 200))
    assert not rejects and [g.index for g in graphs] == list(range(200))
    with open(qm9_csv(1), newline="") as fh:
        rows = list(itertools.islice(csv.DictReader(fh), 200))
    for g, row in zip(graphs, rows, strict=True):
        assert g.n_atoms == int(row["N_atoms"]) == len(ast.literal_eval(row["Elements"]))
        np.testing.assert_allclose(g.positions, ast.literal_eval(row["XYZ_Ang"]), atol=1e-5)
        assert set(g.properties) == {name for name, _ in QM9_LABELS.values()}
        for col, (name, factor) in QM9_LABELS.items():
            assert g.properties[name] == pytest.approx(float(row[col]) * factor, rel=1e-11)
    g = graphs[0]
    assert g.atomic_numbers.tolist() == [6, 1, 1, 1, 1] and g.charge == 0  # methane
    assert g.properties["gap"] == pytest.approx(float(rows[0]["HOMO_LUMO_gap_au"]) * 27.211386245988)
    assert g.properties["u0"] < -1000  # Hartree -> eV
    assert g.property_units == {"homo": "eV", "lumo": "eV", "gap": "eV", "u0": "eV", "u298": "eV", "h298": "eV",
                                "g298": "eV", "zpve": "eV", "mu": "D", "alpha": "bohr^3", "r2": "bohr^2",
                                "cv": "cal/mol/K"}


def test_qm9_count_and_ranges_from_another_part() -> None:
    from ingest.registry import converter_for

    path = qm9_csv(3)
    conv = converter_for(path)()
    assert conv.name == "qm9csv"
    n = conv.count_records(path, conv.parse_options({}))
    tail, rejects = convert("qm9csv", path, records=range(n - 3, n + 1))
    assert len(tail) == 3 and [r.record for r in rejects] == [n]
