"""Validation and dtype coercion of ``AtomGraph`` records, driven by the schema table."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from shards.format.schema import ARRAY_FIELDS, KEY_RE, MAX_ATOMS_DEFAULT, NAME_RE, NO_PBC, ZERO_CELL, SchemaError

if TYPE_CHECKING:
    from shards.format.schema import AtomGraph

_SET = object.__setattr__


def _coerce(a: Any, dtype: str) -> np.ndarray:
    """Canonical dtype, C-contiguous, read-only; copies only what the caller could still mutate."""
    arr = np.asarray(a)
    want = np.dtype(dtype)
    if arr.dtype != want or not arr.flags.c_contiguous:
        if want.kind in "iu":
            if arr.dtype.kind not in "iu":
                raise TypeError(f"expected integers, got dtype {arr.dtype}")
            out = arr.astype(want)
            if not np.array_equal(out, arr):
                raise ValueError(f"values {arr.min()}..{arr.max()} do not fit {dtype}")
            out.flags.writeable = False
            return out
        elif want.kind == "b" and arr.dtype.kind not in "biu":
            raise TypeError(f"expected booleans, got dtype {arr.dtype}")
        elif want.kind == "S" and arr.dtype.kind == "U":
            arr = np.char.encode(arr, "ascii")
        arr = np.ascontiguousarray(arr, dtype=dtype)
    elif arr.flags.writeable:
        arr = arr.copy()
    arr.flags.writeable = False
    return arr


def check_key(key: Any) -> None:
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise SchemaError(str(key), "key", "must match [A-Za-z0-9][A-Za-z0-9_-]{0,95} (no dots or slashes)")


def validate_graph(g: AtomGraph, max_atoms: int = MAX_ATOMS_DEFAULT) -> None:
    """Coerce arrays to schema dtypes and check every invariant; raise ``SchemaError`` on the first."""
    key = g.key
    check_key(key)
    for f in ARRAY_FIELDS:
        v = getattr(g, f.name)
        if v is None:
            if f.required:
                raise SchemaError(key, f.name, "is required")
            continue
        try:
            _SET(g, f.name, _coerce(v, f.dtype))
        except (ValueError, TypeError, UnicodeError) as exc:
            raise SchemaError(key, f.name, f"cannot convert to {f.dtype}: {exc}") from None
    z = g.atomic_numbers
    if z.ndim != 1:
        raise SchemaError(key, "atomic_numbers", f"must be 1-D, got shape {z.shape}")
    n = z.shape[0]
    n_b = g.bonds.shape[0] if g.bonds is not None and g.bonds.ndim == 2 else None
    for f in ARRAY_FIELDS:
        v = getattr(g, f.name)
        if v is None:
            continue
        want = tuple(n if s == "N" else (n_b if s == "B" else s) for s in f.shape)
        if v.shape != want:
            raise SchemaError(key, f.name, f"shape {v.shape} does not match expected {want}")
    check_invariants(g, max_atoms)


def check_invariants(g: AtomGraph, max_atoms: int = MAX_ATOMS_DEFAULT) -> None:
    """Value checks on a graph whose arrays already have schema dtypes and shapes."""
    key = g.key
    if not isinstance(g.domain, str) or not NAME_RE.match(g.domain):
        raise SchemaError(key, "domain", f"{g.domain!r} is not a lowercase identifier")
    if not isinstance(g.source, str) or not g.source:
        raise SchemaError(key, "source", "must be a non-empty string")
    if not isinstance(g.source_file, str):
        raise SchemaError(key, "source_file", "must be a string")
    if isinstance(g.index, bool) or not isinstance(g.index, (int, np.integer)) or g.index < 0:
        raise SchemaError(key, "index", f"must be a non-negative integer, got {g.index!r}")
    z = g.atomic_numbers
    n = len(z)
    if n == 0:
        raise SchemaError(key, "atomic_numbers", "zero atoms")
    if n > max_atoms:
        raise SchemaError(key, "atomic_numbers", f"{n} atoms exceeds the limit of {max_atoms}")
    if n <= 64:  # Python's min/max on bytes beat numpy reductions for small molecules
        zb = z.tobytes()
        bad = min(zb) < 1 or max(zb) > 118
    else:  # one reduction: z - 1 wraps 0 to 255 in uint8
        bad = int(np.subtract(z, 1, dtype=np.uint8).max()) > 117
    if bad:
        raise SchemaError(key, "atomic_numbers", f"values must be in 1..118, got {int(z.min())}..{int(z.max())}")
    for name in ("positions", "forces"):
        v = getattr(g, name)
        if v is not None and not math.isfinite(np.vdot(v, v)):  # also bounds |x| < ~1e19
            raise SchemaError(key, name, "contains NaN, inf or absurdly large values")
    if g.cell is not ZERO_CELL and not math.isfinite(np.vdot(g.cell, g.cell)):
        raise SchemaError(key, "cell", "contains NaN or inf")
    if g.pbc is not NO_PBC and g.pbc.any() and abs(np.linalg.det(g.cell)) < 1e-6:
        raise SchemaError(key, "cell", "pbc is set but the cell is missing or singular")
    if g.bonds is not None:
        if g.bonds.size and (g.bonds.min() < 0 or g.bonds.max() >= n):
            raise SchemaError(key, "bonds", f"atom index out of range 0..{n - 1}")
        if g.bond_order is None:
            raise SchemaError(key, "bond_order", "is required when bonds are given")
        if not np.isfinite(g.bond_order).all():
            raise SchemaError(key, "bond_order", "contains NaN or inf")
    elif g.bond_order is not None:
        raise SchemaError(key, "bond_order", "given without bonds")
    check_scalars(g)


def check_scalars(g: AtomGraph) -> None:
    """Types and values of the graph-level scalar fields (normalised in place)."""
    key = g.key
    for name in ("charge", "spin"):
        v = getattr(g, name)
        if v is not None and type(v) is not int:
            if isinstance(v, bool) or not isinstance(v, np.integer):
                raise SchemaError(key, name, f"must be an integer, got {v!r}")
            _SET(g, name, int(v))
    if g.spin is not None and g.spin < 1:
        raise SchemaError(key, "spin", f"multiplicity must be >= 1, got {g.spin}")
    for name in ("energy", "frame_time"):
        v = getattr(g, name)
        if v is not None:
            _SET(g, name, _finite(key, name, v))
    if g.trajectory_id is not None and (not isinstance(g.trajectory_id, str) or not g.trajectory_id):
        raise SchemaError(key, "trajectory_id", "must be a non-empty string")
    props = g.properties
    if props is not None and (not isinstance(props, dict) or not all(
            type(k) is str and type(v) is float and math.isfinite(v) for k, v in props.items())):
        if not hasattr(props, "items"):
            raise SchemaError(key, "properties", "must be a mapping of name -> number")
        _SET(g, "properties", {_name(key, k): _finite(key, f"properties[{k}]", v) for k, v in props.items()})
    units = g.property_units
    if units is not None:
        if not hasattr(units, "items"):
            raise SchemaError(key, "property_units", "must be a mapping of name -> unit")
        if not isinstance(units, dict) or not all(type(k) is str and type(v) is str for k, v in units.items()):
            units = {str(k): str(v) for k, v in units.items()}
            _SET(g, "property_units", units)
        if not units.keys() <= (g.properties or {}).keys():
            unknown = sorted(set(units) - set(g.properties or {}))
            raise SchemaError(key, "property_units", f"units for unknown properties {unknown}")


def _name(key: str, k: Any) -> str:
    if not isinstance(k, str) or not k:
        raise SchemaError(key, "properties", f"property name {k!r} is not a non-empty string")
    return k


def _finite(key: str, name: str, v: Any) -> float:
    try:
        fv = float(v)
    except (TypeError, ValueError):
        raise SchemaError(key, name, f"must be a number, got {v!r}") from None
    if not math.isfinite(fv):
        raise SchemaError(key, name, "is NaN or inf")
    return fv
