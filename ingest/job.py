"""Ingest job files and their deterministic plan of work units.

A job file (YAML)::

    output: out/dataset            # relative paths are relative to the job file's folder; or s3://bucket/prefix
    input_root: null               # relative input paths resolve against this folder or URL (default: the job's folder)
    spool_bytes: 8589934592        # remote inputs: the most bytes one input may take in a worker's local spool
    writer: {max_shard_bytes: 67108864, max_shard_samples: 50000}
    workers: null                  # parallel units (default: all CPUs Ray offers)
    max_retries: 2                 # retries of a failing unit before it is recorded as failed
    sources:
      - source: qm9                # the samples' `source` field
        converter: qm9csv          # a registered converter name, or auto (chosen per file, in the workers)
        paths: [data/qm9_part*.csv]  # files or globs
        options: {}                # converter options (unknown keys are errors)
        unit_bytes: 33554432       # group consecutive small files into one unit up to this many input bytes
        files_per_unit: 128        # ... and at most this many files; bigger splittable files are split
        records_per_unit: 20000    # split files into record/frame ranges of this size (splittable converters)
        max_records: null          # only the first N records of each file (splittable converters)
        domain: null               # optional check: the converter must produce this domain

A unit is either a group of consecutive whole files (up to ``unit_bytes`` input bytes and ``files_per_unit``
files) or one record range of a file that was split: files larger than ``unit_bytes`` whose converter can
count records are split into ranges of ``records_per_unit`` records (default: about ``unit_bytes`` of input
per range); with ``records_per_unit`` or ``max_records`` set every file of the source is counted. Counting
and choosing a converter by content run in the workers (``mapper``), never one file at a time in the driver;
a file that cannot be sniffed or counted is planned whole and becomes its reject when its unit runs.

Inputs may be object-storage URLs and URL globs (``s3://``, ``gs://``, ``az://``, listed with fsspec) or
``http(s)://`` files; they are listed here and read through a bounded local spool in the workers
(:mod:`ingest.spool`). A file's ``file_id`` (and so every sample key) is its path relative to the job's
folder, or to ``input_root``: the same job run on a local copy and on a bucket holding the same files
gives the same dataset.

The plan depends only on the job file and the input files, never on the number of workers, so the output
is byte-identical however it is executed.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingest.plugin import MAX_FILE_BYTES
from ingest.spool import SpoolLimitError, forget_cached, list_remote, local_copy
from shards.config import ConfigError, load_yaml, to_dict
from shards.format.storage import is_url
from shards.format.writer import WriterConfig

MAX_INPUT_BYTES = 64 * 1024 ** 3
AUTO = "auto"
UNIT_BYTES = 32 * 1024 ** 2
FILES_PER_UNIT = 128
PROBE_BATCH = 64


@dataclass(frozen=True)
class SourceSpec:
    """One input source: files converted by one converter into samples of one source name."""

    source: str
    paths: tuple[str, ...]
    converter: str = AUTO
    options: dict[str, Any] = field(default_factory=dict)
    records_per_unit: int | None = None
    max_records: int | None = None
    domain: str | None = None
    unit_bytes: int = UNIT_BYTES
    files_per_unit: int = FILES_PER_UNIT

    def __post_init__(self) -> None:
        for name in ("records_per_unit", "max_records"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"source {self.source!r}: {name} must be >= 1, got {value}")
        if self.unit_bytes < 1 or self.files_per_unit < 1:
            raise ConfigError(f"source {self.source!r}: unit_bytes and files_per_unit must be >= 1")


@dataclass(frozen=True)
class JobConfig:
    """A whole ingest job."""

    output: str
    sources: tuple[SourceSpec, ...]
    writer: WriterConfig = field(default_factory=WriterConfig)
    workers: int | None = None
    max_retries: int = 2
    input_root: str | None = None
    spool_bytes: int = MAX_FILE_BYTES
    base_dir: str = ""

    def __post_init__(self) -> None:
        if self.spool_bytes < 1:
            raise ConfigError(f"spool_bytes must be >= 1, got {self.spool_bytes}")

    def output_location(self) -> str:
        """The output as a URL (kept verbatim) or an absolute-or-job-relative local path."""
        out = os.path.expandvars(self.output)
        return out.rstrip("/") if is_url(out) else str(_resolve(self.base_dir, self.output))

    def output_dir(self) -> Path:
        """The local output folder; an object-storage output is an error here (never a folder named ``s3:``)."""
        location = self.output_location()
        if is_url(location):
            raise ConfigError(f"output {location} is a URL, not a folder")
        return Path(location)

    def inputs_base(self) -> str:
        """What relative input paths resolve against: ``input_root`` (a folder or URL), else the job's folder."""
        if not self.input_root:
            return self.base_dir
        root = os.path.expandvars(self.input_root)
        return root.rstrip("/") if is_url(root) else str(_resolve(self.base_dir, root))


