"""Execute one work unit: convert its records, write its shards, record its outcome atomically.

A unit's outcome file ``_units/<prefix>.json`` is written last. On a re-run a unit is skipped when its
outcome exists, its fingerprint matches and every shard it lists has the recorded sha256; otherwise
its leftovers are removed and it runs again, writing the very same bytes.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from shards.manifest import sha256_file
from shards.writer import INDEX_SUFFIX, ShardWriter, WriterConfig, write_atomic

UNITS_DIR = "_units"


def outcome_path(out: Path, prefix: str) -> Path:
    return out / UNITS_DIR / f"{prefix}.json"


def unit_fingerprint(unit: Any) -> str:
    st = Path(unit.path).stat() if Path(unit.path).exists() else None
    return unit.fingerprint(st.st_size if st else -1, st.st_mtime_ns if st else -1)


def completed(out: Path, unit: Any) -> dict[str, Any] | None:
    """The recorded outcome when the unit is complete and intact, else None."""
    path = outcome_path(out, unit.prefix)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except ValueError:
        return None
    if doc.get("fingerprint") != unit_fingerprint(unit):
        return None
    for s in doc["shards"]:
        shard = out / s["name"]
        if not shard.is_file() or not (out / (s["name"] + INDEX_SUFFIX)).is_file() or sha256_file(shard) != s["sha256"]:
            return None
    return doc


def clear_leftovers(out: Path, prefix: str) -> None:
    """Remove shards, indices and temporary files of an unfinished run of this unit."""
    for p in out.glob(f"{prefix}-*"):
        p.unlink(missing_ok=True)
    for p in out.glob(f".{prefix}-*"):
        p.unlink(missing_ok=True)
    outcome_path(out, prefix).unlink(missing_ok=True)


def run_unit(unit: Any, out_dir: str, writer: WriterConfig) -> dict[str, Any]:
    """Convert one unit into shards; returns (and records) the outcome. Raises on converter bugs."""
    from ingest.plugin import Reject, safe_convert
    from ingest.registry import get_converter

    out = Path(out_dir)
    clear_leftovers(out, unit.prefix)
    conv = get_converter(unit.converter)()
    options = conv.parse_options(unit.options)
    records = range(unit.start, unit.stop) if unit.start is not None else None
    rejects: list[dict[str, Any]] = []
    accepted = 0
    domains: dict[str, int] = {}
    with ShardWriter(out, prefix=unit.prefix, config=writer) as w:
        for item in safe_convert(conv, Path(unit.path), options, source=unit.source, file_id=unit.file_id,
                                 records=records):
            if isinstance(item, Reject):
                rejects.append(asdict(item))
                continue
            w.add(item)
            accepted += 1
            domains[item.domain] = domains.get(item.domain, 0) + 1
    inputs = accepted + len(rejects)
    if records is not None and inputs != len(records):
        raise RuntimeError(f"converter {unit.converter} yielded {inputs} items for {len(records)} records of "
                           f"{unit.file_id} [{unit.start}, {unit.stop}): accounting broken")
    outcome = {
        "unit": unit.prefix, "source": unit.source, "converter": unit.converter, "file": unit.file_id,
        "start": unit.start, "stop": unit.stop, "fingerprint": unit_fingerprint(unit),
        "inputs": inputs, "accepted": accepted, "rejected": len(rejects), "domains": domains,
        "shards": [asdict(s) for s in w.shards], "rejects": rejects,
        "converter_version": _version(conv),
    }
    (out / UNITS_DIR).mkdir(exist_ok=True)
    write_atomic(outcome_path(out, unit.prefix), json.dumps(outcome, sort_keys=True).encode())
    return outcome


def _version(conv: Any) -> str:
    from importlib.metadata import PackageNotFoundError, version

    module = type(conv).__module__.split(".")[0]
    try:
        from importlib.metadata import packages_distributions

        dist = packages_distributions().get(module, [module])[0]
        return f"{dist}=={version(dist)}"
    except (PackageNotFoundError, IndexError):
        return "unknown"
