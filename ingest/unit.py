"""Execute one work unit: convert its files, write its shards, record its outcome atomically.

A unit's outcome file ``_units/<prefix>.json`` is written last. It lists every file the unit covered
with its own accounting (inputs = accepted + rejected), the unit's full-size shards (in the dataset
folder) and its tail: the last, short shard, kept in ``_units/tails/`` until the driver packs the tails
of all units into target-size shards. On a re-run a unit is skipped when its outcome exists, its
fingerprint matches and every shard it lists has the recorded sha256; otherwise its leftovers are
removed and it runs again, writing the very same bytes.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from shards.format.manifest import sha256_file
from shards.format.writer import INDEX_SUFFIX, ShardWriter, WriterConfig, write_atomic

UNITS_DIR = "_units"
TAILS_DIR = "_units/tails"


def outcome_path(out: Path, prefix: str) -> Path:
    return out / UNITS_DIR / f"{prefix}.json"


def unit_fingerprint(unit: Any) -> str:
    stats = []
    for item in unit.items:
        try:
            st = os.stat(item.path)
            stats.append((st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append((-1, -1))
    return str(unit.fingerprint(stats))


def is_tail(shard: dict[str, Any], writer: WriterConfig) -> bool:
    """A shard under half the target size (bytes and samples) is packed with others by the driver."""
    return bool(shard["n_bytes"] * 2 < writer.max_shard_bytes and shard["n_samples"] * 2 < writer.max_shard_samples)


def shard_intact(folder: Path, shard: dict[str, Any]) -> bool:
    path = folder / shard["name"]
    return (path.is_file() and (folder / (shard["name"] + INDEX_SUFFIX)).is_file()
            and sha256_file(path) == shard["sha256"])


def completed(out: Path, unit: Any) -> dict[str, Any] | None:
    """The recorded outcome when the unit is complete and intact, else None."""
    path = outcome_path(out, unit.prefix)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("fingerprint") != unit_fingerprint(unit):
        return None
    if not all(shard_intact(out, s) for s in doc.get("shards", [])):
        return None
    if doc.get("tail") is not None and not shard_intact(out / TAILS_DIR, doc["tail"]):
        return None
    return doc


def clear_leftovers(out: Path, prefix: str) -> None:
    """Remove shards, tails, indices and temporary files of an unfinished run of this unit."""
    for folder in (out, out / TAILS_DIR):
        for pattern in (f"{prefix}-*", f".{prefix}-*"):
            for p in folder.glob(pattern):
                p.unlink(missing_ok=True)
    outcome_path(out, prefix).unlink(missing_ok=True)


class _Files:
    """Per-file accounting of one unit and the converters it used (instances cached per unit)."""

    def __init__(self, unit: Any) -> None:
        self.unit = unit
        self.convs: dict[str, tuple[Any, Any]] = {}
        self.versions: dict[str, str] = {}

    def converter(self, name: str) -> tuple[Any, Any]:
        if name not in self.convs:
            from ingest.registry import converter_version, get_converter

            conv = get_converter(name)()
            self.convs[name] = (conv, conv.parse_options(self.unit.options))
            self.versions[name] = converter_version(name)
        return self.convs[name]


def _convert_item(files: _Files, item: Any, w: ShardWriter, rejects: list[dict[str, Any]],
                  domains: dict[str, int]) -> dict[str, Any]:
    """Convert one file (or record range) of the unit; returns its accounting row."""
    from ingest.plugin import Reject, safe_convert
    from ingest.registry import converter_for

    unit = files.unit
    row = {"file": item.file_id, "converter": item.converter, "domain": unit.domain or "unknown",
           "start": item.start, "stop": item.stop, "inputs": 0, "accepted": 0, "rejected": 0}
    name = item.converter
    if name == "auto":
        try:
            name = converter_for(Path(item.path), unit.domain).name
        except Exception as exc:  # noqa: BLE001 - sniffing a broken file: the file is one reject, not a crash
            reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else f"{type(exc).__name__}: {exc}"
            rejects.append(asdict(Reject(item.file_id, None, "auto", f"cannot choose a converter: {reason}"[:400])))
            row.update(inputs=1, rejected=1)
            return row
    conv, options = files.converter(name)
    row.update(converter=name, domain=conv.domain)
    records = range(item.start, item.stop) if item.start is not None else None
    for out in safe_convert(conv, Path(item.path), options, source=unit.source, file_id=item.file_id,
                            records=records):
        if isinstance(out, Reject):
            rejects.append(asdict(out))
            row["rejected"] += 1
            continue
        w.add(out)
        row["accepted"] += 1
        domains[out.domain] = domains.get(out.domain, 0) + 1
    row["inputs"] = row["accepted"] + row["rejected"]
    if records is not None and row["inputs"] != len(records):
        raise RuntimeError(f"converter {name} yielded {row['inputs']} items for {len(records)} records of "
                           f"{item.file_id} [{item.start}, {item.stop}): accounting broken")
    return row


def run_unit(unit: Any, out_dir: str, writer: WriterConfig) -> dict[str, Any]:
    """Convert one unit into shards; returns (and records) the outcome. Raises on converter bugs;
    an OSError without a file name (a full disk) is raised again naming the output folder."""
    out = Path(out_dir)
    try:
        return _run(unit, out, writer)
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, f"{exc.strerror or exc} (writing unit {unit.prefix} into {out})") from exc


def _run(unit: Any, out: Path, writer: WriterConfig) -> dict[str, Any]:
    clear_leftovers(out, unit.prefix)
    files = _Files(unit)
    rejects: list[dict[str, Any]] = []
    domains: dict[str, int] = {}
    with ShardWriter(out, prefix=unit.prefix, config=writer) as w:
        rows = [_convert_item(files, item, w, rejects, domains) for item in unit.items]
    shards = [asdict(s) for s in w.shards]
    tail = shards.pop() if shards and is_tail(shards[-1], writer) else None
    if tail is not None:
        (out / TAILS_DIR).mkdir(parents=True, exist_ok=True)
        for suffix in (INDEX_SUFFIX, ""):  # the index first: a tail is whole once the tar has moved
            os.replace(out / (tail["name"] + suffix), out / TAILS_DIR / (tail["name"] + suffix))
    accepted = sum(r["accepted"] for r in rows)
    outcome = {
        "unit": unit.prefix, "source": unit.source, "fingerprint": unit_fingerprint(unit),
        "inputs": accepted + len(rejects), "accepted": accepted, "rejected": len(rejects), "domains": domains,
        "files": rows, "shards": shards, "tail": tail, "rejects": rejects, "converters": files.versions,
    }
    (out / UNITS_DIR).mkdir(exist_ok=True)
    write_atomic(outcome_path(out, unit.prefix), json.dumps(outcome, sort_keys=True).encode())
    return outcome
