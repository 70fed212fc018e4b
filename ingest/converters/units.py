"""Source units of container datasets and their factors to the schema's units (Å, eV, eV/Å), plus the small
checks every container converter applies to a record (element range, label shapes)."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ingest.plugin import owned

HARTREE_EV = 27.211386245988  # CODATA 2018
BOHR_ANGSTROM = 0.529177210903  # CODATA 2018
KCAL_MOL_EV = 4.184 / 96.48533212331002  # thermochemical kcal, N_A * e (CODATA 2018): 0.0433641...
KJ_MOL_EV = 1.0 / 96.48533212331002

# unit name -> factor to eV (energies) or Å (lengths); forces are energy / length
ENERGY_UNITS: Mapping[str, float] = {"eV": 1.0, "Ha": HARTREE_EV, "hartree": HARTREE_EV, "kcal/mol": KCAL_MOL_EV,
                                     "kJ/mol": KJ_MOL_EV, "meV": 1e-3}
LENGTH_UNITS: Mapping[str, float] = {"Å": 1.0, "A": 1.0, "angstrom": 1.0, "bohr": BOHR_ANGSTROM, "nm": 10.0}


def energy_factor(unit: str) -> float:
    """Factor from ``unit`` to eV; an unknown unit is a ValueError naming the known ones."""
    if unit not in ENERGY_UNITS:
        raise ValueError(f"unknown energy unit {unit!r}; known: {sorted(ENERGY_UNITS)}")
    return ENERGY_UNITS[unit]


def length_factor(unit: str) -> float:
    """Factor from ``unit`` to Å; an unknown unit is a ValueError naming the known ones."""
    if unit not in LENGTH_UNITS:
        raise ValueError(f"unknown length unit {unit!r}; known: {sorted(LENGTH_UNITS)}")
    return LENGTH_UNITS[unit]


def check_units(energy_unit: str, length_unit: str) -> None:
    """Raise ValueError (an options error) for an unknown energy or length unit."""
    energy_factor(energy_unit)
    length_factor(length_unit)


def elements(z: Any) -> np.ndarray:
    """Atomic numbers as a read-only uint8 array; anything outside 1..118 is a ValueError naming it."""
    arr = np.asarray(z)
    if arr.ndim == 1 and 0 < arr.size <= 256 and arr.dtype.kind in "iu":  # small integer arrays: Python's min/max
        values = arr.tolist()
        lo, hi = min(values), max(values)
        if lo < 1 or hi > 118:
            raise ValueError(f"unknown element: atomic number {lo if lo < 1 else hi} not in 1..118")
        return owned(arr, np.uint8)
    if arr.ndim != 1:
        raise ValueError(f"atomic numbers must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("zero atoms")
    if arr.dtype.kind in "OUS":
        arr = _from_symbols(arr)
    if arr.dtype.kind not in "iu" and (arr.dtype.kind != "f" or not np.all(np.isfinite(arr))
                                       or not np.all(arr == np.round(arr))):
        raise ValueError(f"atomic numbers must be integers, got dtype {arr.dtype}")
    lo, hi = arr.min(), arr.max()
    if lo < 1 or hi > 118:
        raise ValueError(f"unknown element: atomic number {(lo if lo < 1 else hi).item()} not in 1..118")
    return owned(arr, np.uint8)


def _from_symbols(arr: np.ndarray) -> np.ndarray:
    """Element symbols (str or bytes) as atomic numbers; an unknown symbol is a ValueError naming it."""
    from ase.data import atomic_numbers

    symbols = [s.decode("ascii", "replace") if isinstance(s, bytes) else str(s) for s in arr.tolist()]
    unknown = sorted({s for s in symbols if s not in atomic_numbers or atomic_numbers[s] == 0})
    if unknown:
        raise ValueError(f"unknown element symbols {unknown[:5]}")
    return np.array([atomic_numbers[s] for s in symbols], dtype=np.int64)


def scaled(values: Any, factor: float, shape: tuple[int, ...], what: str) -> np.ndarray:
    """``values * factor`` as read-only float32 of ``shape``; a wrong shape is a ValueError naming ``what``."""
    arr = np.asarray(values)
    if arr.shape != shape:
        if arr.size == math.prod(shape) and arr.ndim == 1:
            arr = arr.reshape(shape)
        else:
            raise ValueError(f"{what} has shape {arr.shape}, expected {shape}")
    if factor == 1.0:
        return owned(arr, np.float32)
    return owned(np.multiply(arr, factor, dtype=np.float64), np.float32)


def scaled_block(values: Any, factor: float) -> np.ndarray:
    """A block of per-record arrays times ``factor`` as one read-only float32 array: its rows are handed to
    records as they are (C-contiguous, read-only views the schema keeps without copying)."""
    arr = np.asarray(values)
    out = np.multiply(arr, factor, dtype=np.float64).astype(np.float32) if factor != 1.0 else \
        np.array(arr, dtype=np.float32, order="C")
    out.flags.writeable = False
    return out


def labels(values: Any, factor: float) -> list[float | None]:
    """A block of scalar labels (shape [B] or [B, 1]) times ``factor``; NaN (not computed) becomes None."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"scalar labels have shape {arr.shape}")
    return [None if math.isnan(v) else v * factor for v in arr.tolist()]


def clip(records: range | None, n: int) -> tuple[range, range]:
    """(wanted records inside a file of ``n`` records, wanted records past its end)."""
    wanted = records if records is not None else range(n)
    k = len(range(wanted.start, min(wanted.stop, n), wanted.step)) if wanted.step > 0 else 0
    return wanted[:k], wanted[k:]
