"""ASE databases: SQLite ``.db`` (``ase.db``) and LMDB ``.aselmdb`` (``ase-db-backends``), one sample per row.

The layout of the OMat24 / OMol25 / OC20 / ODAC releases: energy, forces and stress in the row's calculator
results (ASE units: eV, eV/Å, eV/Å^3), charge and spin in its key-value pairs or ``data``. Record ``r`` is
the r-th row in id order. Both backends store JSON (SQLite: JSON text and raw float blobs; aselmdb:
zlib-compressed JSON), which is checked before the library reads a row: an LMDB of pickled objects (the
legacy OC20 ``.lmdb`` files) is refused, never unpickled, and a file is never opened for writing.
"""
from __future__ import annotations

import sqlite3
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ingest.converters.units import clip, elements, scaled
from ingest.plugin import Converter, Reject, owned, read_head
from shards.format.schema import NAME_RE, NO_PBC, ZERO_CELL, AtomGraph, FileKeys

SQLITE_MAGIC = b"SQLite format 3\x00"
LMDB_SUFFIXES = (".aselmdb", ".lmdb")
PROBE_ROWS = 3
MAX_ROW_BYTES = 256 * 1024 ** 2  # inflated JSON of one aselmdb row
STRESS = ("stress_xx", "stress_yy", "stress_zz", "stress_yz", "stress_xz", "stress_xy")  # ASE Voigt order
STRESS_UNIT = "eV/Å^3"
_STRESS_UNITS = dict.fromkeys(STRESS, STRESS_UNIT)


@dataclass(frozen=True)
class ASEDBOptions:
    """``domain``: auto (crystal when any axis is periodic, else molecule) or a fixed domain name.
    ``charge_key`` / ``spin_key``: the key-value pair or ``data`` entry holding the total charge and the spin
    multiplicity (2S+1). ``properties``: further numeric keys to keep as properties, mapped to their unit."""

    domain: str = "auto"
    charge_key: str = "charge"
    spin_key: str = "spin"
    properties: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.domain != "auto" and not NAME_RE.match(self.domain):
            raise ValueError(f"domain {self.domain!r} is not a lowercase identifier")


def lmdb_problem(path: Path) -> str | None:
    """Why an LMDB file is not an ASE LMDB of zlib-compressed JSON (None when it is). Reads raw bytes only."""
    import lmdb

    try:
        env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, readahead=False, max_dbs=0)
    except lmdb.Error as exc:
        return f"not an LMDB file: {exc}"
    try:
        with env.begin() as txn:
            for k, (key, value) in enumerate(txn.cursor()):
                if k >= PROBE_ROWS:
                    break
                if value[:1] == b"\x80":
                    return ("a legacy LMDB of pickled objects (e.g. OC20 torch_geometric data), refused: "
                            "never unpickled; convert it to .aselmdb with fairchem first")
                try:
                    text = zlib.decompress(value)
                except zlib.error:
                    return f"entry {bytes(key)[:32]!r} is not zlib-compressed JSON (not an ASE LMDB)"
                if text[:1] == b"\x80":
                    return "entries are compressed pickles, refused: never unpickled"
                if text.lstrip()[:1] not in (b"{", b"[") and not text.strip().lstrip(b"-").isdigit():
                    return f"entry {bytes(key)[:32]!r} is not JSON (not an ASE LMDB)"
    finally:
        env.close()
    return None


def inflate(raw: bytes, limit: int | None = None) -> str:
    """One aselmdb entry's JSON text: zlib-inflated to at most ``limit`` bytes (default ``MAX_ROW_BYTES``; a larger
    row is refused, never inflated whole). The backend's own reader then also maps integer-like dict keys back to
    ints, a second walk of every nested dict that costs about a fifth of a row's read; no field this converter
    reads is keyed by an integer, so rows are decoded by ASE's JSON decoder alone (``ase.io.jsonio.mydecode``)."""
    limit = MAX_ROW_BYTES if limit is None else limit
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(raw, limit)
    except zlib.error as exc:
        raise ValueError(f"row is not zlib data: {exc}") from None
    if inflater.unconsumed_tail:
        raise ValueError(f"row inflates to more than {limit} bytes")
    if not inflater.eof:
        raise ValueError("row is truncated zlib data")
    return text.decode("utf-8")


def lmdb_row(raw: bytes) -> Any:
    """One aselmdb entry as an ``AtomsRow``, inflated within the bound and decoded by ASE's JSON decoder."""
    from ase.db.row import AtomsRow
    from ase.io.jsonio import mydecode

    return AtomsRow(mydecode(inflate(raw)))


def sqlite_problem(path: Path) -> str | None:
    """Why a file is not an ASE SQLite database (None when it is); opened read-only, never written."""
    if read_head(path, 16) != SQLITE_MAGIC:
        return "not an SQLite file"
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            con.close()
    except sqlite3.Error as exc:
        return f"unreadable SQLite file: {exc}"
    return None if {"systems", "information"} <= tables else "an SQLite file without ASE's systems table"


