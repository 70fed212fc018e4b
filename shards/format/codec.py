"""Binary codec for one ``AtomGraph``: typed arrays, never pickle.

Layout of one sample (one tar member ``<key>.scd``), little endian::

    b"SCDG" | u16 major | u16 minor | u32 meta_len | u32 n_atoms | u32 n_bonds | u32 field_mask
    | meta JSON (graph-level scalars, utf-8) | pad to 8 | arrays in schema order, each padded to 8

Bit ``i`` of ``field_mask`` says that the i-th array field of the schema table is present. Dtypes and
shapes come from the schema table, so a sample cannot carry an object dtype; ``cell`` and ``pbc`` are
omitted for non-periodic structures and decode as zeros / False.
"""
from __future__ import annotations

import json
import math
import struct
from functools import lru_cache
from json.encoder import encode_basestring_ascii
from typing import Any

import numpy as np
import orjson

from shards.format.schema import (
    ARRAY_FIELDS,
    FIELDS,
    MAX_ATOMS_DEFAULT,
    NO_PBC,
    SCALAR_FIELDS,
    SCHEMA_VERSION,
    ZERO_CELL,
    AtomGraph,
    SchemaError,
    SchemaVersionError,
)
from shards.format.validate import check_invariants, check_key

MAGIC = b"SCDG"
SUFFIX = "scd"
HEADER = struct.Struct("<4sHHIIII")
MAX_META_BYTES = 1 << 20
_BIT = {f.name: i for i, f in enumerate(ARRAY_FIELDS)}
_SCALAR_NAMES = frozenset(f.name for f in SCALAR_FIELDS)
_DEFAULTS = {f.name: None for f in FIELDS} | {"cell": ZERO_CELL, "pbc": NO_PBC}
_REQUIRED = tuple(f.name for f in FIELDS if f.required)


class CodecError(ValueError):
    """A sample's bytes are malformed."""


def _pad(n: int) -> int:
    return (-n) % 8


@lru_cache(maxsize=4096)
def _plan(mask: int) -> tuple[tuple[str, np.dtype, str, tuple[int, ...], int], ...]:
    """For a field mask: (name, dtype, leading symbol, trailing shape, bytes per leading row)."""
    out = []
    for i, f in enumerate(ARRAY_FIELDS):
        if mask >> i & 1:
            dt = np.dtype(f.dtype)
            lead = f.shape[0] if f.shape[0] in ("N", "B") else ""
            trail = tuple(f.shape[1:]) if lead else tuple(f.shape)
            out.append((f.name, dt, lead, trail, dt.itemsize * int(np.prod(trail, dtype=np.int64))))
    if mask >> len(ARRAY_FIELDS):
        raise CodecError(f"field mask {mask:#x} names unknown array fields")
    return tuple(out)


_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False)  # what json.dumps builds per call
_FLOAT_REPR = float.__repr__
_INT_REPR = int.__repr__


def meta_json(meta: dict[str, Any]) -> str:
    """``json.dumps(meta, separators=(",", ":"), ensure_ascii=True, allow_nan=False)`` without building an encoder
    per call: strings, ints, finite floats and string-keyed maps of them are written directly (as the json
    module writes them); anything else goes through the json module itself."""
    try:
        return "{" + ",".join(encode_basestring_ascii(k) + ":" + _json_value(v) for k, v in meta.items()) + "}"
    except _NotPlain:
        return _JSON.encode(meta)


class _NotPlain(Exception):
    """A value the direct writer leaves to the json module."""


def _json_value(v: Any) -> str:
    t = type(v)
    if t is str:
        return encode_basestring_ascii(v)
    if t is int:
        return _INT_REPR(v)
    if t is float and math.isfinite(v):
        return _FLOAT_REPR(v)
    if t is dict and all(type(k) is str for k in v):
        return "{" + ",".join(encode_basestring_ascii(k) + ":" + _json_value(x) for k, x in v.items()) + "}"
    raise _NotPlain
_SCALAR_SPECS = tuple((f.name, f.kind == "map") for f in SCALAR_FIELDS)
_ARRAY_BITS = tuple((f.name, 1 << _BIT[f.name], f.name in ("cell", "pbc")) for f in ARRAY_FIELDS)
_PADS = tuple(b"\0" * k for k in range(8))


