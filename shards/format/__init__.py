"""The storage format: one schema, its codec, WebDataset tar shards with per-shard indices, the zarr index
and manifest, and the checks that guard every byte.

A sample is an :class:`AtomGraph` (``schema``), checked by ``validate`` and encoded by ``codec``;
``writer`` packs samples into tar shards atomically, ``manifest`` writes the dataset's zarr index and
``manifest.json`` last, ``reader`` opens a dataset from a folder or URL (``storage`` does the byte access,
with retries), ``audit`` re-checks a whole dataset, ``interop`` converts to and from ASE and pymatgen;
``qm9`` is the one reader of the data kit's QM9 CSVs (ingest's ``qm9csv`` converter and the studies).
"""
from __future__ import annotations

from shards.format.audit import VerifyReport, inspect_dataset, shard_sizes, verify_dataset
from shards.format.codec import CodecError, decode, encode
from shards.format.interop import graph_from_ase, graph_from_pymatgen, graph_to_ase, graph_to_pymatgen
from shards.format.jsoncheck import DocumentError
from shards.format.manifest import finalize_dataset, read_shard_index, write_dataset
from shards.format.qm9 import iter_qm9_csv
from shards.format.reader import ShardDataset, ShardError
from shards.format.schema import (
    FIELDS,
    SCHEMA_VERSION_STR,
    AtomGraph,
    SchemaError,
    SchemaVersionError,
    check_schema_version,
    make_key,
)
from shards.format.storage import FetchError
from shards.format.validate import check_invariants, validate_graph
from shards.format.writer import ShardInfo, ShardWriter, WriterConfig, sample_checksum, write_atomic

__all__ = [
    "FIELDS", "SCHEMA_VERSION_STR", "AtomGraph", "CodecError", "DocumentError", "FetchError", "SchemaError",
    "SchemaVersionError", "ShardDataset", "ShardError", "ShardInfo", "ShardWriter", "VerifyReport", "WriterConfig",
    "check_invariants", "check_schema_version", "decode", "encode", "finalize_dataset", "graph_from_ase",
    "graph_from_pymatgen", "graph_to_ase", "graph_to_pymatgen", "inspect_dataset", "iter_qm9_csv", "make_key",
    "read_shard_index", "sample_checksum", "shard_sizes", "validate_graph", "verify_dataset", "write_atomic",
    "write_dataset",
]
