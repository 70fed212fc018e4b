"""Periodic crystal converters (pymatgen): CIF (one sample per data block), POSCAR/CONTCAR, pymatgen JSON."""
from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ingest.plugin import Converter, Reject, read_head
from shards.schema import AtomGraph, make_key

MAX_JSON_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class CrystalOptions:
    """``cell``: as given, primitive or conventional standard cell. Partially occupied (disordered)
    structures are rejected unless ``order: majority`` (each site takes its majority species)."""

    cell: Literal["as_is", "primitive", "conventional"] = "as_is"
    order: Literal["reject", "majority"] = "reject"
    symprec: float = 0.01


def prepare(structure: Any, options: CrystalOptions) -> Any:
    """Apply ordering and the cell choice; wrap fractional coordinates into [0, 1)."""
    from pymatgen.core import Structure

    s = structure
    if not s.is_ordered:
        if options.order == "reject":
            raise ValueError("disordered structure (partial occupancies); set order: majority to keep it")
        s = Structure(s.lattice, [max(site.species.items(), key=lambda kv: (kv[1], str(kv[0])))[0] for site in s],
                      s.frac_coords)
    if options.cell != "as_is":
        from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

        sga = SpacegroupAnalyzer(s, symprec=options.symprec)
        s = sga.get_primitive_standard_structure() if options.cell == "primitive" \
            else sga.get_conventional_standard_structure()
    frac = np.mod(s.frac_coords, 1.0)
    frac[frac >= 1.0 - 1e-12] = 0.0
    return Structure(s.lattice, s.species, frac, charge=s.charge)


class _Crystal(Converter):
    domain = "crystal"
    Options = CrystalOptions

    def _graph(self, structure: Any, i: int, options: CrystalOptions, source: str, file_id: str) -> AtomGraph:
        s = prepare(structure, options)
        return AtomGraph.from_pymatgen(s, key=make_key(source, file_id, i), domain="crystal", source=source,
                                       source_file=file_id, index=i)


class CIFConverter(_Crystal):
    """Crystallographic CIFs (COD, ICSD, Materials Project); several data blocks give several samples."""

    name = "cif"
    suffixes = (".cif", ".cif.gz")
    default_source = "cif"

    def can_convert(self, path: Path) -> bool:
        from ingest.converters.proteins import _has_atom_site

        return super().can_convert(path) and not _has_atom_site(path)

    def convert(self, path: Path, options: CrystalOptions, *, source: str, file_id: str,
                records: range | None = None) -> Iterator[AtomGraph | Reject]:
        import warnings

        from pymatgen.io.cif import CifFile, CifParser

        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rt", errors="replace") as fh:
            text = fh.read()
        blocks = list(CifFile.from_str(text).data.values())
        if not blocks:
            yield self.reject(file_id, None, "no data blocks in the CIF")
            return
        for i, block in enumerate(blocks):
            if records is not None and i not in records:
                continue

            def make(block: Any = block, i: int = i) -> AtomGraph:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    structures = CifParser.from_str(str(block)).parse_structures(primitive=False, on_error="raise")
                if not structures:
                    raise ValueError("pymatgen found no structure in the block")
                return self._graph(structures[0], i, options, source, file_id)

            yield self.build(file_id, i, make)


class POSCARConverter(_Crystal):
    """VASP POSCAR / CONTCAR files."""

    name = "poscar"
    suffixes = (".vasp", ".poscar")
    default_source = "vasp"

    def can_convert(self, path: Path) -> bool:
        up = path.name.upper()
        return super().can_convert(path) or up.startswith(("POSCAR", "CONTCAR"))

    def convert(self, path: Path, options: CrystalOptions, *, source: str, file_id: str,
                records: range | None = None) -> Iterator[AtomGraph | Reject]:
        from pymatgen.io.vasp import Poscar

        if records is not None and 0 not in records:
            return
        yield self.build(file_id, 0, lambda: self._graph(Poscar.from_file(str(path), check_for_potcar=False).structure,
                                                         0, options, source, file_id))


class PymatgenJSONConverter(_Crystal):
    """``Structure.as_dict()`` JSON (one structure, or a list of them); never pickle."""

    name = "pymatgen_json"
    suffixes = (".json", ".json.gz")
    default_source = "pymatgen"

    def can_convert(self, path: Path) -> bool:
        if not super().can_convert(path):
            return False
        head = read_head(path, 1 << 16)
        return b'"lattice"' in head and b'"sites"' in head

    def convert(self, path: Path, options: CrystalOptions, *, source: str, file_id: str,
                records: range | None = None) -> Iterator[AtomGraph | Reject]:
        from pymatgen.core import Structure

        if path.stat().st_size > MAX_JSON_BYTES:
            yield self.reject(file_id, None, f"JSON larger than {MAX_JSON_BYTES} bytes")
            return
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rt") as fh:
            doc = json.load(fh)
        docs = doc if isinstance(doc, list) else [doc]
        for i, d in enumerate(docs):
            if records is not None and i not in records:
                continue
            yield self.build(file_id, i, lambda d=d, i=i: self._graph(Structure.from_dict(d), i, options, source,
                                                                      file_id))
