"""Full dataset checks (``scd shards verify``) and summary statistics (``scd shards inspect``)."""
from __future__ import annotations

import hashlib
import io as _io
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shards.codec import SUFFIX
from shards.manifest import INDEX_DIR
from shards.reader import ShardDataset, ShardError


@dataclass
class VerifyReport:
    """Problems found, each naming the shard (and sample) concerned."""

    n_shards: int = 0
    n_samples: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _tar_members(name: str, data: bytes) -> list[tuple[str, int, int]]:
    """(member name, data offset, size) for every member, read by the standard tarfile module."""
    out = []
    try:
        with tarfile.open(fileobj=_io.BytesIO(data), mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    raise ShardError(f"shard {name}: member {m.name!r} is not a regular file")
                out.append((m.name, m.offset_data, m.size))
    except tarfile.TarError as exc:
        raise ShardError(f"shard {name}: not a readable tar: {exc}") from None
    return out


def verify_dataset(root: str, *, progress: Any = None) -> VerifyReport:
    """Check sha256s, sizes, tar vs index agreement, that every sample decodes and validates,
    per-shard counts vs the manifest and the zarr index vs the shard indices."""
    rep = VerifyReport()
    ds = ShardDataset(root)
    seen: set[str] = set()
    index_rows = 0
    for meta in ds.manifest["shards"]:
        name = meta["name"]
        rep.n_shards += 1
        try:
            data = ds.shard_bytes(name)
            if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise ShardError(f"shard {name}: sha256 does not match the manifest (corrupted or replaced)")
            idx = ds.shard_index(name)
            members = _tar_members(name, data)
            expect = [(f"{k}.{SUFFIX}", o, s) for k, o, s in zip(idx["key"], idx["offset"], idx["size"])]
            if members != expect:
                bad = next((i for i, (a, b) in enumerate(zip(members, expect)) if a != b), min(len(members), len(expect)))
                raise ShardError(f"shard {name}: tar and index disagree at member {bad} "
                                 f"({members[bad] if bad < len(members) else 'missing'} vs "
                                 f"{expect[bad] if bad < len(expect) else 'missing'})")
            if len(members) != meta["n_samples"]:
                raise ShardError(f"shard {name}: {len(members)} samples, manifest says {meta['n_samples']}")
            for row, g in enumerate(ds.iter_shard(name, data=data)):
                if g.n_atoms != idx["n_atoms"][row] or g.domain != idx["domain"][row] or g.source != idx["source"][row]:
                    raise ShardError(f"shard {name}: sample {g.key!r}: n_atoms/domain/source differ from the index")
                if g.key in seen:
                    raise ShardError(f"shard {name}: sample {g.key!r}: duplicate key")
                seen.add(g.key)
                rep.n_samples += 1
            index_rows += len(members)
        except (ShardError, OSError, ValueError) as exc:
            rep.errors.append(str(exc))
        if progress is not None:
            progress.update(1)
    try:
        zrows = ds.index["n_atoms"].shape[0]
        if zrows != index_rows and not rep.errors:
            rep.errors.append(f"{INDEX_DIR}: {zrows} rows, shard indices have {index_rows}")
    except Exception as exc:  # noqa: BLE001 - any failure to open the index is reported, not raised
        rep.errors.append(f"{INDEX_DIR}: unreadable: {exc}")
    if rep.n_samples != ds.manifest["n_samples"] and not rep.errors:
        rep.errors.append(f"manifest: n_samples {ds.manifest['n_samples']} but {rep.n_samples} samples found")
    return rep


def inspect_dataset(root: str) -> dict[str, Any]:
    """Counts per domain and source, atoms per sample (min/median/max), bytes; from the zarr index."""
    ds = ShardDataset(root)
    m = ds.manifest
    group = ds.index
    n_atoms = group["n_atoms"][:]
    dom, src = group["domain"][:], group["source"][:]
    domains, sources = group.attrs["domains"], group.attrs["sources"]

    def summary(mask: np.ndarray) -> dict[str, Any]:
        a = n_atoms[mask]
        return {"samples": int(a.size), "atoms": int(a.sum()), "min_atoms": int(a.min()),
                "median_atoms": float(np.median(a)), "max_atoms": int(a.max())}

    return {
        "root": root,
        "schema_version": m["schema_version"],
        "samples": int(n_atoms.size),
        "shards": len(m["shards"]),
        "bytes": int(sum(s["n_bytes"] for s in m["shards"])),
        "atoms": summary(np.ones(n_atoms.size, bool)) if n_atoms.size else {},
        "domains": {d: summary(dom == i) for i, d in enumerate(domains) if (dom == i).any()},
        "sources": {s: summary(src == i) for i, s in enumerate(sources) if (src == i).any()},
        "size_histogram": dict(sorted(Counter(int(x).bit_length() for x in n_atoms).items())),
    }

