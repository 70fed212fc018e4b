"""Hostile protein and crystal files: dropped atoms and impossible cells are rejects; real files are all accepted."""
from __future__ import annotations

import gzip
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from ingest.registry import get_converter
from scd_train.datakit import package_dir
from shards.format.schema import AtomGraph
from tests.convhelp import convert, mda_data
from tests.hostilehelp import accounted, adk_atoms

# ---------------------------------------------------------------- PDB / mmCIF: atoms the parser would drop

def _translated_copies(k: int, with_end: bool) -> str:
    """``k`` copies of adk_open (blank chain IDs), each shifted by 100 Å in x, as one PDB file."""
    out = []
    for c in range(k):
        for ln in adk_atoms():
            out.append(ln[:30] + f"{float(ln[30:38]) + 100.0 * c:8.3f}" + ln[38:])
        if with_end:
            out.append("END")
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("with_end", [False, True])
def test_pdb_repeated_atoms_are_rejected_with_counts(tmp_path: Path, with_end: bool) -> None:
    atoms = adk_atoms()
    assert {ln[21] for ln in atoms} == {" "}, "the real file has blank chain IDs"
    path = tmp_path / "copies.pdb"
    path.write_text(_translated_copies(8, with_end))
    samples, (rej,) = convert("pdb", path)
    assert not samples and rej.record == 0
    assert rej.reason.startswith(f"the parser kept {len(atoms)} of the {8 * len(atoms)} atom records of model 0")
    assert "repeated_atoms: split" in rej.reason


def test_pdb_split_gives_every_copy(tmp_path: Path) -> None:
    atoms = adk_atoms()
    ref = np.array([[float(ln[30:38]), float(ln[38:46]), float(ln[46:54])] for ln in atoms])
    path = tmp_path / "copies.pdb.gz"
    path.write_bytes(gzip.compress(_translated_copies(4, with_end=True).encode()))
    opts = {"repeated_atoms": "split"}
    samples, rejects = convert("pdb", path, opts)
    assert not rejects
    by_index = accounted(samples, [], 4)
    for c, g in by_index.items():
        assert isinstance(g, AtomGraph) and g.n_atoms == len(atoms)
        np.testing.assert_allclose(np.sort(g.positions[:, 0]), np.sort(ref[:, 0] + 100.0 * c), atol=2e-3)
    conv = get_converter("pdb")()
    assert conv.count_records(path, conv.parse_options(opts)) == 4
    part, _ = convert("pdb", path, opts, records=range(2, 4))
    assert [g.index for g in part] == [2, 3]


def _mmcif_with_copies(tmp: Path, kinds: tuple[str, ...]) -> tuple[Path, int, int]:
    """1YJP.cif with its ``kinds`` (ATOM / HETATM) rows repeated under new serial numbers; (path, rows, copies)."""
    lines = (mda_data() / "mmcif" / "1YJP.cif").read_text().splitlines()
    rows = [i for i, ln in enumerate(lines) if ln.startswith(("ATOM ", "HETATM "))]
    copies = []
    for i in rows:
        tok = lines[i].split()
        if tok[0] in kinds:
            tok[1] = str(int(tok[1]) + 100000)
            copies.append(" ".join(tok))
    path = tmp / f"twice_{'_'.join(kinds)}.cif"
    path.write_text("\n".join(lines[: rows[-1] + 1] + copies + lines[rows[-1] + 1:]) + "\n")
    return path, len(rows), len(copies)


def test_mmcif_repeated_atoms_are_rejected(tmp_path: Path) -> None:
    path, n_rows, n_copies = _mmcif_with_copies(tmp_path, ("ATOM",))
    samples, (rej,) = convert("mmcif", path)
    assert not samples and rej.record == 0
    assert rej.reason.startswith(f"the parser kept {n_rows} of the {n_rows + n_copies} atom records of model 0")
    path, _, _ = _mmcif_with_copies(tmp_path, ("HETATM",))  # Biopython refuses repeated hetero residues outright
    samples, (rej,) = convert("mmcif", path)
    assert not samples and rej.record is None and rej.reason.endswith("('W', 8, ' ') defined twice")


