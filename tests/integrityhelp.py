"""Helpers shared by the read-side integrity tests. The hostile data is made here from small real datasets (ASE g2
molecules, pymatgen crystals, the adk protein); every expectation is computed independently of the code under
test (zarr, json, hashlib, struct, ase.neighborlist)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from shards.format.codec import decode
from shards.format.manifest import write_dataset
from shards.format.writer import WriterConfig


def molecules_dataset(real_graphs, tmp_path_factory) -> Path:
    """20 g2 molecules in two shards (one mixture group, so one batch can hold exactly one pass)."""
    root = tmp_path_factory.mktemp("integrity") / "molecules"
    write_dataset(real_graphs[:20], root, config=WriterConfig(max_shard_samples=10))
    return root


def load_json(path: Path) -> object:
    return json.loads(path.read_text())


def one_line(msg: str, *names: str) -> str:
    assert "\n" not in msg.strip() and "Traceback" not in msg, msg
    for n in names:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def deep(n: int) -> str:
    return "[" * n + "]" * n


def member(root: Path, row: int) -> tuple[str, int, int, str]:
    """(shard name, data offset, size, key) of sample ``row`` of the first shard, from the json index."""
    name = sorted(p.name for p in root.glob("*.tar"))[0]
    idx = load_json(root / f"{name}.idx.json")
    return name, idx["offset"][row], idx["size"][row], idx["key"][row]


def positions_at(blob: bytes, off: int, size: int) -> tuple[int, np.ndarray]:
    """Byte position of the float32 positions array inside a sample, and the array."""
    g = decode(blob[off:off + size])
    raw = np.ascontiguousarray(g.positions, dtype="<f4").tobytes()
    at = blob.find(raw, off, off + size)
    assert at >= 0
    return at, np.asarray(g.positions, dtype="<f4")
