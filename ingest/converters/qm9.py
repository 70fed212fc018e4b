"""QM9 as shipped in the ``qm9pack`` CSVs: a dataset-specific converter (labels in eV with units)."""
from __future__ import annotations

import ast
import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ingest.plugin import Converter, Reject, owned
from shards.format.schema import NO_PBC, ZERO_CELL, AtomGraph, make_key

HARTREE_EV = 27.211386245988
# CSV column -> (property name, factor to the stored unit, unit)
LABELS = {
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
MAX_FIELD = 1 << 20


@dataclass(frozen=True)
class QM9Options:
    """Which labels to store (CSV column names; default all in ``LABELS``)."""

    labels: tuple[str, ...] = tuple(LABELS)


class QM9CSVConverter(Converter):
    """QM9 CSV rows (Elements, XYZ_Ang, labels) -> molecules with properties in eV."""

    name = "qm9csv"
    domain = "molecule"
    suffixes = (".csv",)
    default_source = "qm9"
    Options = QM9Options

    def can_convert(self, path: Path) -> bool:
        if not path.name.lower().endswith(".csv") or not path.is_file():
            return False
        with open(path, "rb") as fh:
            head = fh.readline(4096)
        return b"XYZ_Ang" in head and b"Elements" in head

    def count_records(self, path: Path, options: QM9Options) -> int | None:
        with open(path, newline="") as fh:
            return sum(1 for _ in csv.reader(fh)) - 1

    def convert(self, path: Path, options: QM9Options, *, source: str, file_id: str,
                records: range | None = None) -> Iterator[AtomGraph | Reject]:
        unknown = set(options.labels) - set(LABELS)
        if unknown:
            yield self.reject(file_id, None, f"unknown QM9 label columns {sorted(unknown)}")
            return
        csv.field_size_limit(MAX_FIELD)
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"Elements", "XYZ_Ang"} - set(reader.fieldnames or ())
            if missing:
                yield self.reject(file_id, None, f"not a QM9 CSV: missing columns {sorted(missing)}")
                return
            for i, row in enumerate(reader):
                if records is not None:
                    if i < records.start:
                        continue
                    if i >= records.stop:
                        break
                yield self.build(file_id, i, lambda row=row, i=i: self._graph(row, i, options, source, file_id))

    def _graph(self, row: dict, i: int, options: QM9Options, source: str, file_id: str) -> AtomGraph:
        symbols = json.loads(row["Elements"].replace("'", '"'))  # a Python-literal list of symbols
        coords = ast.literal_eval(row["XYZ_Ang"])  # not strict JSON: "0." occurs
        unknown = [s for s in symbols if s not in SYMBOLS]
        if unknown:
            raise ValueError(f"unknown element symbols {unknown}")
        props, units = {}, {}
        for col in options.labels:
            name, factor, unit = LABELS[col]
            props[name] = float(row[col]) * factor
            units[name] = unit
        return AtomGraph(key=make_key(source, file_id, i), domain="molecule", source=source, source_file=file_id,
                         index=i, atomic_numbers=owned([SYMBOLS[s] for s in symbols], np.uint8),
                         positions=owned(coords, np.float32), cell=ZERO_CELL,
                         pbc=NO_PBC, charge=0, spin=1, properties=props, property_units=units)

