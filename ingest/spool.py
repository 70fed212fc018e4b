"""Remote ingest inputs: listing ``s3://``/``gs://``/``az://`` globs and ``http(s)://`` files, and a bounded
local spool through which converters (which read local paths) see one remote file at a time.

Listing happens in the driver while planning (one listing per pattern, sizes and ETags included); the
download happens in the worker that converts the file, into ``$SCD_SPOOL_DIR`` (default: the system's
temporary folder), under the file's own base name so that converters chosen by suffix still match. A file
is removed as soon as its records are converted, so a worker's spool holds at most one input, and a file
over the spool limit is a reject of that file, never a full disk. Network failures are retried with the read
side's back-off; a permanent one (403, 404 after planning) fails the unit with a one-line message, so a
re-run finishes it (a network fault never turns records into rejects).
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shards.config import ConfigError
from shards.format.storage import TIMEOUT_S, FetchError, is_http, is_url, object_fs, retrying

SPOOL_ENV = "SCD_SPOOL_DIR"
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
def local_copy(location: str, limit: int) -> Iterator[Path]:
    """A local path holding ``location``: the path itself when local, else a spooled download of at most
    ``limit`` bytes that is deleted on exit. Raises :class:`SpoolLimitError` for a bigger file."""
    if not is_url(location):
        yield Path(location[len("file://"):] if location.startswith("file://") else location)
        return
    root = spool_root()
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="scd-spool-", dir=root))
    try:
        dest = folder / local_name(location)
        _download(location, dest, limit)
        yield dest
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _download(url: str, dest: Path, limit: int) -> None:
    def attempt() -> None:
        with _open(url) as src, open(dest, "wb") as out:
            n = 0
            for block in iter(lambda: src.read(BLOCK), b""):
                n += len(block)
                if n > limit:
                    raise SpoolLimitError(f"file larger than the spool limit of {limit} bytes (spool_bytes)")
                out.write(block)
    retrying(url, attempt)


def _open(url: str) -> Any:
    """A readable binary stream of the URL (a context manager)."""
    if is_http(url):
        return urllib.request.urlopen(url, timeout=TIMEOUT_S)
    fs, path = object_fs(url)
    return fs.open(path, "rb", block_size=BLOCK)
