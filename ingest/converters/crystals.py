"""Periodic crystal converters (pymatgen): CIF (one sample per data block), POSCAR/CONTCAR, pymatgen JSON."""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ingest.plugin import Converter, InputBounds, Reject, open_input, owned, read_head
from shards.format.schema import AtomGraph, make_key

MAX_JSON_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class CrystalOptions(InputBounds):
    """``cell``: as given, primitive or conventional standard cell. Partially occupied (disordered)
    structures are rejected unless ``order: majority`` (each site takes its majority species).
    Physically impossible structures are rejected: a cell length under ``min_cell_length`` (Å), a degenerate
    (flat) cell, a CIF cell length or angle out of range, or two atoms (or an atom and its own periodic image)
    closer than ``min_distance`` (Å) after wrapping, by minimum image. The defaults accept every real crystal
    of the data kit (shortest cell length there 2.1 Å, shortest distance 0.65 Å)."""

    cell: Literal["as_is", "primitive", "conventional"] = "as_is"
    order: Literal["reject", "majority"] = "reject"
    symprec: float = 0.01
    min_cell_length: float = 1.0
    min_distance: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.min_cell_length >= 0 and self.min_distance >= 0):
            raise ValueError("min_cell_length and min_distance must be >= 0")


FLAT_CELL = 1e-3  # volume / (a b c) below this: the cell vectors are (nearly) coplanar
NEIGHBOUR_TOL = 1e-8  # Å: pymatgen's default; an atom's own image closer than this is the atom itself


def check_physical(cell: np.ndarray, positions: np.ndarray, pbc: np.ndarray, options: CrystalOptions) -> None:
    """Raise ValueError (the reject reason) when a crystal of these cell vectors (rows, Å), Cartesian positions (Å)
    and periodic axes cannot be real. Distances are by minimum image, so they are the same before and after
    wrapping."""
    # nine numbers: Python floats, a tenth of numpy's cost per call on a 3x3
    (a1, a2, a3), (b1, b2, b3), (c1, c2, c3) = rows = cell.tolist()
    if not all(map(math.isfinite, (a1, a2, a3, b1, b2, b3, c1, c2, c3))):
        raise ValueError("non-finite cell vectors")
    abc = [math.hypot(*row) for row in rows]
    if min(abc) < options.min_cell_length:
        raise ValueError(f"cell length {min(abc):.4g} Å is below min_cell_length {options.min_cell_length} Å")
    volume = abs(a1 * (b2 * c3 - b3 * c2) - a2 * (b1 * c3 - b3 * c1) + a3 * (b1 * c2 - b2 * c1))
    if volume < FLAT_CELL * abc[0] * abc[1] * abc[2]:
        raise ValueError(f"degenerate cell: volume {volume:.4g} Å^3 for cell lengths {[round(x, 4) for x in abc]} Å")
    if options.min_distance > 0 and len(positions):
        from pymatgen.optimization.neighbors import find_points_in_spheres

        # pymatgen's own neighbour search (Structure.get_neighbor_list calls it), given the arrays at hand
        centre, other, _, d = find_points_in_spheres(positions, positions, r=options.min_distance,
                                                     pbc=pbc.astype(np.int64), lattice=cell, tol=NEIGHBOUR_TOL)
        pair = (centre != other) | (d > NEIGHBOUR_TOL)  # an atom is no neighbour of itself
        if pair.any():  # the closest pair, lower index first, the same whichever image each atom was given
            centre, other, d = centre[pair], other[pair], d[pair]
            lo, hi = np.minimum(centre, other), np.maximum(centre, other)
            k = int(np.lexsort((hi, lo, np.round(d, 9)))[0])
            raise ValueError(f"atoms {int(lo[k])} and {int(hi[k])} are {float(d[k]):.4g} Å apart (minimum "
                             f"image, after wrapping), below min_distance {options.min_distance} Å")


_NUMBER = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(?:\(\d+\))?\s*$")


def check_cif_cell(data: Any) -> None:
    """Raise ValueError when a CIF block's cell lengths are not positive or its angles not in (0, 180)."""
    for axis in "abc":
        value = _cif_number(data.get(f"_cell_length_{axis}"))
        if value is not None and not value > 0:
            raise ValueError(f"_cell_length_{axis} is {value}: cell lengths must be positive")
    for angle in ("alpha", "beta", "gamma"):
        value = _cif_number(data.get(f"_cell_angle_{angle}"))
        if value is not None and not 0 < value < 180:
            raise ValueError(f"_cell_angle_{angle} is {value}: angles must lie in (0, 180) degrees")


def _cif_number(value: Any) -> float | None:
    """A CIF number (standard uncertainty in brackets allowed); None when absent or not a number."""
    match = _NUMBER.match(value) if isinstance(value, str) else None
    return float(match.group(1)) if match else None


def prepare(structure: Any, options: CrystalOptions) -> Any:
    """Apply ordering and the cell choice (the structure itself when neither changes it)."""
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
    return s


