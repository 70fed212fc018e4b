"""Protein converters (Biopython): PDB and mmCIF, gzipped or not. One sample per model."""
from __future__ import annotations

import functools
import io
import operator
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ingest.plugin import Converter, InputBounds, Reject, open_input, owned, read_head
from shards.format.schema import NO_PBC, ZERO_CELL, AtomGraph, make_key


@dataclass(frozen=True)
class ProteinOptions(InputBounds):
    """``models``: first model only, or every model as its own sample (NMR ensembles).
    Alternate locations: the highest-occupancy one (Biopython's selection). ``residue_index`` is a running
    residue number per model, so residues with insertion codes (52, 52A) stay distinct. ``hydrogens``, ``waters``
    and ``hetero`` (ligands and ions) are kept or dropped. Atoms without an element column get one
    inferred from the atom name when ``infer_elements``, else the model is rejected.
    Biopython keeps one atom per identity (chain, residue, atom name, altloc) and stops reading a PDB file at
    ``END``: a model of which the parser kept fewer atoms than the file has atom records is rejected with both
    counts, or, with ``repeated_atoms: split`` (PDB only), each run of records up to a repeated identity or a
    residue number reused for another residue (and each model) is its own record and sample."""

    models: Literal["first", "all"] = "first"
    hydrogens: bool = True
    waters: bool = False
    hetero: bool = True
    infer_elements: bool = True
    repeated_atoms: Literal["reject", "split"] = "reject"


@functools.lru_cache(maxsize=4096)
def _guess_element(name: str, resname: str) -> int:
    """Element from an atom name when the file has none: a one-atom residue named like an element is that
    ion (CA in residue CA is calcium); otherwise MDAnalysis' name rules (CA -> C, HT1 -> H, 1HB -> H)."""
    from ase.data import atomic_numbers

    name, resname = name.strip(), resname.strip()
    if name == resname and name.capitalize() in atomic_numbers:
        return atomic_numbers[name.capitalize()]
    sym = _guesser().guess_atom_element(name).capitalize()
    if sym not in atomic_numbers or sym == "X":
        raise ValueError(f"cannot infer the element of atom {name!r}")
    return atomic_numbers[sym]


@functools.cache
def _guesser() -> Any:
    """One MDAnalysis guesser for the process (each instance is a reference cycle of its bound methods)."""
    from MDAnalysis.guesser.default_guesser import DefaultGuesser

    return DefaultGuesser(None)


@functools.lru_cache(maxsize=1 << 16)
def _element_number(column: str, name: str, resname: str, has_elements: bool, infer: bool) -> int:
    """The atomic number of an atom from its element column (as Biopython keeps it), or, when the file has no
    element column, inferred from its name (``infer``; 0 when not)."""
    from ase.data import atomic_numbers

    el = (column or "").strip().capitalize()
    if has_elements and el in ("D", "T"):
        return 1
    if has_elements and el in atomic_numbers and el != "X":
        return atomic_numbers[el]
    return _guess_element(name, resname) if infer else 0


