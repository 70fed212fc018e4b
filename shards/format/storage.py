"""Byte access to dataset files on local disk, over http(s) or in object storage, with bounded retries.

- local paths: plain file reads and memory maps;
- ``http://`` / ``https://``: the standard library's urllib (no extra dependency);
- any other ``scheme://`` URL (``s3://``, ``gs://``, ``az://``, ...): fsspec, with credentials taken from
  the environment the way each backend does (``AWS_ACCESS_KEY_ID``/``AWS_ENDPOINT_URL``/``AWS_PROFILE``
  for s3fs, ``GOOGLE_APPLICATION_CREDENTIALS`` for gcsfs, ...). Install with ``pip install 'scd-atoms[s3]'``.

Transient failures (HTTP 5xx and 429, connection resets, timeouts) are retried with exponential
back-off; permanent ones (404, 403, malformed URLs, a missing backend) raise :class:`FetchError` at once
with a one-line message that names the location.
"""
from __future__ import annotations

import http.client
import mmap
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from shards.format.jsoncheck import SAFE_NAME

T = TypeVar("T")
MAX_FILE_BYTES = 8 * 1024 ** 3
RETRIES = 5
BACKOFF_S = 0.25
TIMEOUT_S = 60.0

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_TRANSIENT_TEXT = re.compile(r"\b(5\d\d|429)\b|slow ?down|throttl|timed? ?out|reset|internal ?error|"
                             r"service ?unavailable|temporar", re.IGNORECASE)
_TRANSIENT = (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException)


class FetchError(OSError):
    """A dataset file could not be read; the message names it."""


def scheme(location: str) -> str:
    """The URL scheme in lower case (``s3``, ``https``, ...), or ``""`` for a local path."""
    if "://" not in location:  # a local path (the common case: many small files), without the regex
        return ""
    m = _SCHEME.match(location)
    return m.group(1).lower() if m else ""


def is_url(location: str) -> bool:
    """True for a remote location: any ``scheme://`` except ``file://``."""
    return scheme(location) not in ("", "file")


def is_http(location: str) -> bool:
    return scheme(location) in ("http", "https")