def crystal_graph(s: Any, *, key: str, source: str, source_file: str, index: int,
                  options: CrystalOptions | None = None) -> AtomGraph:
    """The record of an ordered periodic structure, its fractional coordinates wrapped into [0, 1) (read once
    from the structure, without building a wrapped copy of it); with ``options``, :func:`check_physical` first."""
    lattice = s.lattice
    frac = np.mod(s.frac_coords, 1.0)
    frac[frac >= 1.0 - 1e-12] = 0.0
    cell = np.array(lattice.matrix, dtype=np.float64)  # a copy: pymatgen keeps its own
    pbc = np.asarray(lattice.pbc, dtype=bool)
    # row by row, as pymatgen computes a site's Cartesian coordinates: one matrix product of all rows can
    # round differently near 0, and a record's bytes would then depend on how it was computed
    positions = np.array([np.dot(f, cell) for f in frac]) if len(frac) else np.empty((0, 3))
    if options is not None:
        check_physical(cell, positions, pbc, options)
    charge = s.charge
    cell.flags.writeable = False  # fresh arrays no one else holds: the validator keeps them as they are
    pbc.flags.writeable = False
    return AtomGraph(key=key, domain="crystal", source=source, source_file=source_file, index=index,
                     atomic_numbers=np.asarray(s.atomic_numbers), positions=owned(positions, np.float32), cell=cell,
                     pbc=pbc, charge=int(round(charge)) if charge else None)


class _Crystal(Converter):
    domain = "crystal"
    Options = CrystalOptions

    def _graph(self, structure: Any, i: int, options: CrystalOptions, source: str, file_id: str) -> AtomGraph:
        return crystal_graph(prepare(structure, options), key=make_key(source, file_id, i), source=source,
                             source_file=file_id, index=i, options=options)


class CIFConverter(_Crystal):
    """Crystallographic CIFs (COD, ICSD, Materials Project); several data blocks give several samples."""

    name = "cif"
    suffixes = (".cif", ".cif.gz")
    default_source = "cif"

    suffix_gated = True

    def can_convert(self, path: Path) -> bool:
        from ingest.converters.proteins import has_atom_site

        return super().can_convert(path) and not has_atom_site(path)

    def convert(self, path: Path, options: CrystalOptions, *, source: str, file_id: str,
                records: range | None = None) -> Iterator[AtomGraph | Reject]:
        import warnings

        from pymatgen.io.cif import CifFile, CifParser

        with open_input(path, options, text=True) as fh:
            text = fh.read()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                parser = CifParser.from_str(text, check_cif=False)
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                parser = None  # the block-by-block path below gives each block its own reject
        whole = parser.as_dict() if parser is not None else {}
        if len(whole) == 1 and (records is None or 0 in records):
            # one block, the usual case: the file is parsed once (the block-by-block path parses it twice)
            def single() -> AtomGraph:
                check_cif_cell(next(iter(whole.values())))
                return self._graph(_parsed(parser), 0, options, source, file_id)

            yield self.build(file_id, 0, single)
            return
        blocks = list(CifFile.from_str(text).data.values())
        if not blocks:
            yield self.reject(file_id, None, "no data blocks in the CIF")
            return
        for i, block in enumerate(blocks):
            if records is not None and i not in records:
                continue

            def make(block: Any = block, i: int = i) -> AtomGraph:
                check_cif_cell(block.data)
                return self._graph(_parsed(str(block)), i, options, source, file_id)

            yield self.build(file_id, i, make)


def _parsed(cif: Any) -> Any:
    """The structure of a one-block CIF, given as its text or its parser (pymatgen's warnings silenced; its
    errors raised). Parsers are made with ``check_cif=False``: that check of the structure against the CIF's
    formula only warns, and the warning is dropped here (3% of a small CIF's parse)."""
    import warnings

    from pymatgen.io.cif import CifParser

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parser = CifParser.from_str(cif, check_cif=False) if isinstance(cif, str) else cif
        structures = parser.parse_structures(primitive=False, on_error="raise")
    if not structures:
        raise ValueError("pymatgen found no structure in the block")
    return structures[0]


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
        with open_input(path, options, text=True) as fh:
            text = fh.read()
        yield self.build(file_id, 0, lambda: self._graph(Poscar.from_str(text).structure, 0, options, source, file_id))


class PymatgenJSONConverter(_Crystal):
    """``Structure.as_dict()`` JSON (one structure, or a list of them); never pickle."""

    name = "pymatgen_json"
    suffixes = (".json", ".json.gz")
    default_source = "pymatgen"

    suffix_gated = True

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
        with open_input(path, options, text=True) as fh:
            doc = json.load(fh)
        docs = doc if isinstance(doc, list) else [doc]
        for i, d in enumerate(docs):
            if records is not None and i not in records:
                continue
            yield self.build(file_id, i, lambda d=d, i=i: self._graph(Structure.from_dict(d), i, options, source,
                                                                      file_id))
