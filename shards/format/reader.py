"""Read a shard dataset from a local folder or a URL (http(s), s3://, gs://, az://): iterate, fetch by key."""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from functools import cached_property
from typing import Any

import numpy as np

from shards.format import storage
from shards.format.codec import SUFFIX, decode
from shards.format.jsoncheck import DocumentError, load_json
from shards.format.manifest import (
    INDEX_COLUMNS,
    INDEX_DIR,
    INDEX_DTYPES,
    MANIFEST,
    check_manifest,
    check_shard_index,
    column_bytes,
    key_hash,
    traj_hash,
)
from shards.format.schema import AtomGraph, check_schema_version
from shards.format.writer import INDEX_SUFFIX, TAR_BLOCK, sample_checksum


class ShardError(ValueError):
    """A shard is corrupt or disagrees with its index or manifest; the message names the shard."""


class ShardDataset:
    """A dataset written by :func:`shards.finalize_dataset` (``manifest.json`` + shards + indices)."""

    def __init__(self, root: str, *, validate: bool = True) -> None:
        self.root = str(root).rstrip("/") if storage.is_url(str(root)) else str(root)
        self.validate = validate
        where = storage.join(self.root, MANIFEST)
        try:
            raw = storage.read_bytes(where)
        except storage.FetchError as exc:
            raise FileNotFoundError(f"{self.root}: not a shard dataset ({exc})") from None
        try:
            self.manifest: dict[str, Any] = check_manifest(load_json(raw, where), where)
        except DocumentError as exc:
            raise ShardError(str(exc)) from None
        check_schema_version(self.manifest["schema_version"], where)

    def __repr__(self) -> str:
        return f"ShardDataset({self.root!r}, {len(self)} samples in {len(self.shard_names)} shards)"

    def __len__(self) -> int:
        return int(self.manifest["n_samples"])

    @property
    def shard_names(self) -> list[str]:
        return [s["name"] for s in self.manifest["shards"]]

    def location(self, name: str) -> str:
        return storage.join(self.root, name)

    def shard_index(self, name: str) -> dict[str, Any]:
        """The per-shard index (columns key, offset, size, n_atoms, domain, source, trajectory)."""
        where = self.location(name + INDEX_SUFFIX)
        try:
            raw = storage.read_bytes(where)
        except storage.FetchError as exc:
            raise ShardError(f"{where}: missing index for shard {name} ({exc})") from None
        if hashlib.sha256(raw).hexdigest() != self.shard_meta(name)["index_sha256"]:
            raise ShardError(f"{where}: shard index does not match the manifest's sha256 (edited or corrupted)")
        try:
            doc = check_shard_index(load_json(raw, where), where)
        except DocumentError as exc:
            raise ShardError(str(exc)) from None
        check_schema_version(doc["schema_version"], where)
        return doc

    def shard_bytes(self, name: str) -> bytes | Any:
        """The whole shard (memory-mapped when local), checked against the manifest's size."""
        meta = self.shard_meta(name)
        data = storage.map_bytes(self.location(name))
        if len(data) != meta["n_bytes"]:
            raise ShardError(f"shard {name}: {len(data)} bytes on disk, manifest says {meta['n_bytes']} "
                             "(truncated or replaced)")
        return data

    @cached_property
    def _shard_meta(self) -> dict[str, dict[str, Any]]:
        return {s["name"]: s for s in self.manifest["shards"]}

    def shard_meta(self, name: str) -> dict[str, Any]:
        """The manifest's entry of shard ``name`` (sha256, n_bytes, n_samples, ...)."""
        meta = self._shard_meta.get(name)
        if meta is None:
            raise ShardError(f"{self.root}: no shard named {name!r} in the manifest")
        return meta

    def iter_shard(self, name: str, *, data: bytes | None = None,
                   rows: list[int] | None = None) -> Iterator[AtomGraph]:
        """Samples of one shard in stored order (or the given index rows)."""
        idx = self.shard_index(name)
        buf = memoryview(self.shard_bytes(name) if data is None else data)
        keys, offsets, sizes, sums = idx["key"], idx["offset"], idx["size"], idx["checksum"]
        for r in (range(len(keys)) if rows is None else rows):
            yield self._decode_member(name, buf, keys[r], offsets[r], sizes[r], sums[r])

    def _decode_member(self, name: str, buf: Any, key: str, off: int, size: int, checksum: int) -> AtomGraph:
        end = off + size
        if off < TAR_BLOCK or end > len(buf):
            raise ShardError(f"shard {name}: sample {key!r} at {off}+{size} lies outside the {len(buf)}-byte tar")
        member = f"{key}.{SUFFIX}".encode()
        head = buf[off - TAR_BLOCK: off - TAR_BLOCK + len(member) + 1]
        if head[:len(member)] != member or head[len(member)] != 0:
            raise ShardError(f"shard {name}: tar member at offset {off - TAR_BLOCK} is not {member.decode()!r}; "
                             "index and tar disagree")
        data = buf[off:end]
        if sample_checksum(data) != checksum:
            raise ShardError(f"shard {name}: sample {key!r}: bytes do not match their checksum (corrupted)")
        try:
            g = decode(data, validate=self.validate)
        except ValueError as exc:
            raise ShardError(f"shard {name}: sample {key!r}: {exc}") from None
        if g.key != key:
            raise ShardError(f"shard {name}: member {key!r} holds sample {g.key!r}")
        return g

    def __iter__(self) -> Iterator[AtomGraph]:
        for name in self.shard_names:
            yield from self.iter_shard(name)

    @cached_property
    def index(self) -> Any:
        """The columnar zarr index as stored (lazy, unchecked; local datasets only): use :meth:`columns`."""
        import zarr

        if storage.is_url(self.root):
            raise ShardError(f"{self.root}: the zarr index is read from local datasets; use shard indices for URLs")
        return zarr.open_group(storage.join(self.root, INDEX_DIR), mode="r")

    @property
    def domain_names(self) -> list[str]:
        """Domain names by code (the manifest's table)."""
        return list(self.manifest["index"]["domains"])

    @property
    def source_names(self) -> list[str]:
        return list(self.manifest["index"]["sources"])

    def columns(self, names: tuple[str, ...] = INDEX_COLUMNS) -> dict[str, np.ndarray]:
        """Whole index columns, checked against the manifest before use.

        Local datasets read ``index.zarr`` and compare each column's sha256 with ``index.sha256`` of the
        manifest; URLs rebuild the columns from the shard indices (each checked against the manifest).
        Shard numbers and domain/source codes are checked to be in range.
        """
        cols = self._remote_columns(names) if storage.is_url(self.root) else self._zarr_columns(names)
        limits = {"shard": len(self.manifest["shards"]), "domain": len(self.domain_names),
                  "source": len(self.source_names)}
        for c, limit in limits.items():
            if c in cols and cols[c].size and (int(cols[c].min()) < 0 or int(cols[c].max()) >= limit):
                where = storage.join(self.root, INDEX_DIR)
                raise ShardError(f"{where}: column {c!r} holds codes outside 0..{limit - 1}")
        return cols

    def _zarr_columns(self, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        where = storage.join(self.root, INDEX_DIR)
        expect = self.manifest["index"]["sha256"]
        out = {}
        for c in names:
            try:
                values = self.index[c][:]
            except Exception as exc:  # noqa: BLE001 - a missing or unreadable column is one line
                raise ShardError(f"{where}: column {c!r} unreadable: {' '.join(str(exc).split())[:200]}") from None
            if values.shape != (len(self),) or hashlib.sha256(column_bytes(c, values)).hexdigest() != expect[c]:
                raise ShardError(f"{where}: column {c!r} does not match the manifest's sha256 (edited or "
                                 "corrupted); re-run finalize or restore the index")
            out[c] = values
        return out

    def _remote_columns(self, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        dcode = {d: i for i, d in enumerate(self.domain_names)}
        scode = {s: i for i, s in enumerate(self.source_names)}
        parts: dict[str, list[np.ndarray]] = {c: [] for c in names}
        for s_no, name in enumerate(self.shard_names):
            idx = self.shard_index(name)
            where = self.location(name + INDEX_SUFFIX)
            try:
                dom = [dcode[d] for d in idx["domain"]]
                src = [scode[x] for x in idx["source"]]
            except KeyError as exc:
                raise ShardError(f"{where}: name {exc.args[0]!r} is not in the manifest's code table") from None
            for c in names:
                parts[c].append(_shard_column(c, s_no, idx, dom, src))
        return {c: np.concatenate(v) if v else np.zeros(0, INDEX_DTYPES[c]) for c, v in parts.items()}

    def get(self, key: str) -> AtomGraph:
        """Fetch one sample by key: locate it through the index, read only its bytes."""
        name, row = self._locate(key)
        idx = self.shard_index(name)
        off, size = idx["offset"][row], idx["size"][row]
        start = off - TAR_BLOCK
        raw = storage.read_range(self.location(name), start, TAR_BLOCK + size)
        return self._decode_member(name, _Shifted(memoryview(raw), start), key, off, size, idx["checksum"][row])

    def _locate(self, key: str) -> tuple[str, int]:
        if not storage.is_url(self.root):
            target = key_hash([key])[0]
            group = self.index
            hashes, shard_col = group["key_hash"], group["shard"]
            chunk = hashes.chunks[0]
            for start in range(0, hashes.shape[0], chunk):
                hit = np.flatnonzero(hashes[start:start + chunk] == target)
                for h in hit.tolist():
                    s_no = int(shard_col[start + h])
                    if not 0 <= s_no < len(self.shard_names):
                        raise ShardError(f"{storage.join(self.root, INDEX_DIR)}: row {start + h} names shard {s_no}, "
                                         f"the manifest has {len(self.shard_names)}")
                    name = self.shard_names[s_no]
                    keys = self.shard_index(name)["key"]
                    if key in keys:
                        return name, keys.index(key)
            raise KeyError(f"{self.root}: no sample with key {key!r}")
        for name in self.shard_names:
            keys = self.shard_index(name)["key"]
            if key in keys:
                return name, keys.index(key)
        raise KeyError(f"{self.root}: no sample with key {key!r}")


def _shard_column(col: str, s_no: int, idx: dict[str, Any], dom: list[int], src: list[int]) -> np.ndarray:
    """One zarr index column as rebuilt from a shard index."""
    if col == "key_hash":
        return key_hash(idx["key"])
    if col == "trajectory":
        return traj_hash(idx["trajectory"])
    values = {"domain": dom, "source": src, "shard": [s_no] * len(idx["key"])}.get(col)
    return np.asarray(idx[col] if values is None else values, dtype=INDEX_DTYPES[col])


class _Shifted:
    """A window of a shard that answers absolute offsets (for single-sample range reads)."""

    def __init__(self, view: memoryview, start: int) -> None:
        self.view, self.start = view, start

    def __len__(self) -> int:
        return self.start + len(self.view)

    def __getitem__(self, s: slice) -> memoryview:
        return self.view[s.start - self.start: s.stop - self.start]
