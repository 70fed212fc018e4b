"""The recorded outcome of one ingest work unit (``_units/<prefix>.json``), typed.

A unit outcome lists every file the unit covered with its own accounting (inputs = accepted + rejected),
the unit's full-size shards, its tail (the last, short shard, packed by the driver), every reject, and the
converters used with their versions. Each shard entry carries the sha256 of the bytes written (or uploaded):
a re-run skips the unit only while every listed shard still has that digest. The JSON form is stable
(``json.dumps`` with sorted keys), so a re-run writes the same bytes.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ingest.plugin import Reject
from shards.format.writer import ShardInfo


@dataclass(frozen=True)
class FileRow:
    """Accounting of one file (or one record range of a file) of a unit."""

    file: str
    converter: str
    domain: str
    start: int | None
    stop: int | None
    inputs: int = 0
    accepted: int = 0
    rejected: int = 0


@dataclass(frozen=True)
class UnitOutcome:
    """What one unit wrote and why: accounting per file, shards with their sha256, tail, rejects."""

    unit: str
    source: str
    fingerprint: str
    inputs: int
    accepted: int
    rejected: int
    domains: dict[str, int] = field(default_factory=dict)
    files: tuple[FileRow, ...] = ()
    shards: tuple[ShardInfo, ...] = ()
    tail: ShardInfo | None = None
    rejects: tuple[Reject, ...] = ()
    converters: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (lists for tuples); file rows and rejects hold only plain values, so their fields are
        copied as they are (``asdict``'s deep copy cost more than the rest of a small file's accounting)."""
        return {
            "unit": self.unit, "source": self.source, "fingerprint": self.fingerprint, "inputs": self.inputs,
            "accepted": self.accepted, "rejected": self.rejected, "domains": dict(self.domains),
            "files": [dict(vars(f)) for f in self.files], "shards": [asdict(s) for s in self.shards],
            "tail": asdict(self.tail) if self.tail is not None else None,
            "rejects": [dict(vars(r)) for r in self.rejects], "converters": dict(self.converters),
        }

    def to_json(self) -> bytes:
        """The recorded form: sorted keys, deterministic bytes."""
        return json.dumps(self.to_dict(), sort_keys=True).encode()

    @classmethod
    def from_dict(cls, doc: Any) -> UnitOutcome:
        """Rebuild from :meth:`to_dict`; a wrong structure is a ``ValueError``."""
        if not isinstance(doc, dict) or set(doc) != {f.name for f in fields(cls)}:
            raise ValueError("not a unit outcome: wrong keys")
        try:
            tail = doc["tail"]
            out = cls(unit=str(doc["unit"]), source=str(doc["source"]), fingerprint=str(doc["fingerprint"]),
                      inputs=_int(doc["inputs"]), accepted=_int(doc["accepted"]), rejected=_int(doc["rejected"]),
                      domains={str(k): _int(v) for k, v in dict(doc["domains"]).items()},
                      files=tuple(FileRow(**f) for f in doc["files"]),
                      shards=tuple(ShardInfo(**s) for s in doc["shards"]),
                      tail=ShardInfo(**tail) if tail is not None else None,
                      rejects=tuple(Reject(**r) for r in doc["rejects"]),
                      converters={str(k): str(v) for k, v in dict(doc["converters"]).items()})
        except (TypeError, AttributeError) as exc:
            raise ValueError(f"not a unit outcome: {exc}") from None
        if out.inputs != out.accepted + out.rejected or out.rejected != len(out.rejects):
            raise ValueError("not a unit outcome: inputs != accepted + rejected")
        return out

    @classmethod
    def from_json(cls, data: bytes | str) -> UnitOutcome:
        """Parse the recorded form; anything else (truncated, edited) is a ``ValueError``."""
        return cls.from_dict(json.loads(data))

    def all_shards(self) -> tuple[ShardInfo, ...]:
        """The full-size shards and the tail (if any)."""
        return self.shards + ((self.tail,) if self.tail is not None else ())


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"not a unit outcome: {value!r} is not a count")
    return value
