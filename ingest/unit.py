"""Execute one work unit: convert its files, write its shards, record its outcome last.

A unit's outcome ``_units/<prefix>.json`` (:class:`~ingest.outcome.UnitOutcome`) is written last. It lists
every file the unit covered with its own accounting (inputs = accepted + rejected), the unit's full-size
shards (in the dataset folder) and its tail: the last, short shard, kept in ``_units/tails/`` until the
driver packs the tails of all units into target-size shards. On a re-run a unit is skipped when its
outcome exists, its fingerprint matches and every shard it lists has the recorded sha256; otherwise it
runs again, writing the very same bytes.

The output may be a folder or an object-storage URL. For a URL the unit is written into a private local
staging folder exactly as for a folder, then published: each shard's index, then the shard, the tail, and
the outcome last (see :mod:`shards.format.sink` for why readers never see a partial object). Remote inputs
are read through the bounded spool of :mod:`ingest.spool`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ingest.outcome import FileRow, UnitOutcome
from ingest.plugin import MAX_FILE_BYTES
from ingest.spool import SpoolLimitError, local_copy, spool_root
from shards.format.manifest import sha256_file
from shards.format.sink import ObjectSink
from shards.format.storage import is_url
from shards.format.writer import INDEX_SUFFIX, ShardInfo, ShardWriter, WriterConfig, write_atomic

UNITS_DIR = "_units"
TAILS_DIR = "_units/tails"


def outcome_name(prefix: str) -> str:
    """The outcome's name relative to the dataset root."""
    return f"{UNITS_DIR}/{prefix}.json"


def outcome_path(out: Path, prefix: str) -> Path:
    return out / outcome_name(prefix)


