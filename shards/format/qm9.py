"""QM9 as shipped in the data kit's ``qm9pack`` CSVs: the one reader of its rows and its constants.

Ingest's ``qm9csv`` converter and the studies' ``ingest: builtin`` path both build their records here,
so the label table (CSV column -> property, factor to the stored unit, unit) exists once. A row holds
``Elements`` (a Python-literal list of symbols), ``XYZ_Ang`` (coordinates, not strict JSON: ``0.``
occurs) and the label columns; labels are stored in eV where they are energies.
"""
from __future__ import annotations

import ast
import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from shards.format.schema import NO_PBC, ZERO_CELL, AtomGraph

__all__ = ["HARTREE_EV", "LABELS", "MAX_FIELD", "REQUIRED_COLUMNS", "SYMBOLS", "NotQM9Error", "count_rows",
           "iter_qm9_csv", "looks_like_qm9", "qm9_graph", "read_rows"]

HARTREE_EV = 27.211386245988
LABELS: dict[str, tuple[str, float, str]] = {
    "HOMO_au": ("homo", HARTREE_EV, "eV"),
    "LUMO_au": ("lumo", HARTREE_EV, "eV"),
    "HOMO_LUMO_gap_au": ("gap", HARTREE_EV, "eV"),
    "InternalEnergy_0K_au": ("u0", HARTREE_EV, "eV"),
    "InternalEnergy_298K_au": ("u298", HARTREE_EV, "eV"),
    "Enthalphy_298K_au": ("h298", HARTREE_EV, "eV"),
    "GibbsFreeEnergy_298K_au": ("g298", HARTREE_EV, "eV"),
    "ZPVE_au": ("zpve", HARTREE_EV, "eV"),
    "Dipole_debye": ("mu", 1.0, "D"),
    "Polarizability_bohr3": ("alpha", 1.0, "bohr^3"),
    "R2_bohr2": ("r2", 1.0, "bohr^2"),
    "Heatcapacity_Cv_cal_mol_K": ("cv", 1.0, "cal/mol/K"),
}
SYMBOLS = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
REQUIRED_COLUMNS = ("Elements", "XYZ_Ang")
MAX_FIELD = 1 << 20  # bytes of one CSV field (the largest coordinate list is far below)


class NotQM9Error(ValueError):
    """The CSV lacks the columns of a QM9 CSV."""


def looks_like_qm9(path: Path) -> bool:
    """True for a ``.csv`` file whose header names the required columns."""
    if not path.name.lower().endswith(".csv") or not path.is_file():
        return False
    with open(path, "rb") as fh:
        head = fh.readline(4096)
    return all(c.encode() in head for c in REQUIRED_COLUMNS)


def count_rows(path: str | Path) -> int:
    """Data rows of a QM9 CSV (records that span lines count once)."""
    csv.field_size_limit(MAX_FIELD)
    with open(path, newline="") as fh:
        return sum(1 for _ in csv.reader(fh)) - 1


def read_rows(path: str | Path, records: range | None = None) -> Iterator[tuple[int, dict[str, str]]]:
    """``(row number, row)`` of the rows in ``records`` (all when None); :class:`NotQM9Error` before any
    row when a required column is missing."""
    csv.field_size_limit(MAX_FIELD)
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = sorted(set(REQUIRED_COLUMNS) - set(reader.fieldnames or ()))
        if missing:
            raise NotQM9Error(f"not a QM9 CSV: missing columns {missing}")
        for i, row in enumerate(reader):
            if records is not None:
                if i < records.start:
                    continue
                if i >= records.stop:
                    break
            yield i, row


def qm9_graph(row: dict[str, str], *, key: str, source: str, source_file: str, index: int,
              labels: tuple[str, ...] = tuple(LABELS)) -> AtomGraph:
    """One row as a neutral singlet molecule with the ``labels`` columns as properties (ValueError on an
    element outside H, C, N, O, F or a malformed field)."""
    symbols = json.loads(row["Elements"].replace("'", '"'))
    unknown = [s for s in symbols if s not in SYMBOLS]
    if unknown:
        raise ValueError(f"unknown element symbols {unknown}")
    props: dict[str, Any] = {}
    units: dict[str, str] = {}
    for col in labels:
        name, factor, unit = LABELS[col]
        props[name] = float(row[col]) * factor
        units[name] = unit
    z = np.array([SYMBOLS[s] for s in symbols], dtype=np.uint8)
    pos = np.asarray(ast.literal_eval(row["XYZ_Ang"]), dtype=np.float32)
    z.flags.writeable = pos.flags.writeable = False
    return AtomGraph(key=key, domain="molecule", source=source, source_file=source_file, index=index,
                     atomic_numbers=z, positions=pos, cell=ZERO_CELL, pbc=NO_PBC, charge=0, spin=1,
                     properties=props, property_units=units)


def iter_qm9_csv(path: str | Path, max_records: int | None = None, *, source: str = "qm9") -> Iterator[AtomGraph]:
    """The first ``max_records`` molecules of a QM9 CSV keyed ``qm9-<Index, 6 digits>`` (the studies'
    ``ingest: builtin`` path and tests; the pipeline's ``qm9csv`` converter keys by file and row)."""
    name = Path(path).name
    for _, row in read_rows(path, None if max_records is None else range(max_records)):
        idx = int(row["Index"])
        yield qm9_graph(row, key=f"{source}-{idx:06d}", source=source, source_file=name, index=idx)