def encode(g: AtomGraph) -> bytes:
    """Serialise a validated graph; the same graph always gives the same bytes."""
    d = g.__dict__
    meta: dict[str, Any] = {}
    for name, is_map in _SCALAR_SPECS:
        v = d[name]
        if v is not None:
            meta[name] = dict(sorted(v.items())) if is_map else v
    head = meta_json(meta).encode()
    cell, pbc = d["cell"], d["pbc"]
    periodic = not (pbc is NO_PBC and cell is ZERO_CELL) and (bool(pbc.any()) or bool(cell.any()))
    mask = 0
    parts = [b"", head, _PADS[_pad(HEADER.size + len(head))]]
    for name, bit, lattice in _ARRAY_BITS:
        a = d[name]
        if a is None or (lattice and not periodic):
            continue
        mask |= bit
        parts.append(a.tobytes())
        parts.append(_PADS[_pad(a.nbytes)])
    parts[0] = HEADER.pack(MAGIC, SCHEMA_VERSION[0], SCHEMA_VERSION[1], len(head), g.n_atoms, g.n_bonds, mask)
    return b"".join(parts)


def decode(buf: bytes | memoryview, *, validate: bool = True, max_atoms: int = MAX_ATOMS_DEFAULT) -> AtomGraph:
    """Parse one sample; arrays are zero-copy read-only views into ``buf``.

    With ``validate`` (the default) every schema invariant is checked, as ``AtomGraph()`` would.
    """
    size = len(buf)
    if size < HEADER.size:
        raise CodecError(f"sample of {size} bytes is shorter than its header")
    magic, major, minor, meta_len, n, n_b, mask = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise CodecError(f"bad magic {bytes(magic)!r}: not an SCD sample")
    if major != SCHEMA_VERSION[0]:
        raise SchemaVersionError(f"sample schema version {major}.{minor} is not supported "
                                 f"(this reader knows major {SCHEMA_VERSION[0]})")
    end = HEADER.size + meta_len
    if meta_len > MAX_META_BYTES or end > size:
        raise CodecError(f"header length {meta_len} is out of bounds for a {size}-byte sample")
    if n > max_atoms:
        raise CodecError(f"{n} atoms exceeds the limit of {max_atoms}")
    try:
        meta = orjson.loads(buf[HEADER.size:end])
    except orjson.JSONDecodeError as exc:
        raise CodecError(f"unreadable sample header: {exc}") from None
    if type(meta) is not dict:
        raise CodecError("sample header is not a JSON object")
    if not _SCALAR_NAMES.issuperset(meta):
        extra = sorted(set(meta) - _SCALAR_NAMES)
        if minor <= SCHEMA_VERSION[1]:
            raise CodecError(f"unknown fields {extra} in sample header")
        for name in extra:
            del meta[name]
    off = end + _pad(end)
    g = object.__new__(AtomGraph)
    d = g.__dict__
    d.update(_DEFAULTS)
    d.update(meta)
    for name, dt, lead, trail, row_bytes in _plan(mask):
        rows = n if lead == "N" else (n_b if lead == "B" else 1)
        nbytes = rows * row_bytes
        if off + nbytes > size:
            raise CodecError(f"array {name!r} ({nbytes} bytes at {off}) overruns the {size}-byte sample")
        shape = (rows, *trail) if lead else trail
        d[name] = np.frombuffer(buf, dtype=dt, count=nbytes // dt.itemsize, offset=off).reshape(shape)
        off += nbytes + _pad(nbytes)
    if validate:
        check_decoded(g, max_atoms)
    return g


def check_decoded(g: AtomGraph, max_atoms: int = MAX_ATOMS_DEFAULT) -> None:
    """Schema invariants for a decoded graph, whose dtypes and shapes the codec already fixed."""
    d = g.__dict__
    for name in _REQUIRED:
        if d[name] is None:
            raise SchemaError(str(g.key), name, "is required")
    check_key(g.key)
    check_invariants(g, max_atoms)
