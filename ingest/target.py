"""Where an ingest job writes: a local folder, or an object-storage prefix with no shared filesystem.

Both targets offer the driver the same steps (hold the output, find completed units, write reports, pack
the units' tails, finalize the index and manifest last), so the job logic in :mod:`ingest.run` is one.

- :class:`FolderTarget`: the dataset folder, locked with ``flock`` (see :mod:`ingest.lock`).
- :class:`BucketTarget`: a URL such as ``s3://bucket/datasets/cod``. Workers upload their units directly
  (:func:`ingest.unit.run_unit`). The driver keeps a local staging folder (``$SCD_SPOOL_DIR`` or the system's
  temporary folder, one per URL, locked there) in which it packs tails and builds ``index.zarr`` and
  ``manifest.json`` from the uploaded shard indices and the sha256 each unit recorded, then uploads them,
  the manifest last. It first writes ``_units/driver.json`` (who runs the job), which doubles as the
  write-permission check: a 403 or a missing bucket is reported before any work, and removes it at the end.
  Two drivers on different machines writing one prefix are not prevented (object stores have no lock);
  the record names the other one when a driver finds it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ingest.job import Mapper
from ingest.lock import output_lock, remove_temp_files
from ingest.outcome import UnitOutcome
from ingest.spool import spool_root
from ingest.unit import (
    TAILS_DIR,
    UNITS_DIR,
    clear_leftovers,
    completed,
    completed_in_bucket,
    object_intact,
    outcome_name,
    shard_intact,
)
from shards.format.manifest import INDEX_DIR, MANIFEST, finalize_dataset, read_shard_index
from shards.format.reader import ShardError
from shards.format.sink import ObjectSink
from shards.format.writer import INDEX_SUFFIX, ShardInfo, ShardWriter, WriterConfig, write_atomic

PACK_PREFIX = "pack"
PACK_RECORD = f"{UNITS_DIR}/pack.json"
DRIVER_RECORD = f"{UNITS_DIR}/driver.json"
CHECK_BATCH = 8  # units whose uploaded shards one worker task reads back and hashes


def _pack_record(inputs: list[list[str]], shards: list[ShardInfo]) -> bytes:
    return json.dumps({"inputs": inputs, "shards": [asdict(s) for s in shards]}, sort_keys=True).encode()


def _parse_pack(data: bytes | None) -> tuple[list[Any], list[ShardInfo]] | None:
    try:
        doc = json.loads(data) if data is not None else None
        return (doc["inputs"], [ShardInfo(**s) for s in doc["shards"]]) if isinstance(doc, dict) else None
    except (ValueError, KeyError, TypeError):
        return None


def _tail_inputs(outcomes: list[UnitOutcome]) -> tuple[list[ShardInfo], list[list[str]]]:
    tails = [o.tail for o in outcomes if o.tail is not None]
    return tails, [[t.name, t.sha256] for t in tails]


class FolderTarget:
    """A local dataset folder."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.location = str(out)
        self.created = not out.exists()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Create and lock the folder; temporary files are removed before and after."""
        self.out.mkdir(parents=True, exist_ok=True)
        folders = (self.out, self.out / UNITS_DIR, self.out / TAILS_DIR)
        with output_lock(self.out):
            remove_temp_files(*folders)
            try:
                yield
            finally:
                remove_temp_files(*folders)

    def discard(self) -> None:
        """Remove the folder when this job created it (a failed configuration leaves nothing behind)."""
        if self.created:
            shutil.rmtree(self.out, ignore_errors=True)

    def begin(self) -> None:
        (self.out / TAILS_DIR).mkdir(parents=True, exist_ok=True)
        (self.out / MANIFEST).unlink(missing_ok=True)

    def completed_units(self, units: list[Any], mapper: Mapper) -> dict[int, UnitOutcome]:
        """The recorded outcomes of the units that are complete and intact, by unit number."""
        found = ((u.number, completed(self.out, u)) for u in units)
        return {n: o for n, o in found if o is not None}

    def remove_stale(self, prefixes: set[str]) -> None:
        """Drop shards and outcomes of units that are no longer in the plan (the job file changed)."""
        for p in sorted((self.out / UNITS_DIR).glob("u*.json")):
            if p.stem not in prefixes:
                clear_leftovers(self.out, p.stem)
        for folder in (self.out, self.out / TAILS_DIR):
            for p in sorted(folder.glob("u*-*.tar*")):
                if p.name.split("-")[0] not in prefixes and p.is_file():
                    p.unlink()

    def put(self, name: str, data: bytes) -> None:
        write_atomic(self.out / name, data)

    def pack_tails(self, outcomes: list[UnitOutcome], writer: WriterConfig) -> list[ShardInfo]:
        """Copy the units' tail shards, in unit order, into target-size ``pack-NNNNNN.tar`` shards; reuse an
        intact earlier packing of the very same tails (its record is written after the shards)."""
        from shards.tools.compact import pack_local

        tails, inputs = _tail_inputs(outcomes)
        record_path = self.out / PACK_RECORD
        record = _parse_pack(record_path.read_bytes() if record_path.is_file() else None)
        if record is not None and record[0] == inputs and all(shard_intact(self.out, s) for s in record[1]):
            return record[1]
        record_path.unlink(missing_ok=True)
        for p in self.out.glob(f"{PACK_PREFIX}-*"):
            p.unlink()
        shards = pack_local(((self.out / TAILS_DIR / t.name, t.sha256) for t in tails), self.out, PACK_PREFIX,
                            writer)
        write_atomic(record_path, _pack_record(inputs, shards))
        return shards

    def finalize(self, shards: list[ShardInfo], writer: WriterConfig, extra: dict[str, Any]) -> None:
        finalize_dataset(self.out, [s.name for s in shards], writer=writer, extra=extra)

    def tidy(self, outcomes: list[UnitOutcome], packed: list[ShardInfo]) -> None:
        """Nothing to do: a folder is kept tidy as it is written."""


class BucketTarget:
    """An object-storage prefix; see the module docstring."""

    def __init__(self, url: str) -> None:
        self.sink = ObjectSink(url)
        self.location = self.sink.root
        digest = hashlib.sha256(self.location.encode()).hexdigest()[:16]
        self.stage = spool_root() / f"scd-ingest-{digest}"

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Lock the local staging folder, record the driver in the bucket (the write check), and clear both
        at the end (only a killed driver leaves its record)."""
        self.stage.mkdir(parents=True, exist_ok=True)
        with output_lock(self.stage):
            self._clear_stage()
            self.sink.check_writable()
            self._claim()
            try:
                yield
            except BaseException:
                with contextlib.suppress(OSError):  # the job's own error is the one to report
                    self.sink.delete([DRIVER_RECORD])
                raise
            else:
                self.sink.delete([DRIVER_RECORD])
            finally:
                self._clear_stage()

    def _claim(self) -> None:
        if self.sink.sha256(DRIVER_RECORD) is not None:
            try:
                other = json.loads(self.sink.get_bytes(DRIVER_RECORD))
                who = f"pid {other['pid']} on {other['host']} (since {other['since']})"
            except (ValueError, KeyError, TypeError, OSError):
                who = "an unknown driver"
            print(f"{self.location}: taking over from {who}, which did not finish; if it is still running, stop "
                  "one of the two", file=sys.stderr)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        self.sink.put_bytes(DRIVER_RECORD, json.dumps(me, sort_keys=True).encode())

    def _clear_stage(self) -> None:
        for p in self.stage.iterdir():
            if p.name == ".ingest.lock":
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    def discard(self) -> None:
        """Nothing was written to the bucket before the configuration was checked."""

    def begin(self) -> None:
        self.sink.delete([MANIFEST])  # a dataset exists iff its manifest does

    def completed_units(self, units: list[Any], mapper: Mapper) -> dict[int, UnitOutcome]:
        """As :meth:`FolderTarget.completed_units`; the units that have an outcome (one listing) are checked
        in batches on the workers (``mapper``), since checking reads every shard back from the bucket."""
        recorded = set(self.sink.names(UNITS_DIR))
        todo = [u for u in units if outcome_name(u.prefix) in recorded]
        batches = [[(self.location, u) for u in todo[a:a + CHECK_BATCH]] for a in range(0, len(todo), CHECK_BATCH)]
        results = (o for batch in mapper(completed_in_bucket, batches) for o in batch)
        return {u.number: o for u, o in zip(todo, results, strict=True) if o is not None}

    def remove_stale(self, prefixes: set[str]) -> None:
        """Stale objects are removed by :meth:`tidy` at the end, with one listing of the prefix."""

    def put(self, name: str, data: bytes) -> None:
        self.sink.put_bytes(name, data)

    def pack_tails(self, outcomes: list[UnitOutcome], writer: WriterConfig) -> list[ShardInfo]:
        """As :meth:`FolderTarget.pack_tails`, streaming: one tail at a time is downloaded into the staging
        folder, checked against its recorded sha256 and copied; each packed shard is uploaded (index first)
        as soon as it is closed and its tar deleted locally (its index stays for :meth:`finalize`). The record
        is uploaded after every packed shard."""
        from shards.tools.compact import copy_samples

        tails, inputs = _tail_inputs(outcomes)
        data = self.sink.get_bytes(PACK_RECORD) if self.sink.sha256(PACK_RECORD) is not None else None
        record = _parse_pack(data)
        if record is not None and record[0] == inputs and all(object_intact(self.sink, "", s) for s in record[1]):
            return record[1]
        self.sink.delete([PACK_RECORD])
        local = self.stage / TAILS_DIR
        local.mkdir(parents=True, exist_ok=True)
        published = 0
        with ShardWriter(self.stage, prefix=PACK_PREFIX, config=writer) as w:
            for t in tails:
                for suffix in (INDEX_SUFFIX, ""):
                    self.sink.get_file(f"{TAILS_DIR}/{t.name}{suffix}", local / (t.name + suffix))
                blob = (local / t.name).read_bytes()
                if hashlib.sha256(blob).hexdigest() != t.sha256:
                    raise ShardError(f"{self.sink.url(TAILS_DIR + '/' + t.name)}: sha256 does not match the "
                                     "unit's record (changed since it was written)")
                copy_samples(w, t.name, blob, read_shard_index(local / t.name))
                for suffix in (INDEX_SUFFIX, ""):
                    (local / (t.name + suffix)).unlink()
                published = self._publish(w.shards, published)
        self._publish(w.shards, published)
        self.sink.put_bytes(PACK_RECORD, _pack_record(inputs, w.shards))
        return list(w.shards)

    def _publish(self, shards: list[ShardInfo], done: int) -> int:
        """Upload the closed shards from ``done`` on (index first), deleting each local tar; returns the count."""
        for s in shards[done:]:
            self.sink.put_file(s.name + INDEX_SUFFIX, self.stage / (s.name + INDEX_SUFFIX))
            self.sink.put_file(s.name, self.stage / s.name)
            (self.stage / s.name).unlink()
        return len(shards)

    def finalize(self, shards: list[ShardInfo], writer: WriterConfig, extra: dict[str, Any]) -> None:
        """Build the zarr index and manifest locally from the shard indices and the recorded digests, then
        upload the index and, last, the manifest."""
        for s in shards:
            path = self.stage / (s.name + INDEX_SUFFIX)
            if not path.is_file():
                self.sink.get_file(s.name + INDEX_SUFFIX, path)
        finalize_dataset(self.stage, [s.name for s in shards], writer=writer, extra=extra,
                         known={s.name: (s.sha256, s.n_bytes) for s in shards})
        self.sink.put_tree(self.stage / INDEX_DIR, INDEX_DIR)
        self.sink.put_file(MANIFEST, self.stage / MANIFEST)

    def tidy(self, outcomes: list[UnitOutcome], packed: list[ShardInfo]) -> None:
        """Delete shards, tails and outcomes that no current unit or packing refers to (left by an earlier
        job file, or by a unit whose inputs changed), with one listing of the prefix."""
        keep = {f"{UNITS_DIR}/{o.unit}.json" for o in outcomes} | {PACK_RECORD, DRIVER_RECORD}
        for o in outcomes:
            keep |= {s.name + x for s in o.shards for x in ("", INDEX_SUFFIX)}
            keep |= {f"{TAILS_DIR}/{o.tail.name}{x}" for x in ("", INDEX_SUFFIX) if o.tail is not None}
        keep |= {s.name + x for s in packed for x in ("", INDEX_SUFFIX)}
        stale = [n for n in self.sink.find() if _ingest_owned(n) and n not in keep]
        self.sink.delete(stale)


def _ingest_owned(name: str) -> bool:
    """Objects an ingest job writes and may delete: unit shards, packs, outcomes and tails."""
    base = name.rsplit("/", 1)[-1]
    if name.startswith(f"{UNITS_DIR}/"):
        return True
    return "/" not in name and (base.startswith(f"{PACK_PREFIX}-") or (base.startswith("u") and "-" in base
                                                                          and ".tar" in base))
