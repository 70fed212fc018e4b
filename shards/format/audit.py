"""Full dataset checks (``scd shards verify``) and summary statistics (``scd shards inspect``)."""
from __future__ import annotations

import hashlib
import io
import tarfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from shards.format import storage
from shards.format.codec import SUFFIX
from shards.format.manifest import INDEX_COLUMNS, INDEX_DIR, INDEX_DTYPES, ZARR_CHUNK, key_hash, traj_hash
from shards.format.reader import ShardDataset, ShardError
from shards.format.writer import WriterConfig


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
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    raise ShardError(f"shard {name}: member {m.name!r} is not a regular file")
                out.append((m.name, m.offset_data, m.size))
    except tarfile.TarError as exc:
        raise ShardError(f"shard {name}: not a readable tar: {exc}") from None
    return out


def verify_dataset(root: str, *, progress: Any = None) -> VerifyReport:
    """Check sha256s and sizes of shards and shard indices, tar vs index agreement, that every sample's
    checksum matches and it decodes and validates, per-shard counts vs the manifest, and (local datasets)
    every column of ``index.zarr`` row by row against the shard indices and against the manifest's digests.
    Over URLs the zarr index is not read: loaders plan from the shard indices there."""
    rep = VerifyReport()
    ds = ShardDataset(root)
    zarr_rows = None if storage.is_url(ds.root) else _ZarrRows(ds, rep)
    seen: set[str] = set()
    for s_no, meta in enumerate(ds.manifest["shards"]):
        name = meta["name"]
        rep.n_shards += 1
        idx: dict[str, Any] | None = None
        try:
            data = ds.shard_bytes(name)
            if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise ShardError(f"shard {name}: sha256 does not match the manifest (corrupted or replaced)")
            idx = ds.shard_index(name)
            _check_shard(ds, name, data, idx, meta, seen, rep)
        except (ShardError, OSError, ValueError) as exc:
            rep.errors.append(str(exc))
        if zarr_rows is not None:
            zarr_rows.compare(s_no, name, meta["n_samples"], idx)
        if progress is not None:
            progress.update(1)
    if zarr_rows is not None:
        zarr_rows.finish()
    if rep.n_samples != ds.manifest["n_samples"] and not rep.errors:
        rep.errors.append(f"manifest: n_samples {ds.manifest['n_samples']} but {rep.n_samples} samples found")
    return rep


def _check_shard(ds: ShardDataset, name: str, data: Any, idx: dict[str, Any], meta: dict[str, Any],
                 seen: set[str], rep: VerifyReport) -> None:
    members = _tar_members(name, data)
    expect = [(f"{k}.{SUFFIX}", o, s) for k, o, s in zip(idx["key"], idx["offset"], idx["size"], strict=True)]
    if members != expect:
        # the lists may differ in length: the first difference, else the end of the shorter one
        pairs = zip(members, expect, strict=False)
        bad = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(members), len(expect)))
        raise ShardError(f"shard {name}: tar and index disagree at member {bad} "
                         f"({members[bad] if bad < len(members) else 'missing'} vs "
                         f"{expect[bad] if bad < len(expect) else 'missing'})")
    if len(members) != meta["n_samples"]:
        raise ShardError(f"shard {name}: {len(members)} samples, manifest says {meta['n_samples']}")
    if sum(idx["n_atoms"]) != meta["n_atoms"]:
        raise ShardError(f"shard {name}: index holds {sum(idx['n_atoms'])} atoms, manifest says {meta['n_atoms']}")
    for row, g in enumerate(ds.iter_shard(name, data=data)):
        if g.n_atoms != idx["n_atoms"][row] or g.domain != idx["domain"][row] or g.source != idx["source"][row]:
            raise ShardError(f"shard {name}: sample {g.key!r}: n_atoms/domain/source differ from the index")
        if g.key in seen:
            raise ShardError(f"shard {name}: sample {g.key!r}: duplicate key")
        seen.add(g.key)
        rep.n_samples += 1