class _Structure(Converter):
    """Shared model walk of the PDB and mmCIF converters."""

    domain = "protein"
    default_source = "pdb"
    Options = ProteinOptions

    def _parse(self, path: Path, text: str) -> tuple[Any, list[int], tuple[bool, list[str]]]:
        """(Biopython structure, atom records per model as the file holds them, (does every atom record carry
        an element, the unknown element symbols)). PDB columns 77-78 may be blank, and Biopython silently
        replaces an unknown symbol by a guess from the atom name."""
        raise NotImplementedError

    def _split(self, text: str, options: ProteinOptions) -> str:
        raise ValueError(f"repeated_atoms: split is not available for {self.name} files")

    def _read(self, path: Path, options: ProteinOptions) -> str:
        with open_input(path, options, text=True) as fh:
            return fh.read()

    def convert(self, path: Path, options: ProteinOptions, *, source: str, file_id: str,
                records: range | None = None) -> Iterator[AtomGraph | Reject]:
        text = self._read(path, options)
        if options.repeated_atoms == "split":
            text = self._split(text, options)
        structure, in_file, elements = self._parse(path, text)
        try:
            yield from self._models(structure, records, in_file, elements, options, source, file_id)
        finally:
            release(structure)

    def _models(self, structure: Any, records: range | None, in_file: list[int], elements: tuple[bool, list[str]],
                options: ProteinOptions, source: str, file_id: str) -> Iterator[AtomGraph | Reject]:
        """One sample or reject per wanted model of a parsed file."""
        has_elements, unknown = elements
        models = list(structure)
        n_made = len(models)
        if not models or not any(True for _ in models[0].get_atoms()):
            yield self.reject(file_id, None, "no models / atoms in the file")
            return
        if options.models == "first" and options.repeated_atoms == "reject":  # split runs are of the chosen models
            models = models[:1]
        for i in records if records is not None else range(len(models)):
            if i >= len(models):
                yield self.reject(file_id, i, f"model {i} beyond the {len(models)} selected model(s)")
                continue
            if unknown:
                yield self.reject(file_id, i, f"unknown element symbols {unknown[:5]}")
                continue
            kept, n = _unpacked_atoms(models[i]), _records_of(in_file, i, n_made)
            if kept != n:
                yield self.reject(file_id, i, f"the parser kept {kept} of the {n} atom records of model {i} "
                                  "(it discards repeated atom or residue identities and records after END); "
                                  "set repeated_atoms: split to read each run of distinct atoms as its own sample")
                continue
            yield self.build(file_id, i, lambda m=models[i], i=i: self._graph(m, i, options, has_elements,
                                                                            source, file_id))

    def _graph(self, model: Any, i: int, options: ProteinOptions, has_elements: bool, source: str,
               file_id: str) -> AtomGraph:
        """One model as a sample."""
        kept: list[tuple[int, Any]] = []
        # model.get_residues() in its order, read from the child lists (Entity iterators cost a call per item)
        residues = (r for c in model.child_list for r in c.child_list)
        for r_no, residue in enumerate(residues):
            flag = residue.id[0]
            if flag == "W" and not options.waters:
                continue
            if flag.startswith("H_") and not options.hetero:
                continue
            kept.append((r_no, residue))
        atoms = [a for _, r in kept for a in r.child_list]
        if not atoms:
            raise ValueError("no atoms left after the selection")
        get = operator.attrgetter
        sizes = [len(r.child_list) for _, r in kept]
        resnames = [r.resname[:4] for _, r in kept]
        z = _atomic_numbers(kept, atoms, has_elements, options.infer_elements)
        columns = {
            "positions": np.concatenate(list(map(get("coord"), atoms)), dtype=np.float32).reshape(-1, 3),
            "atom_name": np.array(list(map(get("name"), atoms)), dtype="S4"),  # S4 keeps 4 characters
            "residue_index": np.repeat(np.array([r_no for r_no, _ in kept], dtype=np.int32), sizes),
            "residue_name": np.repeat(np.array(resnames, dtype="S4"), sizes),
            "chain": np.repeat(np.array([str(r.get_parent().id)[:4] for _, r in kept], dtype="S4"), sizes),
            "hetero": np.repeat(np.array([r.id[0] != " " for _, r in kept], dtype=bool), sizes),
        }
        if not options.hydrogens:
            heavy = z != 1
            if not heavy.any():
                raise ValueError("no atoms left after the selection")
            z, columns = z[heavy], {k: v[heavy] for k, v in columns.items()}
        return AtomGraph(key=make_key(source, file_id, i), domain="protein", source=source, source_file=file_id,
                         index=i, atomic_numbers=owned(z, np.uint8), cell=ZERO_CELL, pbc=NO_PBC,
                         positions=owned(columns["positions"], np.float32), atom_name=owned(columns["atom_name"], "S4"),
                         residue_index=owned(columns["residue_index"], np.int32),
                         residue_name=owned(columns["residue_name"], "S4"), chain=owned(columns["chain"], "S4"),
                         hetero=owned(columns["hetero"], bool))


@functools.cache
def _symbol_numbers() -> dict[str, int]:
    """Atomic numbers by element column as Biopython keeps it (upper case): every element but X, and D, T as H."""
    from ase.data import atomic_numbers

    table = {sym.upper(): z for sym, z in atomic_numbers.items() if sym != "X" and z > 0}
    return {**table, "D": 1, "T": 1}


