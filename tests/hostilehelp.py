"""Helpers shared by the hostile converter tests: real G2 frames as XYZ with known bad ones, the atom records of
adk_open.pdb, and the check that samples and rejects account for every record index of a file exactly once.

Record counts are computed here from what each test wrote (independent of the converters' own counting)."""
from __future__ import annotations

import io

import numpy as np

from ingest.plugin import Reject
from shards.format.schema import AtomGraph
from tests.convhelp import mda_data


def accounted(items_s: list[AtomGraph], items_r: list[Reject], n_records: int) -> dict[int, AtomGraph | Reject]:
    """inputs = samples + rejects, each record index of the file exactly once."""
    by_index: dict[int, AtomGraph | Reject] = {}
    for item in [*items_s, *items_r]:
        idx = item.index if isinstance(item, AtomGraph) else item.record
        assert idx is not None and idx not in by_index, item
        by_index[idx] = item
    assert sorted(by_index) == list(range(n_records))
    return by_index


def g2_frames(n: int) -> list[tuple[bytes, np.ndarray]]:
    """The first ``n`` molecules of ASE's G2 set as extended-XYZ frames, with their positions."""
    import ase.io
    from ase.collections import g2

    out = []
    for atoms in list(g2)[:n]:
        buf = io.StringIO()
        ase.io.write(buf, atoms, format="extxyz")
        out.append((buf.getvalue().encode(), atoms.positions.copy()))
    return out


def hostile_xyz() -> tuple[bytes, dict[int, str], list[np.ndarray]]:
    """12 real frames; frame 3 announces 2 atoms too many, frame 7's count line is garbage, frame 9's comment
    holds undecodable bytes, frame 10 announces one atom too few. Returns (bytes, expected rejects, positions)."""
    frames = g2_frames(12)
    parts, bad = [], {}
    for i, (text, pos) in enumerate(frames):
        lines = text.split(b"\n")
        n = len(pos)
        if i == 3:
            lines[0] = str(n + 2).encode()
            bad[i] = f"the atom-count line says {n + 2} atoms but {n} atom lines follow"
        elif i == 7:
            lines[0] = b"garbage"
            bad[i] = "not an atom-count line: 'garbage'"
        elif i == 9:
            lines[1] = lines[1] + b" \xff\xfe\x80 not utf-8"
        elif i == 10:
            lines[0] = str(n - 1).encode()
            bad[i] = f"the atom-count line says {n - 1} atoms but more atom lines follow"
        parts.append(b"\n".join(lines))
    return b"".join(parts), bad, [p for _, p in frames]


def adk_atoms() -> list[str]:
    return [ln for ln in (mda_data() / "adk_open.pdb").read_text().splitlines() if ln.startswith(("ATOM  ", "HETATM"))]
