"""Protein converters (Biopython): PDB and mmCIF, gzipped or not. One sample per model."""
from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ingest.plugin import Converter, Reject
from shards.schema import AtomGraph, make_key


@dataclass(frozen=True)
class ProteinOptions:
    """``models``: first model only, or every model as its own sample (NMR ensembles).
    Alternate locations: the highest-occupancy one (Biopython's selection). ``hydrogens``, ``waters``
    and ``hetero`` (ligands and ions) are kept or dropped. Atoms without an element column get one
    inferred from the atom name when ``infer_elements``, else the model is rejected."""

    models: Literal["first", "all"] = "first"
    hydrogens: bool = True
    waters: bool = False
    hetero: bool = True
    infer_elements: bool = True


def _element(atom: Any, infer: bool) -> int:
    from ase.data import atomic_numbers

    el = (atom.element or "").strip().capitalize()
    if el in ("D", "T"):
        return 1
    if el in atomic_numbers and el != "X":
        return atomic_numbers[el]
    if not infer:
        raise ValueError(f"atom {atom.get_full_id()} has no element")
    name = atom.get_name().strip().lstrip("0123456789")
    for guess in (name[:2].capitalize(), name[:1].upper()):
        if guess in atomic_numbers and guess != "X":
            return atomic_numbers[guess]
    raise ValueError(f"cannot infer the element of atom {atom.get_name()!r}")


class _Structure(Converter):
    """Shared model walk of the PDB and mmCIF converters."""

    domain = "protein"
    default_source = "pdb"
    Options = ProteinOptions

    def _parser(self) -> Any:
        raise NotImplementedError

    def convert(self, path: Path, options: ProteinOptions, *, source: str, file_id: str,
                records: range | None = None) -> Iterator[AtomGraph | Reject]:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rt", errors="replace") as fh:
            text = fh.read()
        structure = self._parser().get_structure(path.stem, io.StringIO(text))
        models = list(structure)
        if not models:
            yield self.reject(file_id, None, "no models / atoms in the file")
            return
        if options.models == "first":
            models = models[:1]
        for i, model in enumerate(models):
            if records is not None and i not in records:
                continue
            yield self.build(file_id, i, lambda m=model, i=i: self._graph(m, i, options, source, file_id))

    def _graph(self, model: Any, i: int, options: ProteinOptions, source: str, file_id: str) -> AtomGraph:
        z, pos, names, res_idx, res_names, chains, hetero = [], [], [], [], [], [], []
        for r_no, residue in enumerate(model.get_residues()):
            flag = residue.id[0]
            if flag == "W" and not options.waters:
                continue
            if flag.startswith("H_") and not options.hetero:
                continue
            for atom in residue.get_atoms():
                zi = _element(atom, options.infer_elements)
                if zi == 1 and not options.hydrogens:
                    continue
                z.append(zi)
                pos.append(atom.get_coord())
                names.append(atom.get_name()[:4])
                res_idx.append(r_no)
                res_names.append(residue.get_resname()[:4])
                chains.append(str(residue.get_parent().id)[:4])
                hetero.append(flag != " ")
        if not z:
            raise ValueError("no atoms left after the selection")
        return AtomGraph(key=make_key(source, file_id, i), domain="protein", source=source, source_file=file_id,
                         index=i, atomic_numbers=np.array(z), positions=np.array(pos, dtype=np.float64),
                         cell=np.zeros((3, 3)), pbc=np.zeros(3, bool), atom_name=np.array(names, dtype="S4"),
                         residue_index=np.array(res_idx), residue_name=np.array(res_names, dtype="S4"),
                         chain=np.array(chains, dtype="S4"), hetero=np.array(hetero))


class PDBConverter(_Structure):
    """PDB files (.pdb, .ent, gzipped or not)."""

    name = "pdb"
    suffixes = (".pdb", ".pdb.gz", ".ent", ".ent.gz")

    def _parser(self) -> Any:
        from Bio.PDB import PDBParser

        return PDBParser(QUIET=True)


class MMCIFConverter(_Structure):
    """mmCIF files (.cif, .mmcif, gzipped or not) holding macromolecular models (``_atom_site``)."""

    name = "mmcif"
    suffixes = (".mmcif", ".mmcif.gz", ".cif", ".cif.gz")

    def can_convert(self, path: Path) -> bool:
        return super().can_convert(path) and _has_atom_site(path)

    def _parser(self) -> Any:
        from Bio.PDB import MMCIFParser

        return MMCIFParser(QUIET=True)


def _has_atom_site(path: Path) -> bool:
    """mmCIF (macromolecule) or small-molecule/crystal CIF? Sniff the first 256 kB for ``_atom_site.``."""
    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as fh:
            head = fh.read(1 << 18)
    except OSError:
        return False
    return b"_atom_site.group_PDB" in head or b"_atom_site.label_comp_id" in head