@dataclass(frozen=True)
class Item:
    """One file of a unit, whole (``start`` None) or a record range; ``converter`` may be ``auto``."""

    path: str
    file_id: str
    converter: str
    start: int | None = None
    stop: int | None = None
    remote: tuple[int, str] | None = None  # a URL's (size, ETag or mtime) as listed when planned
    split: bool = False  # one of several record ranges of the file (its units share a node's download)


@dataclass(frozen=True)
class Unit:
    """One deterministic piece of work: consecutive whole files, or a record range of one file."""

    number: int
    source: str
    domain: str | None
    options: dict[str, Any]
    items: tuple[Item, ...]

    @property
    def prefix(self) -> str:
        """Shard name prefix of this unit (unique in the dataset, stable across runs)."""
        return f"u{self.number:06d}"

    def describe(self) -> str:
        """The unit's files in one line (for failure reports)."""
        first = self.items[0]
        span = "" if first.start is None else f" [{first.start}, {first.stop})"
        more = f" and {len(self.items) - 1} more file(s)" if len(self.items) > 1 else ""
        return f"{first.file_id}{span}{more}"

    def fingerprint(self, stats: Iterable[tuple[int, int | str]]) -> str:
        """Hash of what the unit reads: its items and each file's (size, mtime_ns) or (size, ETag)."""
        payload = json.dumps([self.source, self.domain, self.options,
                              [[i.file_id, i.converter, i.start, i.stop, s, m]
                               for i, (s, m) in zip(self.items, stats, strict=True)]],
                             sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:32]


Mapper = Callable[[Callable[[list[Any]], list[Any]], list[list[Any]]], Iterable[list[Any]]]


def _resolve(base: str, path: str) -> Path:
    p = Path(os.path.expandvars(os.path.expanduser(path)))
    return p if p.is_absolute() or not base else Path(base) / p


def _expand_options(options: dict[str, Any]) -> dict[str, Any]:
    """Expand $VARS and ~ in string option values (e.g. a trajectory's topology path)."""
    return {k: os.path.expandvars(os.path.expanduser(v)) if isinstance(v, str) and ("$" in v or v.startswith("~"))
            else v for k, v in options.items()}


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Load a job file; relative paths resolve against the job file's folder."""
    cfg = load_yaml(JobConfig, path, overrides)
    if not cfg.sources:
        raise ConfigError(f"{path}: the job lists no sources")
    return dataclasses.replace(cfg, base_dir=str(Path(path).resolve().parent))


Input = tuple[str, str, tuple[int, str] | None]


def expand(spec: SourceSpec, base_dir: str) -> list[Input]:
    """Input files of a source, sorted, as (path or URL, file_id, remote stamp); file_id is the path as the job
    names it (relative to ``base_dir``, a folder or URL, when inside it); the stamp is (size, ETag) for URLs.
    Plain strings: 100,000 local files plan in about a second."""
    out: list[Input] = []
    for pattern in spec.paths:
        named = os.path.expandvars(os.path.expanduser(pattern))
        if is_url(named):
            out += [(f.url, f.url, (f.size, f.stamp)) for f in list_remote(named, spec.source)]
        elif is_url(base_dir):
            if os.path.isabs(named):
                out += [(p, i, None) for p, i in _expand_local(spec, pattern, "")]
                continue
            root = base_dir.rstrip("/") + "/"
            out += [(f.url, f.url[len(root):] if f.url.startswith(root) else f.url, (f.size, f.stamp))
                    for f in list_remote(root + named, spec.source)]
        else:
            out += [(p, i, None) for p, i in _expand_local(spec, pattern, base_dir)]
    return out


