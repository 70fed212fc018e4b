"""Rewrite shards into target-size shards by copying samples verbatim (``scd shards compact``).

Samples are copied byte for byte (same keys, same encoded bytes) in a deterministic order: sources in
the order given, shards in manifest order, samples in stored order. Every shard read is checked against
its source's manifest (sha256) and every sample against its index checksum before it is copied. The
same function packs the short tail shards of an ingest job's units.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from shards.format.manifest import INDEX_DIR, MANIFEST, finalize_dataset, read_shard_index
from shards.format.reader import ShardDataset, ShardError
from shards.format.writer import INDEX_SUFFIX, ShardInfo, ShardWriter, WriterConfig, sample_checksum

COMPACT_PREFIX = "c"


def copy_samples(writer: ShardWriter, name: str, data: Any, index: Mapping[str, Any]) -> int:
    """Append every sample of one shard (its bytes and index) to ``writer``, each checked against its checksum
    first; returns the count."""
    view = memoryview(data)
    rows = list(zip(index["key"], index["offset"], index["size"], index["n_atoms"], index["domain"], index["source"],
                    index["trajectory"], index["checksum"], strict=True))
    for key, off, size, *_, checksum in rows:
        if off < 0 or off + size > len(view):
            raise ShardError(f"shard {name}: sample {key!r} at {off}+{size} lies outside the shard")
        if sample_checksum(view[off:off + size]) != checksum:
            raise ShardError(f"shard {name}: sample {key!r}: bytes do not match their checksum (corrupted)")
    try:
        writer.add_stored(view, rows)
    except ValueError as exc:
        raise ShardError(f"shard {name}: {exc}") from None
    return len(rows)


def pack_local(paths: Iterable[tuple[Path, str]], out_dir: Path, prefix: str,
               config: WriterConfig) -> list[ShardInfo]:
    """Copy the samples of local shards ``(path, sha256)`` into target-size shards ``<prefix>-NNNNNN.tar``."""
    with ShardWriter(out_dir, prefix=prefix, config=config) as writer:
        for path, sha in paths:
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != sha:
                raise ShardError(f"{path}: sha256 does not match the recorded one (changed since it was written)")
            copy_samples(writer, path.name, data, read_shard_index(path))
    return writer.shards


def _source_shards(ds: ShardDataset) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    for meta in ds.manifest["shards"]:
        name = meta["name"]
        data = ds.shard_bytes(name)
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise ShardError(f"{ds.location(name)}: sha256 does not match the manifest (corrupted or replaced)")
        yield name, data, ds.shard_index(name)


def _provenance(src: str, ds: ShardDataset, raw_manifest: bytes) -> dict[str, Any]:
    m = ds.manifest
    keep = ("accounting", "ingest", "converters", "compacted_from", "writer")
    return {"dataset": Path(src.rstrip("/")).name, "manifest_sha256": hashlib.sha256(raw_manifest).hexdigest(),
            "n_samples": m["n_samples"], "n_shards": len(m["shards"]), **{k: m[k] for k in keep if k in m}}


def compact(sources: Sequence[str], out_dir: str | Path, *, config: WriterConfig | None = None) -> dict[str, Any]:
    """Rewrite the datasets ``sources`` into one dataset of target-size shards in ``out_dir``; returns its
    manifest. The sources' manifests (accounting, ingest config, converters) are kept under
    ``compacted_from``. ``out_dir`` must be new, empty or an earlier compaction output; it may be an
    object-storage URL (see :func:`compact_to_url`)."""
    from shards.format import storage

    if storage.is_url(str(out_dir)):
        return compact_to_url(sources, str(out_dir), config=config)
    out = Path(out_dir)
    config = config or WriterConfig()
    _prepare(out, sources)
    datasets = [ShardDataset(s) for s in sources]
    provenance = [_provenance(s, ds, storage.read_bytes(storage.join(ds.root, MANIFEST)))
                  for s, ds in zip(sources, datasets, strict=True)]
    with ShardWriter(out, prefix=COMPACT_PREFIX, config=config) as writer:
        for ds in datasets:
            for name, data, index in _source_shards(ds):
                copy_samples(writer, name, data, index)
    converters = sorted({c for p in provenance for c in p.get("converters", [])})
    extra: dict[str, Any] = {"compacted_from": provenance}
    if converters:
        extra["converters"] = converters
    return finalize_dataset(out, [s.name for s in writer.shards], writer=config, extra=extra)


def compact_to_url(sources: Sequence[str], url: str, *, config: WriterConfig | None = None) -> dict[str, Any]:
    """:func:`compact` into a local staging folder (it needs room for the output), then upload under ``url``:
    shards (each index first), ``index.zarr``, and ``manifest.json`` last; shards of an earlier compaction
    that the new one does not have are deleted. Refuses a prefix that holds anything else."""
    import tempfile

    from shards.format.sink import ObjectSink, publish_dataset

    sink = ObjectSink(url)
    if url.rstrip("/") in (s.rstrip("/") for s in sources):
        raise ValueError(f"compact: the output {url} is one of the sources")
    sink.check_writable()
    present = sink.find()
    if MANIFEST in present and "compacted_from" not in json.loads(sink.get_bytes(MANIFEST)):
        raise ValueError(f"compact: {url} holds a dataset that compact did not write; choose another --out")
    if any(not (n.startswith(f"{COMPACT_PREFIX}-") or n.startswith(f"{INDEX_DIR}/") or n == MANIFEST)
           for n in present):
        raise ValueError(f"compact: {url} is not empty; choose a new or empty prefix")
    sink.delete([MANIFEST] if MANIFEST in present else [])  # a dataset exists iff its manifest does
    with tempfile.TemporaryDirectory(prefix="scd-compact-") as tmp:
        manifest = compact(sources, Path(tmp) / "out", config=config)
        names = [s["name"] for s in manifest["shards"]]
        keep = {n + x for n in names for x in ("", INDEX_SUFFIX)}
        sink.delete(n for n in present if n.startswith(f"{COMPACT_PREFIX}-") and n not in keep)
        publish_dataset(Path(tmp) / "out", sink, names)
    return manifest


def _prepare(out: Path, sources: Sequence[str]) -> None:
    """Refuse to write into a source or a foreign dataset; clear what an earlier compaction left."""
    if not sources:
        raise ValueError("compact: give at least one source dataset")
    for s in sources:
        if "://" not in s and Path(s).resolve() == out.resolve():
            raise ValueError(f"compact: the output {out} is one of the sources")
    manifest = out / MANIFEST
    if manifest.is_file():
        doc = json.loads(manifest.read_bytes())
        if not isinstance(doc, dict) or "compacted_from" not in doc:
            raise ValueError(f"compact: {out} holds a dataset that compact did not write; choose another --out")
    elif out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith((f"{COMPACT_PREFIX}-", "."))
                              and p.name != INDEX_DIR):
        raise ValueError(f"compact: {out} is not empty; choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)  # a dataset exists iff its manifest does
    for p in list(out.glob(f"{COMPACT_PREFIX}-*.tar")) + list(out.glob(f"{COMPACT_PREFIX}-*.tar{INDEX_SUFFIX}")):
        p.unlink()
    for p in out.glob(f".{COMPACT_PREFIX}-*"):
        p.unlink()
    if (out / INDEX_DIR).is_dir():
        shutil.rmtree(out / INDEX_DIR)