REAL_PROTEINS = [("pdb", "adk_open.pdb", {}), ("pdb", "4E43.pdb", {}), ("pdb", "1osm.pdb.gz", {}),
                 ("pdb", "nmr_neopetrosiamide.pdb", {"models": "all"}), ("mmcif", "mmcif/1YJP.cif", {}),
                 ("mmcif", "mmcif/5PTI.cif.gz", {}), ("mmcif", "mmcif/3KPR.cif.gz", {"models": "all"})]


@pytest.mark.parametrize(("conv", "name", "opts"), REAL_PROTEINS)
def test_real_protein_files_keep_every_atom_record(conv: str, name: str, opts: dict) -> None:
    import Bio.PDB

    samples, rejects = convert(conv, mda_data() / name, opts)
    assert samples and not rejects
    if conv == "pdb":  # atoms kept (waters dropped by default) against a first-altloc count of the records
        text = (gzip.open if name.endswith(".gz") else open)(mda_data() / name, "rt").read()
        parser = Bio.PDB.PDBParser(QUIET=True)
        first = next(iter(parser.get_structure("x", io.StringIO(text))))
        assert samples[0].n_atoms == sum(1 for a in first.get_atoms() if a.get_parent().id[0] != "W")


# ---------------------------------------------------------------- crystals: physically impossible cells

def _write_structure(path: Path, structure) -> Path:
    path.write_text(json.dumps(structure.as_dict()))
    return path


