"""Writing a dataset's files under an object-storage prefix (``s3://``, ``gs://``, ``az://``, any fsspec URL).

Atomicity: every object is published by one PUT, or by a multipart upload completed in one call for big
files. S3, GCS and Azure Blob make an object visible only once its upload has completed, so a reader sees
the previous object or the new one, never a partial one: no temporary keys are needed. The order of
publication carries the rest, as renames do on disk: a shard's index before its tar, a unit's shards
before its outcome, and a dataset's ``manifest.json`` after everything else (a dataset exists iff its
manifest does).

Credentials and endpoint come from the environment as fsspec's backends read them (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...). Transient failures are retried with the
read side's back-off (:func:`shards.format.storage.retrying`); permanent ones (403, a missing bucket) are
one-line :class:`~shards.format.storage.FetchError` messages naming the URL.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from shards.format.jsoncheck import SAFE_NAME
from shards.format.manifest import INDEX_DIR, MANIFEST
from shards.format.storage import FetchError, is_http, is_url, object_fs, retrying
from shards.format.writer import INDEX_SUFFIX

T = TypeVar("T")
BLOCK = 1 << 20


def check_name(name: str, *, folder: bool = False) -> str:
    """A relative object (or, with ``folder``, folder) name: ``/``-separated plain file names
    (``[A-Za-z0-9._-]``, starting with a letter or digit; folders may also start with ``_``, as ingest's
    ``_units``)."""
    *folders, base = name.split("/")
    if folder:
        folders, base = [*folders, base], "x"
    if not SAFE_NAME.fullmatch(base) or not all(SAFE_NAME.fullmatch(f.removeprefix("_")) for f in folders):
        raise FetchError(f"refusing object name {name!r}: not a relative path of plain file names")
    return name


class ObjectSink:
    """The objects under one URL prefix, written whole and named relative to it."""

    def __init__(self, root: str) -> None:
        if not is_url(root) or is_http(root):
            raise ValueError(f"{root}: not an object-storage URL (s3://, gs://, az://, ...); http(s) is read-only")
        self.root = root.rstrip("/")
        self.fs, path = object_fs(self.root)
        self.path = str(path).rstrip("/")

    def url(self, name: str) -> str:
        return f"{self.root}/{check_name(name)}"

    def _key(self, name: str) -> str:
        return f"{self.path}/{check_name(name)}"

    def _call(self, url: str, fn: Callable[[], T], missing: str) -> T:
        def attempt() -> T:
            try:
                return fn()
            except FileNotFoundError:
                raise FetchError(f"{url}: {missing}") from None
        return retrying(url, attempt)

    def check_writable(self) -> None:
        """Fail early, in one line, when the bucket is missing or the credentials may not list it."""
        bucket = self.path.split("/", 1)[0]
        self.fs.invalidate_cache()
        self._call(self.root, lambda: self.fs.ls(bucket, detail=False), f"bucket {bucket!r} does not exist")

    def put_bytes(self, name: str, data: bytes) -> None:
        key = self._key(name)
        self._call(self.url(name), lambda: self.fs.pipe_file(key, data), "bucket does not exist")

    def put_file(self, name: str, local: Path) -> None:
        key = self._key(name)
        self._call(self.url(name), lambda: self.fs.put_file(str(local), key), "bucket does not exist")

    def put_tree(self, local: Path, name: str) -> None:
        """Upload every file under the folder ``local`` as ``name/...``, then delete objects under ``name/``
        that the folder does not have (a shorter zarr index replacing a longer one)."""
        files = sorted(p for p in local.rglob("*") if p.is_file())
        wanted = {f"{name}/{p.relative_to(local).as_posix()}" for p in files}
        for p in files:
            self.put_file(f"{name}/{p.relative_to(local).as_posix()}", p)
        self.delete(n for n in self.find(name) if n not in wanted)

    def get_bytes(self, name: str) -> bytes:
        key = self._key(name)
        return self._call(self.url(name), lambda: bytes(self.fs.cat_file(key)), "object not found")

    def get_file(self, name: str, local: Path) -> None:
        """Download to ``local`` through a temporary file (never a partial local file)."""
        key = self._key(name)
        tmp = local.with_name(f".{local.name}.tmp-{os.getpid()}")

        def fetch() -> None:
            self.fs.get_file(key, str(tmp))
            os.replace(tmp, local)

        try:
            self._call(self.url(name), fetch, "object not found")
        finally:
            tmp.unlink(missing_ok=True)

    def sha256(self, name: str) -> str | None:
        """The sha256 of the object's bytes as stored (read in blocks), or None when it does not exist."""
        key = self._key(name)

        def digest() -> str | None:
            try:
                fh = self.fs.open(key, "rb", block_size=BLOCK)
            except FileNotFoundError:
                return None
            h = hashlib.sha256()
            with fh:
                for block in iter(lambda: fh.read(BLOCK), b""):
                    h.update(block)
            return h.hexdigest()

        return retrying(self.url(name), digest)

    def find(self, folder: str = "") -> list[str]:
        """Names of every object under ``folder`` (all of the prefix when empty), relative to the root."""
        base = self.path if not folder else f"{self.path}/{check_name(folder, folder=True)}"
        self.fs.invalidate_cache()

        def listing() -> list[str]:
            try:
                return [str(p) for p in self.fs.find(base)]
            except FileNotFoundError:
                return []

        found = retrying(f"{self.root}/{folder}" if folder else self.root, listing)
        return sorted(p[len(self.path) + 1:] for p in found if p.startswith(self.path + "/"))

    def names(self, folder: str = "") -> list[str]:
        """Names of the objects directly in ``folder`` (not in its sub-folders), relative to the root."""
        prefix = f"{folder}/" if folder else ""
        return [n for n in self.find(folder) if "/" not in n[len(prefix):]]

    def delete(self, names: Iterable[str]) -> None:
        keys = [self._key(n) for n in names]
        if keys:
            self._call(self.root, lambda: self.fs.rm(keys), "bucket does not exist")
            self.fs.invalidate_cache()


def publish_dataset(local: Path, sink: ObjectSink, shard_names: Iterable[str]) -> None:
    """Upload a finished local dataset in reader-safe order: each shard's index then its tar, the zarr
    index, and the manifest last."""
    for name in shard_names:
        sink.put_file(name + INDEX_SUFFIX, local / (name + INDEX_SUFFIX))
        sink.put_file(name, local / name)
    sink.put_tree(local / INDEX_DIR, INDEX_DIR)
    sink.put_file(MANIFEST, local / MANIFEST)
