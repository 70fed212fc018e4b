"""Protein converters on real PDB / mmCIF files from MDAnalysisTests (gzipped or not)."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from tests.convhelp import convert, mda_data

DATA = mda_data()


def _atom_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        lines = []
        for line in fh:
            if line.startswith("ENDMDL"):
                break
            if line.startswith(("ATOM  ", "HETATM")):
                lines.append(line)
        return lines


def test_adk_pdb_elements_inferred_from_names() -> None:
    (g,), rejects = convert("pdb", DATA / "adk_open.pdb")
    assert not rejects and g.n_atoms == 3341
    counts = {z: int((g.atomic_numbers == z).sum()) for z in (1, 6, 7, 8, 16)}
    assert counts == {1: 1685, 6: 1040, 7: 289, 8: 320, 16: 7}  # CA is carbon, not calcium
    assert g.atom_name[1] == b"CA" or b"CA" in g.atom_name.tolist()
    graphs, (rej,) = convert("pdb", DATA / "adk_open.pdb", {"infer_elements": False})
    assert not graphs and "no element" in rej.reason and rej.record == 0


def test_nmr_models_first_or_all() -> None:
    path = DATA / "nmr_neopetrosiamide.pdb"
    first, _ = convert("pdb", path)
    every, rejects = convert("pdb", path, {"models": "all"})
    assert len(first) == 1 and len(every) == 24 and not rejects
    assert {g.n_atoms for g in every} == {first[0].n_atoms}
    assert not np.allclose(every[0].positions, every[1].positions)
    from ingest.registry import get_converter

    conv = get_converter("pdb")()
    assert conv.count_records(path, conv.parse_options({"models": "all"})) == 24
    _, beyond = convert("pdb", path, records=range(1, 2))
    assert [r.record for r in beyond] == [1]


def test_insertion_codes_stay_distinct_residues() -> None:
    path = DATA / "1osm.pdb.gz"
    (g,), _ = convert("pdb", path, {"waters": True})
    lines = _atom_lines(path)
    assert any(line[26] != " " for line in lines)  # the file has insertion codes
    n_residues = len({(line[21], line[22:27]) for line in lines})
    assert len(np.unique(g.residue_index)) == n_residues
    assert g.n_atoms == len(lines) - sum(1 for line in lines if line[16] not in " A")  # one altloc kept


def test_waters_hydrogens_hetero_selection() -> None:
    path = DATA / "4E43.pdb"
    (full,), _ = convert("pdb", path, {"waters": True})
    (dry,), _ = convert("pdb", path)
    (bare,), _ = convert("pdb", path, {"hetero": False, "hydrogens": False})
    water = full.residue_name == b"HOH"
    assert water.any() and full.hetero[water].all()
    assert dry.n_atoms == full.n_atoms - int(water.sum())
    assert not (bare.atomic_numbers == 1).any() and not bare.hetero.any()


def test_mmcif_multichain_matches_pdb() -> None:
    (cif,), rejects = convert("mmcif", DATA / "mmcif/3KPR.cif.gz")
    assert not rejects and len(set(cif.chain.tolist())) == 10
    (pdb,), _ = convert("pdb", DATA / "mmcif/3KPR.pdb.gz")
    assert cif.n_atoms == pdb.n_atoms
    np.testing.assert_array_equal(np.sort(cif.atomic_numbers), np.sort(pdb.atomic_numbers))
    (small,), _ = convert("mmcif", DATA / "mmcif/1YJP.cif")
    assert small.n_atoms == 59 and small.atom_name.dtype == np.dtype("S4")


def test_altloc_highest_occupancy(tmp_path: Path) -> None:
    base = _atom_lines(DATA / "adk_open.pdb")[:2]
    a = base[1][:16] + "A" + base[1][17:54] + "  0.30" + base[1][60:]
    b = base[1][:16] + "B" + base[1][17:30] + "   9.000   9.000   9.000  0.70" + base[1][60:]
    path = tmp_path / "alt.pdb"
    path.write_text(base[0] + a + b + "END\n")
    (g,), _ = convert("pdb", path)
    assert g.n_atoms == 2 and np.allclose(g.positions[1], 9.0)


def _point_mutation(tmp_path: Path) -> Path:
    """Residue 1 of chain A as SER (altloc A) or GLY (altloc B): Biopython's DisorderedResidue."""
    rows = [("ATOM  ", 1, "N  ", "A", "SER", 0.0, "N"), ("ATOM  ", 2, "CA ", "A", "SER", 1.5, "C"),
            ("ATOM  ", 3, "N  ", "B", "GLY", 0.1, "N"), ("ATOM  ", 4, "CA ", "B", "GLY", 1.6, "C"),
            ("ATOM  ", 5, "N  ", " ", "ALA", 3.0, "N")]
    lines = [f"{rec}{n:5d}  {name}{alt}{res} A{1 if res != 'ALA' else 2:4d}    {x:8.3f}{0.0:8.3f}{0.0:8.3f}"
             f"  0.50 10.00          {el:>2}\n" for rec, n, name, alt, res, x, el in rows]
    path = tmp_path / "mutation.pdb"
    path.write_text("".join(lines) + "END\n")
    return path


def test_converted_structures_leave_no_reference_cycles(tmp_path: Path) -> None:
    """A Biopython structure is a web of parent <-> child cycles, which only Python's cyclic collector frees; its
    full passes over a Ray worker's heap cost about a sixth of a small PDB file's conversion. The converters
    break the cycles once a file is done, also when the consumer stops mid-file."""
    import gc

    from Bio.PDB import PDBParser

    from ingest.registry import get_converter

    mutation = _point_mutation(tmp_path)
    residue = next(PDBParser(QUIET=True).get_structure("m", str(mutation))[0]["A"].get_residues())
    assert residue.is_disordered() == 2  # a point mutation: one residue number, two residues
    cases = [("pdb", mutation, {}), ("pdb", DATA / "1osm.pdb.gz", {"waters": True}), ("pdb", DATA / "adk_open.pdb", {}),
             ("pdb", DATA / "nmr_neopetrosiamide.pdb", {"models": "all"}), ("mmcif", DATA / "mmcif/3KPR.cif.gz", {}),
             ("pdb", DATA / "nmr_neopetrosiamide.pdb", {"models": "all", "repeated_atoms": "split"})]
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        made = [len(convert(name, path, options)[0]) for name, path, options in cases]
        conv = get_converter("pdb")()
        stopped = conv.convert(DATA / "nmr_neopetrosiamide.pdb", conv.parse_options({"models": "all"}),
                               source="test", file_id="nmr")
        next(stopped)
        stopped.close()
        del stopped
        gc.collect()
        left = sorted({type(o).__name__ for o in gc.garbage if type(o).__module__.startswith("Bio.")})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert made == [1, 1, 1, 24, 1, 24]
    assert left == []