def _atomic_numbers(kept: list[tuple[int, Any]], atoms: list[Any], has_elements: bool, infer: bool) -> np.ndarray:
    """The atomic numbers of ``atoms``, the atoms of the ``kept`` (number, residue) pairs: by their element column
    in one lookup per atom when the file has elements and all are known symbols, else atom by atom."""
    if has_elements:
        table = _symbol_numbers()
        try:
            return np.array(list(map(table.__getitem__, map(operator.attrgetter("element"), atoms))), dtype=np.uint8)
        except KeyError:
            pass
    z = np.array([_element_number(a.element, a.name, r.resname, has_elements, infer)
                  for _, r in kept for a in r.child_list], dtype=np.uint8)
    if not z.all():
        atom = atoms[int(np.argmin(z))]
        raise ValueError(f"atom {atom.get_name()!r} of residue {atom.get_parent().id[1]} has no element "
                         "(set infer_elements: true to infer it from the atom name)")
    return z


_COORDINATES = re.compile(r"^(?:ATOM  |HETATM|MODEL )", re.MULTILINE)


class PDBConverter(_Structure):
    """PDB files (.pdb, .ent, gzipped or not)."""

    name = "pdb"
    suffixes = (".pdb", ".pdb.gz", ".ent", ".ent.gz")

    def _parse(self, path: Path, text: str) -> tuple[Any, list[int], tuple[bool, list[str]]]:
        from ase.data import atomic_numbers
        from Bio.PDB import PDBParser

        # Biopython hands the lines before the first atom or model record to its header parser, which the
        # records never use; they are left out (a tenth of the parse of a small file, more for a long header)
        first = _COORDINATES.search(text)
        coordinates = text[first.start():] if first else text
        structure = PDBParser(QUIET=True).get_structure(path.stem, io.StringIO(coordinates))
        counts, columns = _pdb_scan(coordinates.splitlines())
        symbols = {c.strip().capitalize() for c in columns}
        unknown = sorted(s for s in symbols if s and (s not in atomic_numbers or s == "X") and s not in ("D", "T"))
        return structure, counts, ("" not in symbols, unknown)

    def _split(self, text: str, options: ProteinOptions) -> str:
        return _split_repeats(text.splitlines(), options.models == "first")

    def count_records(self, path: Path, options: ProteinOptions) -> int | None:
        if options.repeated_atoms == "split":
            return len(_pdb_scan(self._split(self._read(path, options), options).splitlines())[0])
        if options.models == "first":
            return 1
        return max(len(_pdb_scan(self._read(path, options).splitlines())[0]), 1)


class MMCIFConverter(_Structure):
    """mmCIF files (.cif, .mmcif, gzipped or not) holding macromolecular models (``_atom_site``)."""

    name = "mmcif"
    suffixes = (".mmcif", ".mmcif.gz", ".cif", ".cif.gz")

    suffix_gated = True

    def can_convert(self, path: Path) -> bool:
        return super().can_convert(path) and has_atom_site(path)

    def _parse(self, path: Path, text: str) -> tuple[Any, list[int], tuple[bool, list[str]]]:
        from Bio.PDB import MMCIFParser

        builder = _counting_builder()()
        structure = MMCIFParser(structure_builder=builder, QUIET=True, PERMISSIVE=True).get_structure(
            path.stem, io.StringIO(text))
        return structure, [builder.records.get(m.id, 0) for m in structure], (True, [])


def has_atom_site(path: Path) -> bool:
    """mmCIF (macromolecule) or small-molecule/crystal CIF? Sniff the first 256 kB for ``_atom_site.``."""
    head = read_head(path, 1 << 18)
    return b"_atom_site.group_PDB" in head or b"_atom_site.label_comp_id" in head


