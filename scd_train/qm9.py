"""A minimal reader of the data kit's QM9 CSVs into labelled ``AtomGraph`` records.

Tests and the study's ``ingest: builtin`` fallback use it; the study's default path is the ingest
pipeline (``scd ingest run`` with the ``qm9csv`` converter). Labels are stored in eV.
"""
from __future__ import annotations

import ast
import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from shards.format.schema import AtomGraph

HARTREE_EV = 27.211386245988
_SYMBOLS = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
_LABELS = {"homo": "HOMO_au", "lumo": "LUMO_au", "gap": "HOMO_LUMO_gap_au"}


def iter_qm9_csv(path: str | Path, max_records: int | None = None) -> Iterator[AtomGraph]:
    """Yield the first ``max_records`` molecules of a QM9 CSV with homo/lumo/gap (eV) as properties."""
    csv.field_size_limit(1 << 24)
    with open(path, newline="") as fh:
        for i, row in enumerate(csv.DictReader(fh)):
            if max_records is not None and i >= max_records:
                return
            symbols = ast.literal_eval(row["Elements"])
            pos = np.asarray(ast.literal_eval(row["XYZ_Ang"]), dtype=np.float32).reshape(-1, 3)
            idx = int(row["Index"])
            yield AtomGraph(
                key=f"qm9-{idx:06d}", domain="molecule", source="qm9", source_file=Path(path).name, index=idx,
                atomic_numbers=np.array([_SYMBOLS[s] for s in symbols], dtype=np.uint8), positions=pos,
                cell=np.zeros((3, 3)), pbc=np.zeros(3, dtype=bool),
                properties={k: float(row[c]) * HARTREE_EV for k, c in _LABELS.items()},
                property_units={k: "eV" for k in _LABELS})
