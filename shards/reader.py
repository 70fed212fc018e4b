"""Read a shard dataset from a local folder or a URL (http(s), s3://, gs://, az://): iterate, fetch by key."""
from __future__ import annotations

import json
from collections.abc import Iterator
from functools import cached_property
from typing import Any

import numpy as np

from shards import io
from shards.codec import SUFFIX, decode
from shards.manifest import INDEX_DIR, MANIFEST, key_hash
from shards.schema import AtomGraph, check_schema_version
from shards.writer import INDEX_SUFFIX, TAR_BLOCK


class ShardError(ValueError):
    """A shard is corrupt or disagrees with its index or manifest; the message names the shard."""


class ShardDataset:
    """A dataset written by :func:`shards.finalize_dataset` (``manifest.json`` + shards + indices)."""

    def __init__(self, root: str, *, validate: bool = True) -> None:
        self.root = str(root).rstrip("/") if io.is_url(str(root)) else str(root)
        self.validate = validate
        where = io.join(self.root, MANIFEST)
        try:
            self.manifest: dict[str, Any] = json.loads(io.read_bytes(where))
        except io.FetchError as exc:
            raise FileNotFoundError(f"{self.root}: not a shard dataset ({exc})") from None
        except ValueError as exc:
            raise ShardError(f"{where}: unreadable manifest: {exc}") from None
        check_schema_version(self.manifest.get("schema_version", "?"), where)

    def __repr__(self) -> str:
        return f"ShardDataset({self.root!r}, {len(self)} samples in {len(self.shard_names)} shards)"

    def __len__(self) -> int:
        return int(self.manifest["n_samples"])

    @property
    def shard_names(self) -> list[str]:
        return [s["name"] for s in self.manifest["shards"]]

    def location(self, name: str) -> str:
        return io.join(self.root, name)

    def shard_index(self, name: str) -> dict[str, Any]:
        """The per-shard index (columns key, offset, size, n_atoms, domain, source, trajectory)."""
        where = self.location(name + INDEX_SUFFIX)
        try:
            doc = json.loads(io.read_bytes(where))
        except io.FetchError as exc:
            raise ShardError(f"{where}: missing index for shard {name} ({exc})") from None
        except ValueError as exc:
            raise ShardError(f"{where}: unreadable index: {exc}") from None
        check_schema_version(doc.get("schema_version", "?"), where)
        return doc

    def shard_bytes(self, name: str) -> bytes | Any:
        """The whole shard (memory-mapped when local), checked against the manifest's size."""
        meta = self._shard_meta[name]
        data = io.map_bytes(self.location(name))
        if len(data) != meta["n_bytes"]:
            raise ShardError(f"shard {name}: {len(data)} bytes on disk, manifest says {meta['n_bytes']} "
                             "(truncated or replaced)")
        return data

    @cached_property
    def _shard_meta(self) -> dict[str, dict[str, Any]]:
        return {s["name"]: s for s in self.manifest["shards"]}

    def iter_shard(self, name: str, *, data: bytes | None = None,
                   rows: list[int] | None = None) -> Iterator[AtomGraph]:
        """Samples of one shard in stored order (or the given index rows)."""
        idx = self.shard_index(name)
        buf = memoryview(self.shard_bytes(name) if data is None else data)
        keys, offsets, sizes = idx["key"], idx["offset"], idx["size"]
        for r in (range(len(keys)) if rows is None else rows):
            yield self._decode_member(name, buf, keys[r], offsets[r], sizes[r])

    def _decode_member(self, name: str, buf: memoryview, key: str, off: int, size: int) -> AtomGraph:
        end = off + size
        if off < TAR_BLOCK or end > len(buf):
            raise ShardError(f"shard {name}: sample {key!r} at {off}+{size} lies outside the {len(buf)}-byte tar")
        member = f"{key}.{SUFFIX}".encode()
        head = buf[off - TAR_BLOCK: off - TAR_BLOCK + len(member) + 1]
        if head[:len(member)] != member or head[len(member)] != 0:
            raise ShardError(f"shard {name}: tar member at offset {off - TAR_BLOCK} is not {member.decode()!r}; "
                             "index and tar disagree")
        try:
            g = decode(buf[off:end], validate=self.validate)
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
        """The columnar zarr index (lazy; local datasets only)."""
        import zarr

        if io.is_url(self.root):
            raise ShardError(f"{self.root}: the zarr index is read from local datasets; use shard indices for URLs")
        return zarr.open_group(io.join(self.root, INDEX_DIR), mode="r")

    def get(self, key: str) -> AtomGraph:
        """Fetch one sample by key: locate it through the index, read only its bytes."""
        name, row = self._locate(key)
        idx = self.shard_index(name)
        off, size = idx["offset"][row], idx["size"][row]
        start = off - TAR_BLOCK
        raw = io.read_range(self.location(name), start, TAR_BLOCK + size)
        return self._decode_member(name, _Shifted(memoryview(raw), start), key, off, size)

    def _locate(self, key: str) -> tuple[str, int]:
        if not io.is_url(self.root):
            target = key_hash([key])[0]
            group = self.index
            hashes, shard_col = group["key_hash"], group["shard"]
            chunk = hashes.chunks[0]
            for start in range(0, hashes.shape[0], chunk):
                hit = np.flatnonzero(hashes[start:start + chunk] == target)
                if hit.size:
                    s_no = int(shard_col[start + int(hit[0])])
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


class _Shifted:
    """A window of a shard that answers absolute offsets (for single-sample range reads)."""

    def __init__(self, view: memoryview, start: int) -> None:
        self.view, self.start = view, start

    def __len__(self) -> int:
        return self.start + len(self.view)

    def __getitem__(self, s: slice) -> memoryview:
        return self.view[s.start - self.start: s.stop - self.start]
