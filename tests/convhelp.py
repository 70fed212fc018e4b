"""Helpers shared by the converter tests: run a converter by name and split samples from rejects."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ingest.plugin import Reject, safe_convert
from ingest.registry import get_converter
from scd_train.datakit import package_dir
from shards.format.schema import AtomGraph


def convert(name: str, path: str | Path, options: dict[str, Any] | None = None,
            records: range | None = None) -> tuple[list[AtomGraph], list[Reject]]:
    conv = get_converter(name)()
    items = list(safe_convert(conv, Path(path), conv.parse_options(options or {}), source="test",
                              file_id=Path(path).name, records=records))
    return [g for g in items if isinstance(g, AtomGraph)], [r for r in items if isinstance(r, Reject)]


def mda_data() -> Path:
    import MDAnalysisTests.datafiles as d

    return Path(d.PDB_small).parent


def rdkit_file(rel: str) -> Path:
    return package_dir("rdkit") / rel
