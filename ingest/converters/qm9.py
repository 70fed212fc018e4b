"""QM9 as shipped in the ``qm9pack`` CSVs: a dataset-specific converter (labels in eV with units).

The rows are read and turned into records by :mod:`shards.format.qm9`, the one QM9 reader (the
studies' ``ingest: builtin`` path uses it too); this module adds the converter's contract: record
ranges, one reject per bad row, the label choice as options.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ingest.plugin import Converter, Reject
from shards.format.qm9 import LABELS, NotQM9Error, count_rows, looks_like_qm9, qm9_graph, read_rows
from shards.format.schema import AtomGraph, make_key


@dataclass(frozen=True)
class QM9Options:
    """Which labels to store (CSV column names; default all in ``shards.format.qm9.LABELS``)."""

    labels: tuple[str, ...] = tuple(LABELS)


class QM9CSVConverter(Converter):
    """QM9 CSV rows (Elements, XYZ_Ang, labels) -> molecules with properties in eV."""

    name = "qm9csv"
    domain = "molecule"
    suffixes = (".csv",)
    default_source = "qm9"
    Options = QM9Options

    suffix_gated = True

    def can_convert(self, path: Path) -> bool:
        return looks_like_qm9(path)

    def count_records(self, path: Path, options: QM9Options) -> int | None:
        return count_rows(path)

    def convert(self, path: Path, options: QM9Options, *, source: str, file_id: str,
                records: range | None = None) -> Iterator[AtomGraph | Reject]:
        unknown = set(options.labels) - set(LABELS)
        if unknown:
            yield self.reject(file_id, None, f"unknown QM9 label columns {sorted(unknown)}")
            return
        try:
            for i, row in read_rows(path, records):
                yield self.build(file_id, i, lambda row=row, i=i: qm9_graph(
                    row, key=make_key(source, file_id, i), source=source, source_file=file_id, index=i,
                    labels=options.labels))
        except NotQM9Error as exc:
            yield self.reject(file_id, None, str(exc))
