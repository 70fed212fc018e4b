"""Validation and dtype coercion of ``AtomGraph`` records, driven by the schema table."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from shards.format.schema import (
    ARRAY_FIELDS,
    FIELDS,
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
    for name, _, _, _, lead, trail in _ARRAY_SPECS:
        v = d[name]
        if v is None:
            continue
        want_shape = trail if lead is None else ((n if lead == "N" else n_b), *trail)
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
    if pbc is not NO_PBC and pbc.any() and singular_cell(cell):
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
    for name in ("charge", "spin"):
        v = d[name]
        if v is not None and type(v) is not int:
            if isinstance(v, bool) or not isinstance(v, np.integer):
                raise SchemaError(key, name, f"must be an integer, got {v!r}")
            d[name] = int(v)
    if d["spin"] is not None and d["spin"] < 1:
        raise SchemaError(key, "spin", f"multiplicity must be >= 1, got {d['spin']}")
    for name in ("energy", "frame_time"):
        v = d[name]
        if v is not None and (type(v) is not float or not math.isfinite(v)):
            d[name] = _finite(key, name, v)
    traj = d["trajectory_id"]
    if traj is not None and (not isinstance(traj, str) or not traj):
        raise SchemaError(key, "trajectory_id", "must be a non-empty string")
    props = d["properties"]
    if props is not None and (not isinstance(props, dict) or not all(
            type(k) is str and type(v) is float and math.isfinite(v) for k, v in props.items())):
        if not hasattr(props, "items"):
            raise SchemaError(key, "properties", "must be a mapping of name -> number")
        props = d["properties"] = {_name(key, k): _finite(key, f"properties[{k}]", v) for k, v in props.items()}
    units = d["property_units"]
    if units is not None:
        if not hasattr(units, "items"):
            raise SchemaError(key, "property_units", "must be a mapping of name -> unit")
        if not isinstance(units, dict) or not all(type(k) is str and type(v) is str for k, v in units.items()):
            units = d["property_units"] = {str(k): str(v) for k, v in units.items()}
        if not units.keys() <= (props or {}).keys():
            unknown = sorted(set(units) - set(props or {}))
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


_FLOAT32_MAX = float(np.finfo(np.float32).max)
# fields a FrameStack may share between its frames, and the per-frame scalars its ``graph`` accepts
_STACK_COMMON = frozenset({"domain", "source", "source_file", "atomic_numbers", "cell", "pbc", "charge", "spin",
                           "trajectory_id"})
_FRAME_SCALARS = frozenset({"energy", "properties", "property_units", "frame_time", "charge", "spin",
                            "trajectory_id"})
_NONE_FIELDS = {f.name: None for f in FIELDS}


def finite_rows(stack: np.ndarray) -> np.ndarray:
    """Per leading row of a float32 stack, the validator's own test ``math.isfinite(np.vdot(row, row))`` (NaN, inf,
    or a sum of squares that overflows float32), computed for all rows at once: exactly in float64, with ``vdot``
    itself only for the rows whose sum is within a factor 2 of the float32 limit, where rounding could decide."""
    flat = stack.reshape(stack.shape[0], -1)
    sums = np.einsum("ij,ij->i", flat, flat, dtype=np.float64)
    ok = sums < 0.5 * _FLOAT32_MAX  # False for NaN
    for i in np.flatnonzero(~ok & (sums < 2.0 * _FLOAT32_MAX)).tolist():
        ok[i] = math.isfinite(np.vdot(flat[i], flat[i]))
    return ok


class FrameStack:
    """Frames that share their atoms and graph-level fields (``common``: atomic numbers, cell, pbc, domain, source,
    source file, charge, spin, trajectory id) and take their positions (and forces) from rows of one ``[C, N, 3]``
    block, as container files store conformations and MD frames. Construction validates what the frames share once
    (a probe ``AtomGraph`` through the full validator) and the finiteness of every row with one vectorised pass.

    ``graph(i, ...)`` then builds frame ``i``. A frame that passed every block check is built by this module's
    trusted constructor, which skips only the checks already done for the whole block and still runs the per-frame
    ones (key, index, every scalar, in the validator's order), so it is accepted or refused exactly as
    ``AtomGraph(...)`` would accept or refuse it, with the same arrays. Any other frame (or every frame of a block
    that is not read-only float32 of the right shape, or whose shared fields are invalid) is built by
    ``AtomGraph(...)`` itself and raises the validator's own ``SchemaError``. The trusted constructor is used
    nowhere else."""

    def __init__(self, common: dict[str, Any], positions: np.ndarray, forces: np.ndarray | None = None) -> None:
        from shards.format.schema import AtomGraph

        unknown = set(common) - _STACK_COMMON
        if unknown:
            raise TypeError(f"FrameStack cannot share {sorted(unknown)} between frames")
        self._cls, self._common, self._positions, self._forces = AtomGraph, common, positions, forces
        self._per_frame = _FRAME_SCALARS - common.keys()
        self._trusted: list[bool] | None = None  # per frame: positions, and forces if any, passed the block check
        self._trusted_without_forces: list[bool] | None = None
        self._base: dict[str, Any] = {}
        try:
            probe = AtomGraph(key="probe", index=0, positions=np.zeros((len(common.get("atomic_numbers", ())), 3),
                                                                        dtype=np.float32), **common)
        except (SchemaError, TypeError):
            return  # the shared fields are invalid: every frame takes the validator's path and its reason
        n = probe.n_atoms
        if not _trusted_block(positions, n) or (forces is not None and (
                not _trusted_block(forces, n) or len(forces) != len(positions))):
            return
        self._base = {**_NONE_FIELDS, **{k: probe.__dict__[k] for k in common}}
        ok_pos = finite_rows(positions)
        self._trusted_without_forces = ok_pos.tolist()
        self._trusted = self._trusted_without_forces if forces is None else (ok_pos & finite_rows(forces)).tolist()
        self._rows = list(positions)  # row views, as the validator would keep them
        self._force_rows = None if forces is None else list(forces)

    def __len__(self) -> int:
        return len(self._positions)

    def graph(self, i: int, *, key: str, index: int, with_forces: bool = True, **scalars: Any) -> AtomGraph:
        """Frame ``i`` as a validated ``AtomGraph`` (forces from the block unless ``with_forces`` is False)."""
        if not self._per_frame.issuperset(scalars):
            bad = sorted(set(scalars) - self._per_frame)
            raise TypeError(f"FrameStack frames take no {bad} (not a per-frame scalar, or shared by the stack)")
        with_forces = with_forces and self._forces is not None
        trusted = self._trusted if with_forces else self._trusted_without_forces
        if trusted is None or not trusted[i] or type(index) is not int or index < 0:
            return self._cls(**self._common, key=key, index=index, positions=self._positions[i],
                             forces=self._forces[i] if with_forces and self._forces is not None else None, **scalars)
        check_key(key)
        g = object.__new__(self._cls)  # the trusted constructor: every array check was done for the whole block
        d = g.__dict__
        d.update(self._base)
        d["key"], d["index"], d["positions"] = key, index, self._rows[i]
        if with_forces and self._force_rows is not None:
            d["forces"] = self._force_rows[i]
        d.update(scalars)
        check_scalars(g)
        return g


def _trusted_block(block: Any, n: int) -> bool:
    """A block whose rows the validator would keep as they are: read-only, C-contiguous float32 ``[C, n, 3]``."""
    return (type(block) is np.ndarray and block.dtype == np.float32 and block.ndim == 3
            and block.shape[1:] == (n, 3) and block.flags.c_contiguous and not block.flags.writeable)