def join(root: str, name: str) -> str:
    """``root/name`` for a path or a URL; ``name`` must be a plain file name of ``[A-Za-z0-9._-]`` not
    starting with a dot (no separators, no ``%`` escapes a server could decode into one)."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise FetchError(f"refusing file name {name!r} from a dataset: not a plain file name "
                         "([A-Za-z0-9._-], not starting with '.')")
    return f"{root.rstrip('/')}/{name}" if is_url(root) else str(Path(_local(root)) / name)


def retrying(location: str, attempt_fn: Callable[[], T]) -> T:
    """Call ``attempt_fn()`` until it succeeds, a permanent error occurs or the retries run out (reads here,
    uploads in :mod:`shards.format.sink`, remote ingest inputs)."""
    last: BaseException | None = None
    for attempt in range(RETRIES):
        try:
            return attempt_fn()
        except FetchError:
            raise
        except urllib.error.HTTPError as exc:
            if exc.code < 500 and exc.code != 429:
                raise FetchError(f"{location}: HTTP {exc.code} {exc.reason}") from None
            last = exc
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise FetchError(f"{location}: file not found") from None
        except PermissionError as exc:
            raise FetchError(f"{location}: access denied ({_short(exc)})") from None
        except _TRANSIENT as exc:
            last = exc
        except OSError as exc:
            if not _looks_transient(exc):
                raise FetchError(f"{location}: {_short(exc)}") from None
            last = exc
        except (ValueError, TypeError) as exc:
            raise FetchError(f"{location}: malformed location ({_short(exc)})") from None
        if attempt + 1 < RETRIES:
            time.sleep(BACKOFF_S * 2 ** attempt)
    raise FetchError(f"{location}: failed after {RETRIES} attempts: {_short(last)}")


def _looks_transient(exc: OSError) -> bool:
    """Object-store clients wrap throttling and 5xx in plain OSErrors; recognise them by their text."""
    return _TRANSIENT_TEXT.search(str(exc)) is not None


def _short(exc: BaseException | None) -> str:
    return " ".join(str(exc).split())[:300] if exc is not None else "unknown error"


def _http(url: str, byte_range: tuple[int, int] | None = None) -> bytes:
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        raise FetchError(f"{url}: malformed URL (no host)")
    headers = {"Range": f"bytes={byte_range[0]}-{byte_range[0] + byte_range[1] - 1}"} if byte_range else {}

    def attempt() -> bytes:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S) as resp:
            length = resp.headers.get("Content-Length")
            if length is not None and int(length) > MAX_FILE_BYTES:
                raise FetchError(f"{url}: {length} bytes exceeds the {MAX_FILE_BYTES}-byte limit")
            data = resp.read(MAX_FILE_BYTES + 1)
            if length is not None and len(data) < int(length):
                raise http.client.IncompleteRead(data, int(length) - len(data))
            if byte_range and resp.status != 206:
                data = data[byte_range[0]:byte_range[0] + byte_range[1]]
            return data

    return retrying(url, attempt)


def object_fs(url: str) -> tuple[Any, str]:
    """The fsspec filesystem and path for an object-storage URL (credentials from the environment)."""
    try:
        import fsspec
    except ImportError:
        raise FetchError(f"{url}: reading {scheme(url)}:// needs fsspec; pip install 'scd-atoms[s3]'") from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        raise FetchError(f"{url}: no fsspec backend for {scheme(url)}:// ({_short(exc)})") from None
    except ValueError as exc:
        raise FetchError(f"{url}: malformed URL ({_short(exc)})") from None


def _object(url: str, byte_range: tuple[int, int] | None = None) -> bytes:
    fs, path = object_fs(url)

    def attempt() -> bytes:
        if byte_range is None:
            size = fs.size(path)
            if size is not None and size > MAX_FILE_BYTES:
                raise FetchError(f"{url}: {size} bytes exceeds the {MAX_FILE_BYTES}-byte limit")
            return bytes(fs.cat_file(path))
        return bytes(fs.cat_file(path, start=byte_range[0], end=byte_range[0] + byte_range[1]))

    return retrying(url, attempt)


def _remote(location: str, byte_range: tuple[int, int] | None = None) -> bytes:
    return _http(location, byte_range) if is_http(location) else _object(location, byte_range)


def _local(location: str) -> str:
    return location[len("file://"):] if scheme(location) == "file" else location


def read_bytes(location: str) -> bytes:
    """The whole file."""
    if is_url(location):
        return _remote(location)
    try:
        path = Path(_local(location))
        if path.stat().st_size > MAX_FILE_BYTES:
            raise FetchError(f"{location}: larger than the {MAX_FILE_BYTES}-byte limit")
        return path.read_bytes()
    except FileNotFoundError:
        raise FetchError(f"{location}: file not found") from None
    except OSError as exc:
        if isinstance(exc, FetchError):
            raise
        raise FetchError(f"{location}: {exc.strerror or exc}") from None


def map_bytes(location: str) -> bytes | mmap.mmap:
    """The whole file: memory-mapped (zero copy) when local, downloaded when a URL."""
    if is_url(location):
        return _remote(location)
    try:
        with open(_local(location), "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                return b""
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise FetchError(f"{location}: file not found") from None
    except OSError as exc:
        raise FetchError(f"{location}: {exc.strerror or exc}") from None


def read_range(location: str, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` (an HTTP Range request or a ranged object read for URLs)."""
    if is_url(location):
        data = _remote(location, (offset, size))
    else:
        try:
            with open(_local(location), "rb") as fh:
                fh.seek(offset)
                data = fh.read(size)
        except FileNotFoundError:
            raise FetchError(f"{location}: file not found") from None
    if len(data) != size:
        raise FetchError(f"{location}: expected {size} bytes at offset {offset}, got {len(data)} (truncated?)")
    return data


def exists(location: str) -> bool:
    if is_url(location):
        try:
            _remote(location, (0, 1))
            return True
        except FetchError:
            return False
    return Path(_local(location)).exists()
