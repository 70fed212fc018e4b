"""The sample table: one row per sample of all datasets, joined from their verified indices (no decoding)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class SampleTable:
    """One row per sample of all datasets: where it is and what the planner needs to know."""

    dataset: np.ndarray      # int16
    shard: np.ndarray        # int32, shard number within its dataset
    offset: np.ndarray       # int64, data offset in the tar
    size: np.ndarray         # int64
    n_atoms: np.ndarray      # int32
    domain: np.ndarray       # int16 codes into domain_names
    source: np.ndarray       # int16 codes into source_names
    trajectory: np.ndarray   # uint64 hash, 0 = not a trajectory frame
    domain_names: list[str]
    source_names: list[str]
    checksum: np.ndarray | None = None  # uint64 sha256 prefix of each sample's bytes (None: a table never fetched)

    def __len__(self) -> int:
        return int(self.n_atoms.size)


_TABLE_COLUMNS = ("shard", "offset", "size", "n_atoms", "domain", "source", "trajectory", "checksum")


def build_table(datasets: list[Any]) -> SampleTable:
    """Concatenate the index columns of several :class:`~shards.format.reader.ShardDataset`, each checked against
    its manifest (:meth:`~shards.format.reader.ShardDataset.columns`): the plan never rests on unverified rows."""
    cols: dict[str, list[np.ndarray]] = {k: [] for k in _TABLE_COLUMNS + ("dataset",)}
    domain_names: list[str] = []
    source_names: list[str] = []
    for d_no, ds in enumerate(datasets):
        part = ds.columns(_TABLE_COLUMNS)
        dmap = np.array([_code(domain_names, n) for n in ds.domain_names], dtype=np.int16)
        smap = np.array([_code(source_names, n) for n in ds.source_names], dtype=np.int16)
        part["domain"] = dmap[part["domain"]] if dmap.size else part["domain"]
        part["source"] = smap[part["source"]] if smap.size else part["source"]
        part["dataset"] = np.full(part["n_atoms"].size, d_no, dtype=np.int16)
        for k in cols:
            cols[k].append(part[k])
    arrays = {k: np.concatenate(v) for k, v in cols.items()}
    return SampleTable(domain_names=domain_names, source_names=source_names, **arrays)


def _code(names: list[str], name: str) -> int:
    if name not in names:
        names.append(name)
    return names.index(name)