def _min_image_distance(structure) -> float:
    """Brute force: the shortest distance between two atoms, or an atom and its own periodic image."""
    lat = np.array(structure.lattice.matrix)
    frac = np.mod(np.array(structure.frac_coords), 1.0)
    cart = frac @ lat
    shifts = np.array([[a, b, c] for a in range(-2, 3) for b in range(-2, 3) for c in range(-2, 3)]) @ lat
    d = np.linalg.norm(cart[None, :, None, :] + shifts[None, None] - cart[:, None, None, :], axis=-1)
    n = len(cart)
    d[np.arange(n), np.arange(n), len(shifts) // 2] = np.inf  # an atom and itself, unshifted
    return float(d.min())


def _si():
    from pymatgen.core import Structure

    return Structure.from_file(str(package_dir("pymatgen") / "util/structures/Si.json"))


def test_tiny_cell_is_rejected(tmp_path: Path) -> None:
    from pymatgen.core import Lattice, Structure

    si = _si()
    tiny = Structure(Lattice(si.lattice.matrix * (0.2 / max(si.lattice.abc))), si.species, si.frac_coords)
    shortest = min(tiny.lattice.abc)
    path = _write_structure(tmp_path / "tiny.json", tiny)
    samples, (rej,) = convert("pymatgen_json", path)
    assert not samples and rej.record == 0
    assert rej.reason == f"cell length {shortest:.4g} Å is below min_cell_length 1.0 Å"
    samples, (rej,) = convert("pymatgen_json", path, {"min_cell_length": 0.0})
    assert not samples and rej.record == 0
    d = _min_image_distance(tiny)
    assert re.fullmatch(rf"atoms [01] and [01] are {d:.4g} Å apart \(minimum image, after wrapping\), "
                        r"below min_distance 0\.5 Å", rej.reason), rej.reason


def test_overlapping_atoms_by_minimum_image(tmp_path: Path) -> None:
    si = _si()
    a = si.lattice.abc[0]
    crowded = si.copy()
    # a third atom 0.3 Å from atom 0 across the periodic boundary: only the minimum image shows it
    crowded.append("Si", si[0].coords - np.array(si.lattice.matrix[0]) * (1 - 0.3 / a), coords_are_cartesian=True,
                   validate_proximity=False)
    d = _min_image_distance(crowded)
    path = _write_structure(tmp_path / "crowded.json", crowded)
    samples, (rej,) = convert("pymatgen_json", path)
    assert not samples and rej.record == 0
    assert rej.reason == (f"atoms 0 and 2 are {d:.4g} Å apart (minimum image, after wrapping), "
                          "below min_distance 0.5 Å")
    assert d < 0.5 < float(np.linalg.norm(crowded[2].coords - crowded[0].coords))
    ok, rejects = convert("pymatgen_json", path, {"min_distance": round(d, 3) - 0.01})
    assert len(ok) == 1 and not rejects


def test_an_atom_too_close_to_its_own_image(tmp_path: Path) -> None:
    from pymatgen.core import Lattice, Structure

    # one atom, a 0.4 Å axis: its only neighbour is itself, one cell along c
    chain = Structure(Lattice.from_parameters(3.0, 3.0, 0.4, 90, 90, 90), ["Na"], [[0.1, 0.2, 0.7]])
    path = _write_structure(tmp_path / "chain.json", chain)
    samples, (rej,) = convert("pymatgen_json", path, {"min_cell_length": 0.0})
    assert not samples and rej.record == 0
    assert rej.reason == "atoms 0 and 0 are 0.4 Å apart (minimum image, after wrapping), below min_distance 0.5 Å"
    ok, rejects = convert("pymatgen_json", path, {"min_cell_length": 0.0, "min_distance": 0.39})
    assert len(ok) == 1 and not rejects


def test_negative_and_flat_cells(tmp_path: Path) -> None:
    from pymatgen.core import Lattice, Structure

    src = next((package_dir("ase") / "test/testdata/minerals").glob("cod_*.cif"))
    text = src.read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("_cell_length_a"))
    value = line.split()[1]
    neg = tmp_path / "negative.cif"
    neg.write_text(text.replace(line, f"_cell_length_a -{value}"))
    samples, (rej,) = convert("cif", neg)
    number = float(value.split("(")[0])
    assert not samples and rej.record == 0 and rej.reason == (
        f"_cell_length_a is {-number}: cell lengths must be positive")
    si = _si()
    m = np.array(si.lattice.matrix)
    m[2] = m[0] + m[1] + 1e-5 * m[2]
    flat = Structure(Lattice(m), si.species, si.frac_coords)
    samples, (rej,) = convert("pymatgen_json", _write_structure(tmp_path / "flat.json", flat))
    assert not samples and rej.record == 0 and rej.reason.startswith("degenerate cell: volume")


@pytest.mark.slow
def test_real_crystals_of_the_data_kit_are_all_accepted(tmp_path: Path) -> None:
    import ase.io
    from ase.collections import dcdft

    files = [(p, {}) for p in sorted((package_dir("pyxtal") / "database" / "cifs").iterdir())
             if p.suffix in (".cif", ".vasp")]
    for p in sorted((package_dir("pymatgen") / "util" / "structures").glob("*.json")):
        files.append((p, {"order": "majority"} if p.stem == "Li10GeP2S12" else {}))
    files += [(p, {}) for p in sorted((package_dir("ase") / "test/testdata/minerals").glob("*.cif"))]
    with gzip.open(package_dir("pymatgen") / "analysis/prototypes/aflow_prototypes.json.gz", "rt") as fh:
        aflow = [e["snl"] for e in json.load(fh)]
    (tmp_path / "aflow.json").write_text(json.dumps(aflow))
    files.append((tmp_path / "aflow.json", {}))
    for atoms in dcdft:
        p = tmp_path / f"{atoms.get_chemical_formula()}.vasp"
        ase.io.write(p, atoms, format="vasp")
        files.append((p, {}))
    assert len(files) >= 180
    n_samples = 0
    for p, opts in files:
        conv = {".cif": "cif", ".vasp": "poscar", ".json": "pymatgen_json"}[p.suffix]
        samples, rejects = convert(conv, p, opts)
        assert samples and not rejects, (p.name, rejects[:2])
        n_samples += len(samples)
    assert n_samples >= len(files) - 1 + len(aflow)