def _expand_local(spec: SourceSpec, pattern: str, base_dir: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    base = os.path.abspath(base_dir) + os.sep if base_dir else ""
    full = str(_resolve(base_dir, pattern))
    if not glob.has_magic(full) and not os.path.exists(full):
        raise ConfigError(f"source {spec.source!r}: input {pattern!r} does not exist ({full})")
    if not glob.has_magic(full) and spec.converter == AUTO and os.path.isdir(full):
        _check_folder(spec, full)
    matches = sorted(glob.glob(full)) if glob.has_magic(full) else [full]
    if not matches:
        raise ConfigError(f"source {spec.source!r}: no files match {pattern!r}")
    for m in matches:
        if base and m.startswith(base) and ".." not in m[len(base):].split(os.sep):
            out.append((m, m[len(base):]))
            continue
        rel = os.path.relpath(m, base_dir) if base_dir else m
        out.append((m, rel if not rel.startswith("..") else m))
    return out


def _check_folder(spec: SourceSpec, path: str) -> None:
    """A folder named as an input must be claimed by a converter that reads folders (a zarr store)."""
    from ingest.registry import converter_for

    try:
        converter_for(Path(path), spec.domain, options=_expand_options(spec.options))
    except KeyError as exc:
        raise ConfigError(f"source {spec.source!r}: {exc.args[0]}") from None


def _size(path: str) -> int:
    try:
        st = os.stat(path)
    except OSError:
        return 0
    if stat.S_ISDIR(st.st_mode):
        return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
    return st.st_size


Probe = tuple[str, str, str | None, dict[str, Any], int, tuple[int, str] | None, int | None]


def probe_files(batch: list[Probe]) -> list[tuple[str | None, int | None]]:
    """For each (path or URL, converter or auto, domain, options, spool limit, listed (size, stamp) of a remote
    file that may be split or None, record count above which it is split or None): (converter name or None,
    record count or None). Runs in a worker: a URL through the spool, one that may be split through the node's
    cache, where its range units find it (kept there only when the count splits it, or when the split limit is
    None: a file larger than a unit). A file that cannot be sniffed or counted gives Nones (its unit turns it
    into a reject)."""
    out: list[tuple[str | None, int | None]] = []
    for path, name, domain, options, limit, shared, split_over in batch:
        try:
            with local_copy(path, limit, shared=shared) as local:
                out.append(_probe(local, name, domain, options))
        except SpoolLimitError:
            out.append((None, None))
        n = out[-1][1]
        if shared is not None and split_over is not None and (n is None or n <= split_over):
            forget_cached([(path, shared)])  # read whole by one unit: no copy kept for it
    return out


def _probe(path: Path, name: str, domain: str | None, options: dict[str, Any]) -> tuple[str | None, int | None]:
    from ingest.registry import converter_for, get_converter

    try:
        cls = get_converter(name) if name != AUTO else converter_for(path, domain, options=options)
    except Exception:  # noqa: BLE001 - unreadable or unclaimed: decided again (as a reject) in the unit
        return None, None
    try:
        conv = cls()
        n = conv.count_records(path, conv.parse_options(options))
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - counted as unsplittable; the unit records the file's reject
        n = None
    return cls.name, n


def serial_map(fn: Callable[[list[Any]], list[Any]], batches: list[list[Any]]) -> Iterator[list[Any]]:
    """The in-process mapper (tests, benchmarks); ``run_job`` passes one that runs batches on Ray."""
    return (fn(b) for b in batches)


def _check_named(spec: SourceSpec) -> None:
    """A named converter: it must exist, match the declared domain and accept the options."""
    from ingest.registry import get_converter

    cls = get_converter(spec.converter)
    conv = cls()
    domain = conv.output_domain(conv.parse_options(_expand_options(spec.options)))
    if spec.domain is not None and domain != spec.domain:
        raise ConfigError(f"source {spec.source!r}: converter {cls.name!r} is of domain {domain!r}, "
                          f"not {spec.domain!r}")


def _count_cache(spec: SourceSpec, stamp: tuple[int, str] | None, size: int
                 ) -> tuple[tuple[int, str] | None, int | None]:
    """How the planning count reads a file: through the node's cache (the listed (size, stamp) of a remote file
    whose range units will read it again) or not (None), and the count above which the copy is kept (None: kept
    whatever the count, for a file larger than a unit, which is split by size)."""
    if stamp is None:
        return None, None
    if size > spec.unit_bytes:
        return stamp, None
    per_unit, cap = spec.records_per_unit, spec.max_records
    if per_unit is None or (cap is not None and cap <= per_unit):  # a small file that no count splits
        return None, None
    return stamp, per_unit


def _ranges(n: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(a + step, n)) for a in range(0, n, step)] or [(0, 0)]


