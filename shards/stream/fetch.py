"""Random access to samples of several datasets by table row, with a bounded shard cache.

Local shards are memory-mapped; remote shards (http(s), s3://, any fsspec URL) are downloaded whole into a
local cache folder (bounded in bytes, least recently used first out), checked against the manifest's sha256
and then memory-mapped. Without a cache folder remote shards are held in memory.

Every sample's bytes are checked against the 64-bit sha256 checksum of its index row before decoding,
whatever the storage, so a flipped byte never reaches a batch.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

from shards.format import storage
from shards.format.codec import decode
from shards.format.reader import ShardDataset, ShardError
from shards.format.schema import AtomGraph
from shards.format.writer import sample_checksum, write_atomic


class ShardCache:
    """Keeps up to ``max_open`` shards mapped and at most ``max_bytes`` of remote shards on disk."""

    def __init__(self, cache_dir: str | Path | None = None, max_bytes: int = 4 << 30, max_open: int = 64) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.max_bytes, self.max_open = max_bytes, max_open
        self._open: OrderedDict[tuple[int, str], Any] = OrderedDict()

    def get(self, ds: ShardDataset, name: str) -> Any:
        slot = (id(ds), name)
        buf = self._open.get(slot)
        if buf is not None:
            self._open.move_to_end(slot)
            return buf
        loc = ds.location(name)
        if storage.is_url(loc) and self.cache_dir is not None:
            buf = storage.map_bytes(str(self._download(ds, name, loc)))
        else:
            buf = ds.shard_bytes(name)
        self._open[slot] = buf
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return buf

    def _download(self, ds: ShardDataset, name: str, loc: str) -> Path:
        meta = ds.shard_meta(name)
        assert self.cache_dir is not None
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        path = self.cache_dir / f"{meta['sha256'][:32]}-{name}"
        if path.exists() and path.stat().st_size == meta["n_bytes"]:
            os.utime(path)
            return path
        data = storage.read_bytes(loc)
        if len(data) != meta["n_bytes"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise ShardError(f"shard {loc}: downloaded bytes do not match the manifest (size or sha256)")
        self._evict(len(data))
        write_atomic(path, data)
        return path

    def _evict(self, incoming: int) -> None:
        assert self.cache_dir is not None
        files = sorted((p for p in self.cache_dir.iterdir() if p.is_file() and not p.name.startswith(".")),
                       key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for p in files:
            if total + incoming <= self.max_bytes:
                break
            total -= p.stat().st_size
            p.unlink(missing_ok=True)


class SampleFetcher:
    """Decode samples addressed by (dataset number, shard number, offset, size, checksum).

    ``check=False`` skips the checksum (only for measuring what the check costs).
    """

    def __init__(self, datasets: list[ShardDataset], cache: ShardCache | None = None, *, check: bool = True) -> None:
        self.datasets = datasets
        self.cache = cache or ShardCache()
        self.check = check
        self._names = [ds.shard_names for ds in datasets]

    def get(self, dataset: int, shard: int, offset: int, size: int, checksum: int) -> AtomGraph:
        ds = self.datasets[dataset]
        names = self._names[dataset]
        if not 0 <= shard < len(names):
            raise ShardError(f"{ds.root}: shard number {shard} is outside the manifest's {len(names)} shards")
        name = names[shard]
        buf = self.cache.get(ds, name)
        if offset < 0 or size < 0 or offset + size > len(buf):
            raise ShardError(f"shard {ds.location(name)}: sample at {offset}+{size} lies beyond its end (truncated?)")
        data = memoryview(buf)[offset:offset + size]
        if self.check and sample_checksum(data) != checksum:
            raise ShardError(f"shard {ds.location(name)}: sample at offset {offset}: bytes do not match their "
                             "checksum (corrupted or replaced)")
        try:
            return decode(data, validate=ds.validate)
        except ValueError as exc:
            raise ShardError(f"shard {ds.location(name)}: sample at offset {offset}: {exc}") from None
