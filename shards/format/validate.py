"""Validation and dtype coercion of ``AtomGraph`` records, driven by the schema table."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from shards.format.schema import (
    ARRAY_FIELDS,
    KEY_RE,
    MAX_ATOMS_DEFAULT,
    NAME_RE,
    NO_PBC,
    ZERO_CELL,
    SchemaError,
)

if TYPE_CHECKING:
    from shards.format.schema import AtomGraph



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


# (name, dtype, dtype name, required, leading size symbol ("N", "B" or None), trailing shape) per array field
_ARRAY_SPECS: tuple[tuple[str, np.dtype, str, bool, str | None, tuple[int, ...]], ...] = tuple(
    (f.name, np.dtype(f.dtype), f.dtype, f.required, f.shape[0] if f.shape[:1] in (("N",), ("B",)) else None,
     tuple(f.shape[1:]) if f.shape[:1] in (("N",), ("B",)) else tuple(f.shape)) for f in ARRAY_FIELDS)
# (name, fixed shape or None, position in the per-graph tuple of sized shapes) per array field, for the shape pass
_SIZED = ((None, ()), ("N", ()), ("N", (3,)), ("B", ()), ("B", (2,)))
_SHAPE_SPECS = tuple((name, trail if lead is None else None, _SIZED.index((lead, trail)) if lead else 0)
                     for name, _, _, _, lead, trail in _ARRAY_SPECS)


def validate_graph(g: AtomGraph, max_atoms: int = MAX_ATOMS_DEFAULT) -> None:
    """Coerce arrays to schema dtypes and check every invariant; raise ``SchemaError`` on the first."""
    d = g.__dict__
    key = d["key"]
    check_key(key)
    for name, want, dtype_name, required, _, _ in _ARRAY_SPECS:
        v = d[name]
        if v is None:
            if required:
                raise SchemaError(key, name, "is required")
            continue
        # an array the caller cannot mutate, already in the schema dtype and layout, is kept as it is
        if type(v) is np.ndarray and v.dtype is want:
            flags = v.flags
            if not flags.writeable and flags.c_contiguous:
                continue
        try:
            d[name] = _coerce(v, dtype_name)
        except (ValueError, TypeError, UnicodeError) as exc:
            raise SchemaError(key, name, f"cannot convert to {dtype_name}: {exc}") from None
    z = d["atomic_numbers"]
    if z.ndim != 1:
        raise SchemaError(key, "atomic_numbers", f"must be 1-D, got shape {z.shape}")
    n = z.shape[0]
    bonds = d["bonds"]
    n_b = bonds.shape[0] if bonds is not None and bonds.ndim == 2 else None
    sized = (None, (n,), (n, 3), (n_b,), (n_b, 2))
    for name, fixed, at in _SHAPE_SPECS:
        v = d[name]
        if v is not None:
            want_shape = fixed if fixed is not None else sized[at]
            if v.shape != want_shape:
                raise SchemaError(key, name, f"shape {v.shape} does not match expected {want_shape}")
    check_invariants(g, max_atoms)


def check_invariants(g: AtomGraph, max_atoms: int = MAX_ATOMS_DEFAULT) -> None:
    """Value checks on a graph whose arrays already have schema dtypes and shapes."""
    d = g.__dict__
    key = d["key"]
    domain = d["domain"]
    if not isinstance(domain, str) or not NAME_RE.match(domain):
        raise SchemaError(key, "domain", f"{domain!r} is not a lowercase identifier")
    if not isinstance(d["source"], str) or not d["source"]:
        raise SchemaError(key, "source", "must be a non-empty string")
    if not isinstance(d["source_file"], str):
        raise SchemaError(key, "source_file", "must be a string")
    index = d["index"]
    if type(index) is not int and (isinstance(index, bool) or not isinstance(index, (int, np.integer))) \
            or index < 0:
        raise SchemaError(key, "index", f"must be a non-negative integer, got {index!r}")
    if type(index) is not int:
        d["index"] = int(index)  # a numpy integer (or int subclass) becomes a plain int, as charge and spin do
    z = d["atomic_numbers"]
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
        v = d[name]
        if v is not None and not math.isfinite(np.vdot(v, v)):  # also bounds |x| < ~1e19
            raise SchemaError(key, name, "contains NaN, inf or absurdly large values")
    cell, pbc = d["cell"], d["pbc"]
    if cell is not ZERO_CELL and not math.isfinite(np.vdot(cell, cell)):
        raise SchemaError(key, "cell", "contains NaN or inf")
    if pbc is not NO_PBC and pbc.tobytes() != _NO_PBC_BYTES and singular_cell(cell):
        raise SchemaError(key, "cell", "pbc is set but the cell is missing or singular")
    bonds, bond_order = d["bonds"], d["bond_order"]
    if bonds is not None:
        if bonds.size and (bonds.min() < 0 or bonds.max() >= n):
            raise SchemaError(key, "bonds", f"atom index out of range 0..{n - 1}")
        if bond_order is None:
            raise SchemaError(key, "bond_order", "is required when bonds are given")
        if not np.isfinite(bond_order).all():
            raise SchemaError(key, "bond_order", "contains NaN or inf")
    elif bond_order is not None:
        raise SchemaError(key, "bond_order", "given without bonds")
    check_scalars(g)


_NO_PBC_BYTES = bytes(3)  # NO_PBC.tobytes(): three False
_DET_SLACK = 1024 * np.finfo(np.float64).eps


def singular_cell(cell: np.ndarray) -> bool:
    """``abs(np.linalg.det(cell)) < 1e-6``, the validator's rule for a periodic cell: decided by the 3x3 cofactor
    expansion in Python floats when it is further from the threshold than the rounding error either method can
    make (a multiple of eps times the Hadamard bound, the product of the row norms), else by ``np.linalg.det``."""
    (a, b, c), (d, e, f), (g, h, i) = cell.tolist()
    det = a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
    bound = _DET_SLACK * math.sqrt((a * a + b * b + c * c) * (d * d + e * e + f * f) * (g * g + h * h + i * i))
    if math.isfinite(det) and math.isfinite(bound) and abs(abs(det) - 1e-6) > bound:
        return abs(det) < 1e-6
    return bool(abs(np.linalg.det(cell)) < 1e-6)


def check_scalars(g: AtomGraph) -> None:
    """Types and values of the graph-level scalar fields (normalised in place)."""
    d = g.__dict__
    key = d["key"]
    charge, spin = d["charge"], d["spin"]
    if (charge is not None and type(charge) is not int) or (spin is not None and type(spin) is not int):
        for name in ("charge", "spin"):
            v = d[name]
            if v is not None and type(v) is not int:
                if isinstance(v, bool) or not isinstance(v, np.integer):
                    raise SchemaError(key, name, f"must be an integer, got {v!r}")
                d[name] = int(v)
    if d["spin"] is not None and d["spin"] < 1:
        raise SchemaError(key, "spin", f"multiplicity must be >= 1, got {d['spin']}")
    energy = d["energy"]
    if energy is not None and (type(energy) is not float or not math.isfinite(energy)):
        d["energy"] = _finite(key, "energy", energy)
    frame_time = d["frame_time"]
    if frame_time is not None and (type(frame_time) is not float or not math.isfinite(frame_time)):
        d["frame_time"] = _finite(key, "frame_time", frame_time)
    traj = d["trajectory_id"]
    if traj is not None and (not isinstance(traj, str) or not traj):
        raise SchemaError(key, "trajectory_id", "must be a non-empty string")
    props = d["properties"]
    if props is not None and (type(props) is not dict or not _plain_properties(props)):
        if not hasattr(props, "items"):
            raise SchemaError(key, "properties", "must be a mapping of name -> number")
        props = d["properties"] = {_name(key, k): _finite(key, f"properties[{k}]", v) for k, v in props.items()}
    units = d["property_units"]
    if units is not None:
        if not hasattr(units, "items"):
            raise SchemaError(key, "property_units", "must be a mapping of name -> unit")
        if type(units) is not dict or not (set(map(type, units)) <= _STR and set(map(type, units.values())) <= _STR):
            units = d["property_units"] = {str(k): str(v) for k, v in units.items()}
        if not units.keys() <= (props or {}).keys():
            unknown = sorted(set(units) - set(props or {}))
            raise SchemaError(key, "property_units", f"units for unknown properties {unknown}")


_STR = {str}


def _plain_properties(props: dict[Any, Any]) -> bool:
    """Every name a non-empty str and every value a finite Python float (the validator keeps such a mapping as it
    is): by the types of all names and values at once and the finiteness of their sum, else one by one."""
    if set(map(type, props)) <= {str} and "" not in props and set(map(type, props.values())) <= {float}:
        if math.isfinite(sum(props.values())):
            return True
        return all(math.isfinite(v) for v in props.values())
    return False


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
