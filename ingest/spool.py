"""Remote ingest inputs: listing ``s3://``/``gs://``/``az://`` globs and ``http(s)://`` files, and a bounded
local spool through which converters (which read local paths) see one remote file at a time.

Listing happens in the driver while planning (one listing per pattern, sizes and ETags included); the
download happens in the worker that converts the file, into ``$SCD_SPOOL_DIR`` (default: the system's
temporary folder), under the file's own base name so that converters chosen by suffix still match. A file
is removed as soon as its records are converted, and a file over the spool limit is a reject of that file,
never a full disk. A file split into record ranges is read by several units (and, when larger than a unit,
counted while planning): it is kept in the node's cache (``scd-cache`` in the spool folder, at most
``spool_bytes``, least recently used evicted first) and hard-linked into each reader's spool, so one node
downloads it once; a finished job drops its files from the driver's node. Network failures are retried with
the read side's back-off; a permanent one (403, 404 after planning) fails the unit with a one-line message,
so a re-run finishes it (a network fault never turns records into rejects).
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import shutil
import tempfile
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shards.config import ConfigError
from shards.format.storage import TIMEOUT_S, FetchError, is_http, is_url, object_fs, retrying

SPOOL_ENV = "SCD_SPOOL_DIR"
CACHE_DIR = "scd-cache"
BLOCK = 1 << 20
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class SpoolLimitError(FetchError):
    """A remote input is larger than the spool may hold (a property of the file: its reject, not a retry)."""


@dataclass(frozen=True)
class RemoteFile:
    """One listed remote input: its URL, size in bytes and a version stamp (ETag or modification time)."""

    url: str
    size: int
    stamp: str


def _scheme_prefix(url: str) -> str:
    return url[:url.index("://") + 3]


def _stamp(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "md5", "LastModified", "last_modified", "mtime", "updated"):
        if info.get(key):
            return str(info[key]).strip('"')
    return ""


def list_remote(pattern: str, source: str) -> list[RemoteFile]:
    """The files a URL or URL glob names, sorted; a missing object or an empty glob is a ``ConfigError``,
    a 403 or a missing bucket a one-line ``FetchError``."""
    if is_http(pattern):
        if glob.has_magic(pattern):
            raise ConfigError(f"source {source!r}: {pattern!r}: http(s) cannot be listed; name each file")
        return [_http_head(pattern)]
    fs, path = object_fs(pattern)
    prefix = _scheme_prefix(pattern)
    fs.invalidate_cache()

    def listing() -> dict[str, dict[str, Any]] | None:
        if glob.has_magic(path):
            return dict(fs.glob(path, detail=True))
        try:
            return {path: fs.info(path)}
        except FileNotFoundError:
            return None

    found = retrying(pattern, listing)
    if found is None:
        raise ConfigError(f"source {source!r}: input {pattern!r} does not exist")
    files = [RemoteFile(prefix + str(p).lstrip("/"), int(info.get("size") or 0), _stamp(info))
             for p, info in sorted(found.items()) if info.get("type", "file") == "file"]
    if glob.has_magic(path) and not files:
        raise ConfigError(f"source {source!r}: no files match {pattern!r}")
    if not files:
        raise ConfigError(f"source {source!r}: input {pattern!r} is a folder; remote inputs must be files "
                          "(list them, or use a glob)")
    return files


def _http_head(url: str) -> RemoteFile:
    def attempt() -> RemoteFile:
        req = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            size = int(resp.headers.get("Content-Length") or 0)
            return RemoteFile(url, size, resp.headers.get("ETag") or resp.headers.get("Last-Modified") or "")
    return retrying(url, attempt)


def spool_root() -> Path:
    """Where remote inputs are downloaded: ``$SCD_SPOOL_DIR`` or the system's temporary folder."""
    return Path(os.environ.get(SPOOL_ENV) or tempfile.gettempdir())


def local_name(url: str) -> str:
    """The file's base name made safe for a local folder (``..``, separators and odd characters replaced)."""
    base = url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    name = _UNSAFE.sub("_", base).lstrip(".")
    return name or "input"


