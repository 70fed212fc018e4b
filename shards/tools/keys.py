"""Sample keys of a dataset, read from the per-shard indices (no sample is decoded)."""
from __future__ import annotations

from collections.abc import Iterator

from shards.format.reader import ShardDataset

__all__ = ["iter_keys"]


def iter_keys(dataset: str, *, domain: str | None = None, limit: int | None = None) -> Iterator[str]:
    """Keys in dataset order (shards in manifest order, samples in shard order), optionally of one ``domain``
    and at most ``limit`` of them; an unknown domain is an error naming the ones present."""
    if limit is not None and limit < 0:
        raise ValueError(f"--limit must be >= 0, got {limit}")
    ds = ShardDataset(dataset)
    domains = sorted(ds.manifest.get("domains", {}))
    if domain is not None and domain not in domains:
        raise ValueError(f"{dataset}: no samples of domain {domain!r}; domains present: {', '.join(domains)}")
    left = limit
    for name in ds.shard_names:
        if left == 0:
            return
        idx = ds.shard_index(name)
        for key, dom in zip(idx["key"], idx["domain"], strict=True):
            if domain is None or dom == domain:
                if left == 0:
                    return
                yield key
                if left is not None:
                    left -= 1
