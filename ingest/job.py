"""Ingest job files and their deterministic plan of work units.

A job file (YAML)::

    output: out/dataset            # relative paths are relative to the job file's folder
    writer: {max_shard_bytes: 67108864, max_shard_samples: 50000}
    workers: null                  # parallel units (default: all CPUs Ray offers)
    max_retries: 2                 # retries of a failing unit before it is recorded as failed
    sources:
      - source: qm9                # the samples' `source` field
        converter: qm9csv          # a registered converter name, or auto (by suffix)
        paths: [data/qm9_part*.csv]  # files or globs
        options: {}                # converter options (unknown keys are errors)
        records_per_unit: 20000    # split big files into record/frame ranges (splittable converters)
        max_records: null          # only the first N records of each file (splittable converters)
        domain: null               # optional check: the converter must produce this domain

The plan (files x record ranges) depends only on the job file and the input files, never on the number
of workers, so the output is byte-identical however it is executed.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shards.config import ConfigError, load_yaml, to_dict
from shards.writer import WriterConfig

MAX_INPUT_BYTES = 64 * 1024 ** 3


@dataclass(frozen=True)
class SourceSpec:
    """One input source: files converted by one converter into samples of one source name."""

    source: str
    paths: tuple[str, ...]
    converter: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)
    records_per_unit: int | None = None
    max_records: int | None = None
    domain: str | None = None


@dataclass(frozen=True)
class JobConfig:
    """A whole ingest job."""

    output: str
    sources: tuple[SourceSpec, ...]
    writer: WriterConfig = field(default_factory=WriterConfig)
    workers: int | None = None
    max_retries: int = 2
    base_dir: str = ""

    def output_dir(self) -> Path:
        return _resolve(self.base_dir, self.output)


@dataclass(frozen=True)
class Unit:
    """One deterministic piece of work: a file, or a record range of it, with one converter."""

    number: int
    source: str
    converter: str
    path: str
    file_id: str
    options: dict[str, Any]
    start: int | None
    stop: int | None

    @property
    def prefix(self) -> str:
        """Shard name prefix of this unit (unique in the dataset, stable across runs)."""
        return f"u{self.number:06d}"

    def fingerprint(self, file_size: int, file_mtime_ns: int) -> str:
        payload = json.dumps([self.source, self.converter, self.file_id, self.options, self.start, self.stop,
                              file_size, file_mtime_ns], sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:32]


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


def expand(spec: SourceSpec, base_dir: str) -> list[tuple[Path, str]]:
    """Input files of a source, sorted, as (path, file_id); file_id is the path as the job names it."""
    out: list[tuple[Path, str]] = []
    for pattern in spec.paths:
        full = _resolve(base_dir, pattern)
        matches = sorted(glob.glob(str(full))) if glob.has_magic(str(full)) else [str(full)]
        if not matches:
            raise ConfigError(f"source {spec.source!r}: no files match {pattern!r}")
        for m in matches:
            p = Path(m)
            rel = os.path.relpath(p, base_dir) if base_dir else str(p)
            out.append((p, rel if not rel.startswith("..") else str(p)))
    return out


def plan_units(cfg: JobConfig) -> list[Unit]:
    """Files and record ranges, in job order; counts records of splittable converters up front."""
    from ingest.registry import converter_for, get_converter

    units: list[Unit] = []
    for spec in cfg.sources:
        for path, file_id in expand(spec, cfg.base_dir):
            conv_cls = get_converter(spec.converter) if spec.converter != "auto" else converter_for(path)
            if spec.domain is not None and conv_cls.domain != spec.domain:
                raise ConfigError(f"source {spec.source!r}: {path} is handled by converter {conv_cls.name!r} "
                                  f"of domain {conv_cls.domain!r}, not {spec.domain!r}")
            conv = conv_cls()
            options = conv.parse_options(_expand_options(spec.options))
            ranges: list[tuple[int | None, int | None]] = [(None, None)]
            if spec.records_per_unit or spec.max_records:
                try:
                    n = conv.count_records(path, options)
                except Exception:  # noqa: BLE001 - an unreadable file becomes one reject in its unit
                    n = None
                if n is not None:
                    n = min(n, spec.max_records) if spec.max_records else n
                    step = spec.records_per_unit or max(n, 1)
                    ranges = [(a, min(a + step, n)) for a in range(0, n, step)] or [(0, 0)]
            for start, stop in ranges:
                units.append(Unit(len(units), spec.source, conv_cls.name, str(path), file_id,
                                  to_dict(options), start, stop))
    return units


def job_summary_config(cfg: JobConfig) -> dict[str, Any]:
    """The job configuration as recorded in the manifest: sources and writer as written in the job."""
    d = to_dict(cfg)
    for where in ("base_dir", "output", "workers"):  # where and how it ran does not change the data
        d.pop(where, None)
    return d
