"""Reproducible WebDataset tar shards with a per-shard index, written atomically.

One tar member per sample (``<key>.scd``), fixed tar metadata (mtime 0, uid/gid 0, mode 0644, USTAR),
so the same input always gives byte-identical shards. Beside each shard ``<name>.idx.json`` lists
key, data offset, size, n_atoms, domain, source, trajectory id and checksum (first 64 bits of the sha256
of the sample's bytes, checked whenever the sample is decoded) of every sample.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shards.format.codec import SUFFIX, encode
from shards.format.jsoncheck import SAFE_NAME
from shards.format.schema import SCHEMA_VERSION_STR, AtomGraph

TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads an archive to a multiple of its record size
_NAME_FIELD = 100
# the fixed fields of our USTAR member headers (mode 0644, uid/gid 0 / mtime 0, regular file, no user or group
# names, no device, no prefix) around the name, size and checksum fields, as tarfile writes them
_MODE_IDS = b"%07o\0%07o\0%07o\0" % (0o644, 0, 0)
_AFTER_SIZE = (b"%011o\0" % 0 + b" " * 8 + tarfile.REGTYPE + b"\0" * 100 + tarfile.POSIX_MAGIC
               + b"\0" * (32 + 32 + 8 + 8 + 155))
_TAIL = b"\0" * (TAR_BLOCK - _NAME_FIELD - len(_MODE_IDS) - 12 - len(_AFTER_SIZE))
_MTIME, _AFTER_CHECKSUM = _AFTER_SIZE[:12], _AFTER_SIZE[20:]  # the checksum field lies between them
_FIXED_SUM = sum(_MODE_IDS) + sum(_AFTER_SIZE) + sum(_TAIL)  # the header bytes that are the same in every member
INDEX_SUFFIX = ".idx.json"
INDEX_KEYS = ("key", "offset", "size", "n_atoms", "domain", "source", "trajectory", "checksum")
_ZEROS = bytes(TAR_BLOCK)
# one sample of a shard as its index lists it: key, data offset, size, n_atoms, domain, source, trajectory, checksum
StoredRow = tuple[str, int, int, int, str, str, str, int]


@dataclass(frozen=True)
class WriterConfig:
    """Shard size targets: a shard is closed when either limit would be exceeded."""

    max_shard_bytes: int = 64 * 1024 * 1024
    max_shard_samples: int = 50_000

    def __post_init__(self) -> None:
        if self.max_shard_bytes < 4096 or self.max_shard_samples < 1:
            raise ValueError("max_shard_bytes must be >= 4096 and max_shard_samples >= 1")


@dataclass
class ShardInfo:
    """What was written: the shard file name, sample count, size and checksum."""

    name: str
    n_samples: int
    n_bytes: int
    sha256: str
    n_atoms: int


@dataclass
class _Open:
    path: Path
    tmp: Path
    fileobj: Any
    digest: Any  # sha256 of every byte written so far
    offset: int = 0
    index: dict[str, list[Any]] = field(default_factory=lambda: {k: [] for k in
                                                               INDEX_KEYS})

    def write(self, data: bytes | memoryview) -> None:
        self.fileobj.write(data)
        self.digest.update(data)
        self.offset += len(data)


def tar_header(name: str, size: int) -> bytes:
    """The USTAR header block that ``tarfile`` writes for a regular file ``name`` of ``size`` bytes with our fixed
    metadata (mode 0644, uid/gid 0, mtime 0, empty user and group names), built without a ``TarInfo``."""
    raw = name.encode(tarfile.ENCODING, "surrogateescape")
    if len(raw) > _NAME_FIELD or not 0 <= size < 8 ** 11:  # a prefix split or a size field overflow: tarfile's way
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
    size_field = b"%011o\0" % size
    checksum = _FIXED_SUM + sum(raw) + sum(size_field)  # of all header bytes, its own field as spaces
    return b"".join((raw, b"\0" * (_NAME_FIELD - len(raw)), _MODE_IDS, size_field, _MTIME, b"%06o\0 " % checksum,
                     _AFTER_CHECKSUM, _TAIL))


def sample_checksum(data: bytes | memoryview) -> int:
    """The first 64 bits of the sha256 of one sample's bytes, as stored in the indices (sha256 rather than
    blake2b: CPUs with SHA extensions hash a small sample in about half the time)."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is None:
            raise OSError(exc.errno, f"{exc.strerror or exc}: {path}") from exc
        raise


def index_bytes(shard: str, index: dict[str, list[Any]]) -> bytes:
    doc = {"schema_version": SCHEMA_VERSION_STR, "shard": shard, **index}
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