class ASEDBConverter(Converter):
    """ASE SQLite ``.db`` and ``.aselmdb`` rows -> samples (energy, forces, stress, charge, spin)."""

    name = "ase_db"
    domain = "crystal"
    suffixes = (".db", *LMDB_SUFFIXES)
    default_source = "asedb"
    Options = ASEDBOptions

    suffix_gated = True

    def can_convert(self, path: Path) -> bool:
        if not super().can_convert(path):
            return False
        return _is_lmdb(path) or read_head(path, 16) == SQLITE_MAGIC

    @staticmethod
    def _problem(path: Path) -> str | None:
        return lmdb_problem(path) if _is_lmdb(path) else sqlite_problem(path)

    @staticmethod
    def _connect(path: Path) -> Any:
        import ase.db

        if _is_lmdb(path):
            return ase.db.connect(str(path), type="aselmdb", readonly=True)
        db = ase.db.connect(str(path), type="db", use_lock_file=False, create_indices=False)
        # one read-only connection for the whole read, set up as the backend's own ``with db:`` does (which would
        # open the file for writing): without it the backend opens a new connection for every row (to look up its
        # external tables), which costs as much as decoding the row
        db.change_count = 0
        db.connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        return db

    def count_records(self, path: Path, options: ASEDBOptions) -> int | None:
        if self._problem(path) is not None:
            return None
        db = self._connect(path)
        try:
            return int(db.count())
        finally:
            _close(db)

    def convert(self, path: Path, options: ASEDBOptions, *, source: str, file_id: str,
                records: range | None = None) -> Iterator[AtomGraph | Reject]:
        problem = self._problem(path)
        if problem is not None:
            yield self.reject(file_id, None, f"{file_id}: {problem}")
            return
        db = self._connect(path)
        try:
            inside, beyond = clip(records, int(db.count()))
            keys = FileKeys(source, file_id)
            # aselmdb rows are decoded inside build, so that a row that cannot be decoded is a reject of its own
            decode = lmdb_row if _is_lmdb(path) else None
            for r, row in zip(inside, self._rows(db, path, inside), strict=True):
                yield self.build(file_id, r, lambda r=r, row=row: self._graph(
                    row if decode is None else decode(row), r, keys(r), options, source, file_id))
        finally:
            _close(db)
        for r in beyond:
            yield self.reject(file_id, r, "row beyond the end of the database")

    @staticmethod
    def _rows(db: Any, path: Path, inside: range) -> Iterator[Any]:
        """The rows at positions ``inside`` (in id order): aselmdb entries as stored (see :func:`lmdb_row`),
        SQLite rows decoded by the backend."""
        if not inside:
            return
        if _is_lmdb(path):  # rows fetched by id (the backend's id list)
            with db.env.begin() as txn:
                for r in inside:
                    raw = txn.get(str(db.ids[r]).encode("ascii"))
                    if raw is None:
                        raise KeyError(f"row id {db.ids[r]} is missing")
                    yield raw
            return
        yield from db.select(sort="id", offset=inside.start, limit=len(inside))

    @staticmethod
    def _graph(row: Any, r: int, key: str, options: ASEDBOptions, source: str, file_id: str) -> AtomGraph:
        z = elements(row.numbers)
        n = z.shape[0]
        pbc = owned(row.pbc, bool)
        periodic = any(pbc.tolist())
        cell = owned(row.cell, np.float64) if periodic or any(np.ravel(row.cell).tolist()) else ZERO_CELL
        props: dict[str, float] = {}
        units: dict[str, str] = {}
        stress = row.get("stress")
        if stress is not None:
            s = np.asarray(stress, dtype=np.float64)
            voigt = s if s.shape == (6,) else s[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]] if s.shape == (3, 3) else None
            if voigt is None:
                raise ValueError(f"stress has shape {s.shape}, expected (6,) or (3, 3)")
            props.update(zip(STRESS, voigt.tolist(), strict=True))
            units.update(_STRESS_UNITS)
        for name, unit in options.properties.items():
            value = _lookup(row, name)
            if value is not None:
                props[name], units[name] = float(value), unit
        forces = row.get("forces")
        domain = options.domain if options.domain != "auto" else ("crystal" if periodic else "molecule")
        return AtomGraph(key=key, domain=domain, source=source, source_file=file_id,
                         index=r, atomic_numbers=z, positions=owned(row.positions, np.float32),
                         cell=cell, pbc=pbc if periodic else NO_PBC, charge=_integer(row, options.charge_key),
                         spin=_integer(row, options.spin_key), energy=row.get("energy"),
                         forces=None if forces is None else scaled(forces, 1.0, (n, 3), "forces"),
                         properties=props or None, property_units=units or None)


def _lookup(row: Any, key: str) -> Any:
    """A key-value pair of the row, else its entry in ``data`` (decoded only when needed). The row's own
    attributes are read directly: ``AtomsRow.charge`` is a property (the sum of initial charges) that
    would hide a ``charge`` key-value pair."""
    value = vars(row).get(key)
    if value is None:
        data = row.get("data")
        value = data.get(key) if hasattr(data, "get") else None
    return value


def _integer(row: Any, key: str) -> int | None:
    value = _lookup(row, key)
    if value is None or type(value) is int:
        return value
    f = float(np.asarray(value).reshape(()))
    if f != round(f):
        raise ValueError(f"{key} {f} is not an integer")
    return int(round(f))


def _is_lmdb(path: Path) -> bool:
    return path.name.lower().endswith(LMDB_SUFFIXES)


def _close(db: Any) -> None:
    close = getattr(db, "close", None)
    if close is not None:
        close()
    con = getattr(db, "connection", None)
    if isinstance(con, sqlite3.Connection):
        con.close()
        db.connection = None