class _ZarrRows:
    """Reads ``index.zarr`` sequentially, one chunk at a time, and compares it with each shard's index."""

    def __init__(self, ds: ShardDataset, rep: VerifyReport) -> None:
        self.ds, self.rep, self.pos = ds, rep, 0
        self.where = storage.join(ds.root, INDEX_DIR)
        self.failed = False
        self.buf: dict[str, np.ndarray] = {}
        self.buf_start = 0
        try:
            self.group = zarr.open_group(self.where, mode="r")
            self.rows = int(self.group["n_atoms"].shape[0])
            for c in INDEX_COLUMNS:
                if self.group[c].shape != (self.rows,):
                    self._fail(f"column {c!r} has shape {self.group[c].shape}, expected ({self.rows},)")
            attrs = dict(self.group.attrs)
            for table in ("domains", "sources"):
                if list(attrs.get(table, [])) != ds.manifest["index"][table]:
                    self._fail(f"code table {table!r} differs from the manifest's")
        except Exception as exc:  # noqa: BLE001 - any failure to open the index is reported, not raised
            self._fail(f"unreadable: {' '.join(str(exc).split())[:200]}")

    def _fail(self, msg: str) -> None:
        if not self.failed:
            self.rep.errors.append(f"{self.where}: {msg}")
        self.failed = True

    def _take(self, n: int) -> dict[str, np.ndarray]:
        """The next ``n`` rows of every column."""
        parts: dict[str, list[np.ndarray]] = {c: [] for c in INDEX_COLUMNS}
        need, at = n, self.pos
        while need > 0 and at < self.rows:
            end = self.buf_start + len(self.buf.get("n_atoms", ()))
            if not self.buf or not self.buf_start <= at < end:
                self.buf_start = at - at % ZARR_CHUNK
                self.buf = {c: self.group[c][self.buf_start:self.buf_start + ZARR_CHUNK] for c in INDEX_COLUMNS}
                end = self.buf_start + len(self.buf["n_atoms"])
            k = min(need, end - at)
            for c in INDEX_COLUMNS:
                parts[c].append(self.buf[c][at - self.buf_start:at - self.buf_start + k])
            need, at = need - k, at + k
        self.pos += n
        return {c: np.concatenate(v) if v else np.zeros(0, INDEX_DTYPES[c]) for c, v in parts.items()}

    def compare(self, s_no: int, name: str, n: int, idx: dict[str, Any] | None) -> None:
        """Rows of shard ``s_no`` (``n`` of them, per the manifest) against its index, column by column."""
        if self.failed:
            return
        first = self.pos
        try:
            got = self._take(n)
        except Exception as exc:  # noqa: BLE001 - an unreadable chunk is reported, not raised
            self._fail(f"rows {first}..{first + n - 1} unreadable: {' '.join(str(exc).split())[:200]}")
            return
        if idx is None or len(idx["key"]) != n:
            return
        if got["n_atoms"].size != n:
            self._fail(f"{self.rows} rows, the manifest's shards hold more (shard {name} starts at row {first})")
            return
        dcode = {d: i for i, d in enumerate(self.ds.domain_names)}
        scode = {x: i for i, x in enumerate(self.ds.source_names)}
        expect = {"n_atoms": idx["n_atoms"], "domain": [dcode.get(d, -1) for d in idx["domain"]],
                  "source": [scode.get(x, -1) for x in idx["source"]], "shard": [s_no] * n,
                  "offset": idx["offset"], "size": idx["size"], "key_hash": key_hash(idx["key"]),
                  "trajectory": traj_hash(idx["trajectory"]), "checksum": idx["checksum"]}
        for c in INDEX_COLUMNS:
            want = np.asarray(expect[c], dtype=np.int64 if c in ("domain", "source") else INDEX_DTYPES[c])
            diff = np.flatnonzero(got[c].astype(want.dtype) != want)
            if diff.size:
                r = int(diff[0])
                self._fail(f"column {c!r} row {first + r} (shard {name}, sample {idx['key'][r]!r}) holds "
                           f"{got[c][r]}, the shard index gives {want[r]}")
                return

    def finish(self) -> None:
        """Rows left over, and every column's digest against the manifest."""
        if self.failed:
            return
        if self.pos != self.rows:
            self._fail(f"{self.rows} rows, the shard indices hold {self.pos}")
            return
        try:
            self.ds.columns()
        except ShardError as exc:
            self._fail(str(exc).split(": ", 1)[-1])


def inspect_dataset(root: str) -> dict[str, Any]:
    """Counts per domain and source, atoms per sample (min/median/max), bytes; from the index columns
    (the zarr index when local, the shard indices over URLs; both checked against the manifest)."""
    ds = ShardDataset(root)
    m = ds.manifest
    cols = ds.columns(("n_atoms", "domain", "source"))
    n_atoms, dom, src = cols["n_atoms"], cols["domain"], cols["source"]
    domains, sources = ds.domain_names, ds.source_names

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
        "shard_sizes": shard_sizes(m),
    }


def shard_sizes(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The shard-size distribution against the writer's targets: fill = max(bytes / max_shard_bytes,
    samples / max_shard_samples) per shard, in tenths; ``minimum`` is the fewest shards the targets allow."""
    shards = manifest["shards"]
    writer = manifest.get("writer") or {}
    max_bytes = int(writer.get("max_shard_bytes") or WriterConfig().max_shard_bytes)
    max_samples = int(writer.get("max_shard_samples") or WriterConfig().max_shard_samples)
    sizes = sorted(int(s["n_bytes"]) for s in shards)
    counts = sorted(int(s["n_samples"]) for s in shards)
    fills = [max(s["n_bytes"] / max_bytes, s["n_samples"] / max_samples) for s in shards]
    histogram = {f"{10 * k}-{10 * k + 10}%": 0 for k in range(10)}
    for f in fills:
        k = min(int(f * 10), 9)
        histogram[f"{10 * k}-{10 * k + 10}%"] += 1
    total_bytes, total_samples = sum(sizes), sum(counts)
    minimum = max(-(-total_bytes // max_bytes), -(-total_samples // max_samples), 1 if shards else 0)
    return {"shards": len(shards), "minimum": minimum, "max_shard_bytes": max_bytes, "max_shard_samples": max_samples,
            "bytes": _spread(sizes), "samples": _spread(counts),
            "under_half_target": sum(1 for f in fills if f < 0.5), "fill_histogram": histogram}


def _spread(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    return {"min": values[0], "median": values[len(values) // 2], "max": values[-1]}