class ShardWriter:
    """Append samples; shards named ``<prefix>-<000000>.tar`` appear only when complete.

    Use as a context manager or call :meth:`close`, which returns the list of :class:`ShardInfo`.
    """

    def __init__(self, out_dir: str | Path, prefix: str = "shard", config: WriterConfig | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not SAFE_NAME.fullmatch(prefix):
            raise ValueError(f"shard prefix {prefix!r} must be a plain file name "
                             "([A-Za-z0-9._-], not starting with '.')")
        self.prefix = prefix
        self.config = config or WriterConfig()
        self.shards: list[ShardInfo] = []
        self._cur: _Open | None = None
        self._keys: set[str] = set()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def add(self, g: AtomGraph) -> None:
        """Encode and append one sample; duplicate keys are an error."""
        if g.key in self._keys:
            raise ValueError(f"duplicate sample key {g.key!r} in shard writer {self.prefix!r}")
        self.add_encoded(g.key, encode(g), n_atoms=g.n_atoms, domain=g.domain, source=g.source,
                         trajectory=g.trajectory_id or "")

    def add_encoded(self, key: str, data: bytes, *, n_atoms: int, domain: str, source: str,
                    trajectory: str = "") -> None:
        """Append one already encoded sample with its index fields (compaction copies samples verbatim)."""
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in shard writer {self.prefix!r}")
        cur = self._cur
        member_bytes = TAR_BLOCK + len(data) + (-len(data)) % TAR_BLOCK
        if cur is not None and (len(cur.index["key"]) >= self.config.max_shard_samples
                                or cur.offset + member_bytes + 2 * TAR_BLOCK > self.config.max_shard_bytes):
            self._finish()
            cur = None
        if cur is None:
            cur = self._cur = self._open(len(self.shards))
        header_at = cur.offset
        cur.write(tar_header(f"{key}.{SUFFIX}", len(data)))
        cur.write(data)
        if len(data) % TAR_BLOCK:
            cur.write(b"\0" * (TAR_BLOCK - len(data) % TAR_BLOCK))
        idx = cur.index
        idx["key"].append(key)
        idx["offset"].append(header_at + TAR_BLOCK)
        idx["size"].append(len(data))
        idx["n_atoms"].append(int(n_atoms))
        idx["domain"].append(domain)
        idx["source"].append(source)
        idx["trajectory"].append(trajectory)
        idx["checksum"].append(sample_checksum(data))
        self._keys.add(key)

    def add_stored(self, data: bytes | memoryview, rows: Iterable[StoredRow]) -> None:
        """Append samples stored in ``data`` (a shard's bytes) with their index fields, each ``(key, offset, size,
        n_atoms, domain, source, trajectory, checksum)``; the caller has checked each sample against its checksum.
        A sample whose tar member in ``data`` is exactly what :meth:`add_encoded` writes (its header at ``offset -
        512``, the bytes, zero padding) is copied with its neighbours in one piece; any other goes through
        :meth:`add_encoded`. Either way the shards get the same bytes as :meth:`add_encoded` would write."""
        view = memoryview(data)
        max_samples, max_bytes = self.config.max_shard_samples, self.config.max_shard_bytes
        keys = self._keys
        start = end = 0  # the run of members in ``data`` not yet written to the open shard
        for key, off, size, n_atoms, domain, source, trajectory, checksum in rows:
            pad = -size % TAR_BLOCK
            stop = off + size + pad
            if (off < TAR_BLOCK or stop > len(view) or view[off - TAR_BLOCK:off] != tar_header(f"{key}.{SUFFIX}", size)
                    or view[off + size:stop] != _ZEROS[:pad]):
                self._write_run(view, start, end)
                start = end = 0
                self.add_encoded(key, bytes(view[off:off + size]), n_atoms=n_atoms, domain=domain, source=source,
                                 trajectory=trajectory)
                continue
            if key in keys:
                raise ValueError(f"duplicate sample key {key!r} in shard writer {self.prefix!r}")
            cur = self._cur
            at = (cur.offset if cur is not None else 0) + end - start  # where the member lands in the open shard
            if cur is not None and (len(cur.index["key"]) >= max_samples
                                    or at + stop - off + TAR_BLOCK + 2 * TAR_BLOCK > max_bytes):
                self._write_run(view, start, end)
                start = end = 0
                self._finish()
                cur = None
            if cur is None:
                self._write_run(view, start, end)
                start = end = 0
                cur = self._cur = self._open(len(self.shards))
                at = cur.offset
            if off - TAR_BLOCK != end:  # not adjacent to the pending run: write that first
                self._write_run(view, start, end)
                start = off - TAR_BLOCK
                at = cur.offset
            end = stop
            idx = cur.index
            idx["key"].append(key)
            idx["offset"].append(at + TAR_BLOCK)
            idx["size"].append(size)
            idx["n_atoms"].append(int(n_atoms))
            idx["domain"].append(domain)
            idx["source"].append(source)
            idx["trajectory"].append(trajectory)
            idx["checksum"].append(checksum)
            keys.add(key)
        self._write_run(view, start, end)

    def _write_run(self, view: memoryview, start: int, end: int) -> None:
        if end > start:
            assert self._cur is not None
            self._cur.write(view[start:end])

    def _open(self, number: int) -> _Open:
        path = self.out_dir / f"{self.prefix}-{number:06d}.tar"
        tmp = self.out_dir / f".{path.name}.tmp-{os.getpid()}"
        # stays open across add() calls; _finish closes it (a with-block cannot span calls)
        fileobj = open(tmp, "wb")  # noqa: SIM115
        return _Open(path, tmp, fileobj, hashlib.sha256())

    def _finish(self) -> None:
        cur = self._cur
        assert cur is not None
        cur.write(b"\0" * (2 * TAR_BLOCK))  # end of archive, then padding to a whole record, as tarfile does
        if cur.offset % TAR_RECORD:
            cur.write(b"\0" * (TAR_RECORD - cur.offset % TAR_RECORD))
        cur.fileobj.flush()
        os.fsync(cur.fileobj.fileno())
        cur.fileobj.close()
        write_atomic(cur.path.with_name(cur.path.name + INDEX_SUFFIX), index_bytes(cur.path.name, cur.index))
        os.replace(cur.tmp, cur.path)
        self.shards.append(ShardInfo(cur.path.name, len(cur.index["key"]), cur.path.stat().st_size,
                                     cur.digest.hexdigest(), int(sum(cur.index["n_atoms"]))))
        self._cur = None

    def close(self) -> list[ShardInfo]:
        """Finish the open shard and return every shard written."""
        if self._cur is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (its temporary file), keeping finished shards."""
        cur, self._cur = self._cur, None
        if cur is not None:
            try:
                cur.fileobj.close()  # may fail again (a full disk): the temporary file goes regardless
            finally:
                cur.tmp.unlink(missing_ok=True)
