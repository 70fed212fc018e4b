"""Byte access to dataset files on local disk or over http(s), with bounded retries."""
from __future__ import annotations

import mmap
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

MAX_FILE_BYTES = 8 * 1024 ** 3
RETRIES = 4
BACKOFF_S = 0.25


class FetchError(OSError):
    """A dataset file could not be read; the message names it."""


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def join(root: str, name: str) -> str:
    """``root/name`` for a path or a URL; ``name`` must be a plain file name (no traversal)."""
    if "/" in name or "\\" in name or name in ("", ".", ".."):
        raise FetchError(f"refusing file name {name!r} from a dataset: not a plain file name")
    return f"{root.rstrip('/')}/{name}" if is_url(root) else str(Path(root) / name)


def _http(url: str, byte_range: tuple[int, int] | None = None) -> bytes:
    headers = {"Range": f"bytes={byte_range[0]}-{byte_range[0] + byte_range[1] - 1}"} if byte_range else {}
    last: Exception | None = None
    for attempt in range(RETRIES):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as resp:
                length = resp.headers.get("Content-Length")
                if length is not None and int(length) > MAX_FILE_BYTES:
                    raise FetchError(f"{url}: {length} bytes exceeds the {MAX_FILE_BYTES}-byte limit")
                data = resp.read(MAX_FILE_BYTES + 1)
                if byte_range and resp.status != 206:
                    data = data[byte_range[0]:byte_range[0] + byte_range[1]]
                return data
        except urllib.error.HTTPError as exc:
            if exc.code < 500 and exc.code != 429:
                raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from None
            last = exc
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            last = exc
        time.sleep(BACKOFF_S * 2 ** attempt)
    raise FetchError(f"{url}: failed after {RETRIES} attempts: {last}")


def read_bytes(location: str) -> bytes:
    """The whole file."""
    if is_url(location):
        return _http(location)
    try:
        path = Path(location)
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
        return _http(location)
    try:
        with open(location, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                return b""
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise FetchError(f"{location}: file not found") from None
    except OSError as exc:
        raise FetchError(f"{location}: {exc.strerror or exc}") from None


def read_range(location: str, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` (an HTTP Range request for URLs)."""
    if is_url(location):
        data = _http(location, (offset, size))
    else:
        try:
            with open(location, "rb") as fh:
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
            _http(location, (0, 1))
            return True
        except FetchError:
            return False
    return Path(location).exists()