def _pdb_scan(lines: list[str]) -> tuple[list[int], set[str]]:
    """ATOM/HETATM records per model, models numbered as Biopython does (each MODEL record, or an atom record
    outside an open model, starts one), all records counted, including those after END; and the distinct
    element columns (77-78, as written) of those records."""
    counts: list[int] = []
    columns: set[str] = set()
    open_model = False
    for line in lines:
        rec = line[:6]
        if rec in ("ATOM  ", "HETATM"):
            if not open_model:
                counts.append(0)
                open_model = True
            counts[-1] += 1
            columns.add(line[76:78])
        elif rec == "MODEL ":
            counts.append(0)
            open_model = True
        elif rec == "ENDMDL":
            open_model = False
    return counts, columns


def _split_repeats(lines: list[str], first_model_only: bool) -> str:
    """The atom records as a PDB text of one MODEL per run of records in which, as Biopython identifies them, no
    atom repeats (chain, residue, atom name, altloc) and no residue number is reused for another residue name
    (outside alternate locations); a new model of the file starts a new run. Other records are left out."""
    runs: list[list[str]] = []
    seen: set[str] = set()
    residues: dict[str, str] = {}
    open_model, models = False, 0
    for line in lines:
        rec = line[:6]
        if rec in ("ATOM  ", "HETATM"):
            if not open_model:
                open_model, models = True, models + 1
                seen, residues = set(), {}
                runs.append([])
            if first_model_only and models > 1:
                break
            resname, altloc = line[17:20].strip(), line[16:17]
            field = " " if rec == "ATOM  " else "W" if resname in ("HOH", "WAT") else "H_" + resname
            res_key = field + line[21:27]
            atom_key = res_key + line[12:16] + altloc
            prior = residues.get(res_key, resname)
            if atom_key in seen or (prior != resname and altloc in ("", " ")):
                seen, residues = set(), {}
                runs.append([])
            seen.add(atom_key)
            residues.setdefault(res_key, resname)
            runs[-1].append(line)
        elif rec == "MODEL ":
            if first_model_only and models:
                break
            open_model, models = True, models + 1
            seen, residues = set(), {}
            runs.append([])
        elif rec == "ENDMDL":
            open_model = False
    return "".join(f"MODEL {k + 1:8d}\n" + "\n".join(run) + "\nENDMDL\n" for k, run in enumerate(r for r in runs if r))


def release(structure: Any) -> None:
    """Break the parent/child reference cycles of a Biopython structure that is no longer used, so that it is
    freed when dropped rather than left to Python's cyclic garbage collector, whose full passes over a big process
    (a Ray worker) cost about a sixth of the conversion of a small PDB file. Atoms keep their parent; every
    structure, model, chain and residue (also each residue of a point mutation) loses its children."""
    from Bio.PDB.Entity import DisorderedEntityWrapper

    stack = [structure]
    while stack:
        entity = stack.pop()
        if isinstance(entity, DisorderedEntityWrapper):  # forwards attributes to one child: reach all of them
            stack.extend(entity.child_dict.values())
            continue
        if entity.level != "R":
            stack.extend(entity.child_list)
        entity.child_list, entity.child_dict = [], {}


def _unpacked_atoms(model: Any) -> int:
    """Atoms of a model including every alternate location and every residue of a point mutation (a residue
    without alternate locations holds its atoms as they are)."""
    return sum(len(res.get_unpacked_list()) if res.is_disordered() else len(res.child_list)
               for chain in model.child_list for res in chain.get_unpacked_list())


def _records_of(in_file: list[int], i: int, n_models: int) -> int:
    """Atom records of model ``i`` in the file; records of models the parser never made count to its last."""
    n = in_file[i] if i < len(in_file) else 0
    return n + sum(in_file[n_models:]) if i == n_models - 1 else n


@functools.cache
def _counting_builder() -> type:
    """A Biopython StructureBuilder that counts the atom records it is handed, per model id."""
    from Bio.PDB.StructureBuilder import StructureBuilder

    class CountingBuilder(StructureBuilder):
        def __init__(self) -> None:
            super().__init__()
            self.records: dict[int, int] = {}

        def init_atom(self, *args: Any, **kwargs: Any) -> None:
            self.records[self.model.id] = self.records.get(self.model.id, 0) + 1
            super().init_atom(*args, **kwargs)

    return CountingBuilder