def unit_fingerprint(unit: Any) -> str:
    """Hash of what the unit reads: local files by (size, mtime_ns) now, remote ones by (size, ETag) as
    listed when the job was planned."""
    stats: list[tuple[int, int | str]] = []
    for item in unit.items:
        if item.remote is not None:
            stats.append(item.remote)
            continue
        try:
            st = os.stat(item.path)
            stats.append((st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append((-1, -1))
    return str(unit.fingerprint(stats))


def is_tail(shard: ShardInfo, writer: WriterConfig) -> bool:
    """A shard under half the target size (bytes and samples) is packed with others by the driver."""
    return shard.n_bytes * 2 < writer.max_shard_bytes and shard.n_samples * 2 < writer.max_shard_samples


def shard_intact(folder: Path, shard: ShardInfo) -> bool:
    path = folder / shard.name
    return (path.is_file() and (folder / (shard.name + INDEX_SUFFIX)).is_file()
            and sha256_file(path) == shard.sha256)


def object_intact(sink: ObjectSink, folder: str, shard: ShardInfo) -> bool:
    """The uploaded shard has the recorded sha256 and its index exists (remote counterpart of
    :func:`shard_intact`)."""
    where = f"{folder}/" if folder else ""
    return (sink.sha256(where + shard.name) == shard.sha256
            and sink.sha256(where + shard.name + INDEX_SUFFIX) is not None)


def _parse(data: bytes | None, unit: Any) -> UnitOutcome | None:
    if data is None:
        return None
    try:
        outcome = UnitOutcome.from_json(data)
    except ValueError:
        return None
    return outcome if outcome.fingerprint == unit_fingerprint(unit) else None


def completed(out: Path | ObjectSink, unit: Any) -> UnitOutcome | None:
    """The recorded outcome when the unit is complete and intact (in a folder or a bucket), else None."""
    if isinstance(out, ObjectSink):
        return _completed_remote(out, unit)
    path = outcome_path(out, unit.prefix)
    outcome = _parse(path.read_bytes() if path.is_file() else None, unit)
    if outcome is None or not all(shard_intact(out, s) for s in outcome.shards):
        return None
    if outcome.tail is not None and not shard_intact(out / TAILS_DIR, outcome.tail):
        return None
    return outcome


def completed_in_bucket(batch: list[tuple[str, Any]]) -> list[UnitOutcome | None]:
    """:func:`completed` for (output URL, unit) pairs; run in workers, since it reads every shard back."""
    return [completed(ObjectSink(url), unit) for url, unit in batch]


def _completed_remote(sink: ObjectSink, unit: Any) -> UnitOutcome | None:
    name = outcome_name(unit.prefix)
    outcome = _parse(sink.get_bytes(name) if sink.sha256(name) is not None else None, unit)
    if outcome is None or not all(object_intact(sink, "", s) for s in outcome.shards):
        return None
    if outcome.tail is not None and not object_intact(sink, TAILS_DIR, outcome.tail):
        return None
    return outcome


def clear_leftovers(out: Path, prefix: str) -> None:
    """Remove shards, tails, indices and temporary files of an unfinished run of this unit."""
    for folder in (out, out / TAILS_DIR):
        for pattern in (f"{prefix}-*", f".{prefix}-*"):
            for p in folder.glob(pattern):
                p.unlink(missing_ok=True)
    outcome_path(out, prefix).unlink(missing_ok=True)


class _Files:
    """Per-file accounting of one unit and the converters it used (instances cached per unit)."""

    def __init__(self, unit: Any, spool_bytes: int) -> None:
        self.unit = unit
        self.spool_bytes = spool_bytes
        self.convs: dict[str, tuple[Any, Any]] = {}
        self.versions: dict[str, str] = {}
        self._sniffer: Any = None

    def sniff(self, path: Path) -> str:
        """The name of the converter that claims ``path`` among those of the unit's domain (``converter: auto``)."""
        if self._sniffer is None:
            from ingest.registry import Sniffer

            self._sniffer = Sniffer(self.unit.domain, self.unit.options)
        return str(self._sniffer(path).name)

    def converter(self, name: str) -> tuple[Any, Any]:
        if name not in self.convs:
            from ingest.registry import converter_version, get_converter

            conv = get_converter(name)()
            self.convs[name] = (conv, conv.parse_options(self.unit.options))
            self.versions[name] = converter_version(name)
        return self.convs[name]

    def domain(self, name: str) -> str:
        """The domain converter ``name`` gives this unit's samples (its options may fix one)."""
        conv, options = self.converter(name)
        return str(conv.output_domain(options))


def _convert_item(files: _Files, item: Any, w: ShardWriter, rejects: list[Any], domains: dict[str, int]) -> FileRow:
    """Convert one file (or record range) of the unit, read through the spool when remote."""
    from ingest.plugin import Reject

    try:
        with local_copy(item.path, files.spool_bytes, shared=item.remote if item.split else None) as path:
            return _convert_local(files, item, path, w, rejects, domains)
    except SpoolLimitError as exc:
        name = item.converter
        rejects.append(Reject(item.file_id, None, name, str(exc)))
        domain = files.unit.domain or (files.domain(name) if name != "auto" else "unknown")
        return FileRow(item.file_id, name, domain, item.start, item.stop, inputs=1, rejected=1)


def _convert_local(files: _Files, item: Any, path: Path, w: ShardWriter, rejects: list[Any],
                   domains: dict[str, int]) -> FileRow:
    from ingest.plugin import Reject, safe_convert

    unit = files.unit
    name = item.converter
    if name == "auto":
        try:
            name = files.sniff(path)
        except Exception as exc:  # noqa: BLE001 - sniffing a broken file: the file is one reject, not a crash
            reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else f"{type(exc).__name__}: {exc}"
            rejects.append(Reject(item.file_id, None, "auto", f"cannot choose a converter: {reason}"[:400]))
            return FileRow(item.file_id, item.converter, unit.domain or "unknown", item.start, item.stop,
                           inputs=1, rejected=1)
    conv, options = files.converter(name)
    accepted = rejected = 0
    records = range(item.start, item.stop) if item.start is not None else None
    for out in safe_convert(conv, path, options, source=unit.source, file_id=item.file_id, records=records):
        if isinstance(out, Reject):
            rejects.append(out)
            rejected += 1
            continue
        w.add(out)
        accepted += 1
        domains[out.domain] = domains.get(out.domain, 0) + 1
    if records is not None and accepted + rejected != len(records):
        raise RuntimeError(f"converter {name} yielded {accepted + rejected} items for {len(records)} records of "
                           f"{item.file_id} [{item.start}, {item.stop}): accounting broken")
    return FileRow(item.file_id, name, files.domain(name), item.start, item.stop, accepted + rejected, accepted,
                   rejected)


def run_unit(unit: Any, out_dir: str, writer: WriterConfig, spool_bytes: int = MAX_FILE_BYTES) -> UnitOutcome:
    """Convert one unit into shards in a folder or under an object-storage URL; returns (and records) the
    outcome. Raises on converter bugs; an OSError without a file name (a full disk) is raised again naming
    the output."""
    try:
        if is_url(out_dir):
            return _run_remote(unit, ObjectSink(out_dir), writer, spool_bytes)
        return _run(unit, Path(out_dir), writer, spool_bytes)
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, f"{exc.strerror or exc} (writing unit {unit.prefix} into {out_dir})") from exc


def _run(unit: Any, out: Path, writer: WriterConfig, spool_bytes: int) -> UnitOutcome:
    clear_leftovers(out, unit.prefix)
    files = _Files(unit, spool_bytes)
    rejects: list[Any] = []
    domains: dict[str, int] = {}
    with ShardWriter(out, prefix=unit.prefix, config=writer) as w:
        rows = [_convert_item(files, item, w, rejects, domains) for item in unit.items]
    shards = list(w.shards)
    tail = shards.pop() if shards and is_tail(shards[-1], writer) else None
    if tail is not None:
        (out / TAILS_DIR).mkdir(parents=True, exist_ok=True)
        for suffix in (INDEX_SUFFIX, ""):  # the index first: a tail is whole once the tar has moved
            os.replace(out / (tail.name + suffix), out / TAILS_DIR / (tail.name + suffix))
    accepted = sum(r.accepted for r in rows)
    outcome = UnitOutcome(unit=unit.prefix, source=unit.source, fingerprint=unit_fingerprint(unit),
                          inputs=accepted + len(rejects), accepted=accepted, rejected=len(rejects), domains=domains,
                          files=tuple(rows), shards=tuple(shards), tail=tail, rejects=tuple(rejects),
                          converters=files.versions)
    (out / UNITS_DIR).mkdir(exist_ok=True)
    write_atomic(outcome_path(out, unit.prefix), outcome.to_json())
    return outcome


def _run_remote(unit: Any, sink: ObjectSink, writer: WriterConfig, spool_bytes: int) -> UnitOutcome:
    """Write the unit in a private staging folder, then publish it: shards (index first), tail, outcome."""
    sink.delete([outcome_name(unit.prefix)])  # an outcome never describes shards being rewritten
    root = spool_root()
    root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f"scd-unit-{unit.prefix}-", dir=root))
    try:
        outcome = _run(unit, stage, writer, spool_bytes)
        for folder, shard in [("", s) for s in outcome.shards] + [(TAILS_DIR, t) for t in [outcome.tail] if t]:
            where = f"{folder}/" if folder else ""
            for suffix in (INDEX_SUFFIX, ""):
                sink.put_file(where + shard.name + suffix, stage / where / (shard.name + suffix))
        sink.put_bytes(outcome_name(unit.prefix), outcome.to_json())
        return outcome
    finally:
        shutil.rmtree(stage, ignore_errors=True)

