"""Dataset manifest and columnar zarr index, written by the driver after all shards exist.

``manifest.json`` is written last: a dataset exists iff its manifest does. It records the schema
version, every shard's sha256, size and sample count and the sha256 of its index, counts and atom
statistics per domain and per source, and the writer/ingest configuration. ``index.zarr`` holds one row
per sample (n_atoms, domain and source codes, shard number, byte offset and size, key hash, trajectory
hash, sample checksum) for lazy reading at 100M+ rows; the manifest records the sha256 of every column
(``index.sha256``) and the code tables, and readers check a column against it before using it.

Both JSON documents are checked structurally when read (:func:`check_manifest`,
:func:`check_shard_index`): a wrong type, a missing key or deep nesting is one line naming the file.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from shards.format import jsoncheck as jc
from shards.format.schema import SCHEMA_VERSION_STR
from shards.format.writer import INDEX_SUFFIX, WriterConfig, write_atomic

MANIFEST = "manifest.json"
INDEX_DIR = "index.zarr"
ZARR_CHUNK = 1 << 20
INDEX_COLUMNS = ("n_atoms", "domain", "source", "shard", "offset", "size", "key_hash", "trajectory", "checksum")

_SHARD_ENTRY = {"name": jc.safe_name, "sha256": jc.sha256_hex, "n_bytes": jc.count, "n_samples": jc.count,
                "n_atoms": jc.count, "index_sha256": jc.sha256_hex}
_INDEX_ENTRY = {"rows": jc.count, "sha256": jc.mapping, "domains": jc.str_list, "sources": jc.str_list}
_SHARD_INDEX = {"schema_version": jc.text, "key": jc.str_list, "offset": jc.int_list, "size": jc.int_list,
                "n_atoms": jc.int_list, "domain": jc.str_list, "source": jc.str_list, "trajectory": jc.str_list,
                "checksum": jc.int_list}


def check_manifest(doc: Any, where: str) -> dict[str, Any]:
    """The manifest's structure: required keys and types, consistent counts, safe unique shard names."""
    jc.check_fields(doc, where, {"schema_version": jc.text, "n_samples": jc.count, "shards": jc.array,
                                 "index": jc.mapping}, {"domains": jc.mapping, "sources": jc.mapping},
                    what="manifest")
    names: set[str] = set()
    for i, entry in enumerate(doc["shards"]):
        jc.check_fields(entry, f"{where}: shards[{i}]", _SHARD_ENTRY, what="shard entry")
        if entry["name"] in names:
            raise jc.DocumentError(f"{where}: shard name {entry['name']!r} appears twice")
        names.add(entry["name"])
    if sum(e["n_samples"] for e in doc["shards"]) != doc["n_samples"]:
        raise jc.DocumentError(f"{where}: the shards hold {sum(e['n_samples'] for e in doc['shards'])} samples, "
                               f"n_samples says {doc['n_samples']}")
    index = jc.check_fields(doc["index"], f"{where}: index", _INDEX_ENTRY, what="index entry")
    if index["rows"] != doc["n_samples"]:
        raise jc.DocumentError(f"{where}: index.rows {index['rows']} differs from n_samples {doc['n_samples']}")
    jc.check_fields(index["sha256"], f"{where}: index.sha256", dict.fromkeys(INDEX_COLUMNS, jc.sha256_hex),
                    what="column digest table")
    return doc


def check_shard_index(doc: Any, where: str) -> dict[str, Any]:
    """A per-shard index: every column present, typed, and of one length."""
    jc.check_fields(doc, where, _SHARD_INDEX, what="shard index")
    n = len(doc["key"])
    for col in _SHARD_INDEX:
        if col != "schema_version" and len(doc[col]) != n:
            raise jc.DocumentError(f"{where}: index column {col!r} has {len(doc[col])} rows, expected {n}")
    return doc