def plan_units(cfg: JobConfig, mapper: Mapper = serial_map) -> list[Unit]:
    """Units in job order: groups of consecutive whole files, and record ranges of split files."""
    units: list[Unit] = []
    for spec in cfg.sources:  # every source's converter and inputs checked before any work
        if spec.converter != AUTO:
            _check_named(spec)
    inputs = [expand(spec, cfg.inputs_base()) for spec in cfg.sources]
    for spec, files in zip(cfg.sources, inputs, strict=True):
        options = _expand_options(spec.options)
        for items in _source_items(spec, files, options, mapper, cfg.spool_bytes):
            units.append(Unit(len(units), spec.source, spec.domain, options, items))
    return units


def _source_items(spec: SourceSpec, files: list[Input], options: dict[str, Any], mapper: Mapper,
                  spool_bytes: int) -> Iterator[tuple[Item, ...]]:
    """The items of each unit of one source: split files one range per unit, whole files grouped."""
    sizes = [_size(p) if stamp is None else stamp[0] for p, _, stamp in files]
    count_all = bool(spec.records_per_unit or spec.max_records)
    wanted = [i for i, s in enumerate(sizes) if count_all or s > spec.unit_bytes]
    jobs: list[Probe] = [(files[i][0], spec.converter, spec.domain, options, spool_bytes,
                          *_count_cache(spec, files[i][2], sizes[i])) for i in wanted]
    batches = [jobs[a:a + PROBE_BATCH] for a in range(0, len(jobs), PROBE_BATCH)]
    probed = dict(zip(wanted, (r for batch in mapper(probe_files, batches) for r in batch), strict=True))
    group: list[Item] = []
    group_bytes = 0
    for i, ((path, file_id, stamp), size) in enumerate(zip(files, sizes, strict=True)):
        name, n = probed.get(i, (None, None))
        conv = name or spec.converter
        item = Item(path, file_id, conv, remote=stamp)
        if n is not None:
            n = min(n, spec.max_records) if spec.max_records else n
            step = spec.records_per_unit or max(1, math.ceil(n / max(1, math.ceil(size / spec.unit_bytes))))
            ranges = _ranges(n, step)
            if len(ranges) > 1:
                if group:
                    yield tuple(group)
                group, group_bytes = [], 0
                yield from ((Item(path, file_id, conv, a, b, stamp, split=True),) for a, b in ranges)
                continue
            item = Item(path, file_id, conv, *ranges[0], stamp)
        if group and (len(group) >= spec.files_per_unit or group_bytes + size > spec.unit_bytes):
            yield tuple(group)
            group, group_bytes = [], 0
        group.append(item)
        group_bytes += size
    if group:
        yield tuple(group)


def job_summary_config(cfg: JobConfig) -> dict[str, Any]:
    """The job configuration as recorded in the manifest: sources and writer as written in the job."""
    d = to_dict(cfg)
    for where in ("base_dir", "output", "workers", "input_root"):  # where and how it ran does not change the data
        d.pop(where, None)
    return d