@contextlib.contextmanager
def local_copy(location: str, limit: int, *, shared: tuple[int, str] | None = None) -> Iterator[Path]:
    """A local path holding ``location``: the path itself when local, else a spooled download of at most
    ``limit`` bytes that is deleted on exit. Raises :class:`SpoolLimitError` for a bigger file. ``shared``: the
    (size, stamp) listed for a remote file that several units read (one split into record ranges); it is then
    read through the node's cache (:func:`cached_link`), so its units on one node download it once."""
    if not is_url(location):
        yield Path(location[len("file://"):] if location.startswith("file://") else location)
        return
    root = spool_root()
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="scd-spool-", dir=root))
    try:
        dest = folder / local_name(location)
        if shared is None or not cached_link(location, shared, dest, limit):
            _download(location, dest, limit)
        yield dest
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def over_limit(limit: int) -> SpoolLimitError:
    """The error of a remote input larger than the spool may hold (the file's reject)."""
    return SpoolLimitError(f"file larger than the spool limit of {limit} bytes (spool_bytes)")


def cache_root() -> Path:
    """The node's cache of split remote inputs: ``scd-cache`` in the spool folder."""
    return spool_root() / CACHE_DIR


def cached_link(url: str, listed: tuple[int, str], dest: Path, limit: int) -> bool:
    """Hard-link the node's cached copy of ``url`` to ``dest``, downloading it into the cache first when it is
    not there. The cache holds at most ``limit`` bytes of files (least recently used evicted first); an entry
    is named by the URL and the (size, stamp) listed at planning, and holds only a copy of that size: a file
    changed since is downloaded to ``dest`` alone, never cached. A unit's link keeps its copy readable while
    others evict it. True when ``dest`` holds the file; False (the caller downloads a private copy) when the
    listed size is unknown or the spool's file system has no hard links."""
    size = listed[0]
    if size <= 0:
        return False
    if size > limit:
        raise over_limit(limit)
    cache = cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    entry = _entry(url, listed)
    target = entry / dest.name
    if not _has_size(target, size):
        shutil.rmtree(entry, ignore_errors=True)  # damaged or partial: filled again
        _evict(cache, limit - size)
        fill = Path(tempfile.mkdtemp(prefix=".fill-", dir=cache))
        try:
            _download(url, fill / dest.name, limit)
            if not _has_size(fill / dest.name, size):  # changed since planning: this unit's copy, not cached
                os.replace(fill / dest.name, dest)
                return True
            os.chmod(fill / dest.name, 0o444)  # shared by the units that link it: read-only
            with contextlib.suppress(OSError):  # another worker filled the entry first: theirs is used
                os.rename(fill, entry)
        finally:
            shutil.rmtree(fill, ignore_errors=True)
    try:
        os.link(target, dest)
        os.utime(entry)
    except OSError:
        return False
    return True


def forget_cached(files: Iterable[tuple[str, tuple[int, str]]]) -> None:
    """Drop this node's cached copies of ``files`` (URL, listed (size, stamp)): a finished job's remote inputs.
    Other nodes keep theirs until evicted."""
    for url, listed in files:
        shutil.rmtree(_entry(url, listed), ignore_errors=True)


def _entry(url: str, listed: tuple[int, str]) -> Path:
    size, stamp = listed
    return cache_root() / hashlib.sha256(f"{url}\0{size}\0{stamp}".encode()).hexdigest()[:32]


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _evict(cache: Path, keep: int) -> None:
    """Remove the least recently used entries until those left hold at most ``keep`` bytes."""
    entries = []
    for entry in cache.iterdir():
        if entry.name.startswith("."):
            continue
        try:
            entries.append((entry.stat().st_mtime_ns, sum(f.stat().st_size for f in entry.iterdir()), entry))
        except OSError:
            continue  # evicted by another worker meanwhile
    total = sum(n for _, n, _ in entries)
    for _, n, entry in sorted(entries):
        if total <= keep:
            break
        shutil.rmtree(entry, ignore_errors=True)
        total -= n


def _download(url: str, dest: Path, limit: int) -> None:
    def attempt() -> None:
        with _open(url) as src, open(dest, "wb") as out:
            n = 0
            for block in iter(lambda: src.read(BLOCK), b""):
                n += len(block)
                if n > limit:
                    raise over_limit(limit)
                out.write(block)
    retrying(url, attempt)


def _open(url: str) -> Any:
    """A readable binary stream of the URL (a context manager)."""
    if is_http(url):
        return urllib.request.urlopen(url, timeout=TIMEOUT_S)
    fs, path = object_fs(url)
    return fs.open(path, "rb", block_size=BLOCK)