def column_bytes(name: str, values: np.ndarray) -> bytes:
    """The little-endian bytes of an index column (what ``index.sha256`` digests)."""
    return np.ascontiguousarray(values, dtype=np.dtype(INDEX_DTYPES[name]).newbyteorder("<")).tobytes()



def key_hash(keys: Iterable[str]) -> np.ndarray:
    """64-bit hashes of sample keys (blake2b), used to find a key in the zarr index."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little")
                        for k in keys), dtype=np.uint64)


def traj_hash(ids: list[str]) -> np.ndarray:
    """Trajectory ids as 64-bit hashes; 0 means 'not a trajectory frame'."""
    out = np.zeros(len(ids), dtype=np.uint64)
    mask = np.array([bool(t) for t in ids], dtype=bool)
    if mask.any():
        out[mask] = key_hash([t for t in ids if t]) | np.uint64(1)
    return out


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stats() -> dict[str, Any]:
    return {"n_samples": 0, "n_atoms": 0, "min_atoms": None, "max_atoms": None}


def _update(st: dict[str, Any], n_atoms: np.ndarray) -> None:
    if n_atoms.size == 0:
        return
    st["n_samples"] += int(n_atoms.size)
    st["n_atoms"] += int(n_atoms.sum())
    lo, hi = int(n_atoms.min()), int(n_atoms.max())
    st["min_atoms"] = lo if st["min_atoms"] is None else min(st["min_atoms"], lo)
    st["max_atoms"] = hi if st["max_atoms"] is None else max(st["max_atoms"], hi)


def read_shard_index(path: Path) -> dict[str, Any]:
    """Load ``<shard>.idx.json`` with a clear error when it is missing or unreadable."""
    ipath = path.with_name(path.name + INDEX_SUFFIX)
    if not ipath.is_file():
        raise FileNotFoundError(f"{ipath}: missing index for shard {path.name}")
    return check_shard_index(jc.load_json(ipath.read_bytes(), str(ipath)), str(ipath))


def finalize_dataset(out_dir: str | Path, shard_names: list[str], *, writer: WriterConfig | None = None,
                     extra: dict[str, Any] | None = None,
                     known: Mapping[str, tuple[str, int]] | None = None) -> dict[str, Any]:
    """Checksum the shards, write ``index.zarr`` and then ``manifest.json``; return the manifest. ``known``
    gives (sha256, size) of shards that are not in ``out_dir`` (uploaded to object storage by ingest
    workers); their indices must be there."""
    out = Path(out_dir)
    shards_meta: list[dict[str, Any]] = []
    domains: dict[str, int] = {}
    sources: dict[str, int] = {}
    per_domain: dict[str, dict[str, Any]] = {}
    per_source: dict[str, dict[str, Any]] = {}
    seen: dict[int, str] = {}
    tmp_index = out / f".{INDEX_DIR}.tmp"
    if tmp_index.exists():
        shutil.rmtree(tmp_index)
    cols = _IndexWriter(tmp_index)
    total = _stats()
    for s_no, name in enumerate(shard_names):
        path = out / name
        idx = read_shard_index(path)
        n_atoms = np.asarray(idx["n_atoms"], dtype=np.int32)
        dom = np.array([domains.setdefault(d, len(domains)) for d in idx["domain"]], dtype=np.int16)
        src = np.array([sources.setdefault(s, len(sources)) for s in idx["source"]], dtype=np.int16)
        hashes = key_hash(idx["key"])
        for h, k in zip(hashes.tolist(), idx["key"], strict=True):
            if h in seen:
                raise ValueError(f"duplicate sample key {k!r} (shard {name}) also in shard {seen[h]}")
            seen[h] = name
        cols.append(n_atoms=n_atoms, domain=dom, source=src, shard=np.full(n_atoms.size, s_no, np.int32),
                    offset=np.asarray(idx["offset"], np.int64), size=np.asarray(idx["size"], np.int64),
                    key_hash=hashes, trajectory=traj_hash(idx["trajectory"]),
                    checksum=np.asarray(idx["checksum"], np.uint64))
        for d, code in domains.items():
            _update(per_domain.setdefault(d, _stats()), n_atoms[dom == code])
        for s, code in sources.items():
            _update(per_source.setdefault(s, _stats()), n_atoms[src == code])
        _update(total, n_atoms)
        sha, n_bytes = known[name] if known and name in known else (sha256_file(path), path.stat().st_size)
        shards_meta.append({"name": name, "sha256": sha, "n_bytes": n_bytes,
                            "n_samples": int(n_atoms.size), "n_atoms": int(n_atoms.sum()),
                            "index_sha256": sha256_file(path.with_name(name + INDEX_SUFFIX))})
    cols.close(attrs={"domains": list(domains), "sources": list(sources), "shards": shard_names})
    final_index = out / INDEX_DIR
    if final_index.exists():
        shutil.rmtree(final_index)
    tmp_index.rename(final_index)
    for st in (*per_domain.values(), *per_source.values(), total):
        st["mean_atoms"] = round(st["n_atoms"] / st["n_samples"], 4) if st["n_samples"] else None
    manifest = {
        "format": "scd-shards",
        "schema_version": SCHEMA_VERSION_STR,
        "n_samples": total["n_samples"],
        "n_atoms": total["n_atoms"],
        "atoms": total,
        "domains": per_domain,
        "sources": per_source,
        "shards": shards_meta,
        "index": {"rows": total["n_samples"], "sha256": cols.digests(), "domains": list(domains),
                  "sources": list(sources)},
        "writer": asdict(writer or WriterConfig()),
        **(extra or {}),
    }
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


class _IndexWriter:
    """Append columns to a zarr group in whole chunks (memory stays bounded at any dataset size)."""

    def __init__(self, path: Path) -> None:
        self.group = zarr.open_group(str(path), mode="w")
        self.buf: dict[str, list[np.ndarray]] = {c: [] for c in INDEX_COLUMNS}
        self.buffered = 0
        self.arrays: dict[str, Any] = {}
        self.hashes = {c: hashlib.sha256() for c in INDEX_COLUMNS}

    def append(self, **cols: np.ndarray) -> None:
        for c in INDEX_COLUMNS:
            self.buf[c].append(cols[c])
        self.buffered += len(cols["n_atoms"])
        if self.buffered >= ZARR_CHUNK:
            self._flush()

    def _flush(self) -> None:
        for c in INDEX_COLUMNS:
            data = np.concatenate(self.buf[c]) if self.buf[c] else np.zeros(0, dtype=INDEX_DTYPES[c])
            arr = self.arrays.get(c)
            if arr is None:
                arr = self.arrays[c] = self.group.create_array(c, shape=(0,), chunks=(ZARR_CHUNK,),
                                                               dtype=INDEX_DTYPES[c])
            if data.size:
                arr.append(data.astype(INDEX_DTYPES[c], copy=False))
                self.hashes[c].update(column_bytes(c, data))
            self.buf[c] = []
        self.buffered = 0

    def digests(self) -> dict[str, str]:
        return {c: h.hexdigest() for c, h in self.hashes.items()}

    def close(self, attrs: dict[str, Any]) -> None:
        self._flush()
        self.group.attrs.update({"schema_version": SCHEMA_VERSION_STR, **attrs})


INDEX_DTYPES = {"n_atoms": np.int32, "domain": np.int16, "source": np.int16, "shard": np.int32,
                "offset": np.int64, "size": np.int64, "key_hash": np.uint64, "trajectory": np.uint64,
                "checksum": np.uint64}


def write_dataset(graphs: Iterable[Any], out_dir: str | Path, *, config: WriterConfig | None = None,
                  prefix: str = "shard", extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write graphs into shards and finalize the dataset in one go (single process)."""
    from shards.format.writer import ShardWriter

    with ShardWriter(out_dir, prefix=prefix, config=config) as writer:
        for g in graphs:
            writer.add(g)
    return finalize_dataset(out_dir, [s.name for s in writer.shards], writer=writer.config, extra=extra)
