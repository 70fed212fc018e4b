"""Frames that share their atoms, validated a block at a time: the construction path of container converters
(HDF5 conformations, NPZ trajectory frames), accepted or refused exactly as ``AtomGraph(...)`` would."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from shards.format.schema import FIELDS, KEY_RE, AtomGraph, FileKeys, SchemaError
from shards.format.validate import check_key, check_scalars

_FLOAT32_MAX = float(np.finfo(np.float32).max)
# fields a FrameStack may share between its frames, and the per-frame scalars its ``graph`` accepts
_STACK_COMMON = frozenset({"domain", "source", "source_file", "atomic_numbers", "cell", "pbc", "charge", "spin",
                           "trajectory_id"})
_FRAME_SCALARS = frozenset({"energy", "properties", "property_units", "frame_time", "charge", "spin",
                            "trajectory_id"})
_NONE_FIELDS = {f.name: None for f in FIELDS}
R = TypeVar("R")


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


def _plain_label(v: Any) -> bool:
    """A label value the validator keeps as it is: absent, or a finite Python float."""
    return v is None or (type(v) is float and math.isfinite(v))


def plain_labels(values: Sequence[Any]) -> np.ndarray:
    """``_plain_label`` of every value, vectorised when all are Python floats (the common block of labels)."""
    if None not in values and set(map(type, values)) <= {float}:
        return np.isfinite(np.array(values, dtype=np.float64))
    return np.fromiter((_plain_label(v) for v in values), dtype=bool, count=len(values))


class FrameStack:
    """Frames that share their atoms and graph-level fields (``common``: atomic numbers, cell, pbc, domain, source,
    source file, charge, spin, trajectory id) and take their positions (and forces) from rows of one ``[C, N, 3]``
    block, as container files store conformations and MD frames. Per-frame labels may come as blocks too:
    ``energy`` (one value or None per frame) and ``properties`` (name -> one value or None per frame, a None
    leaving the property out of that frame) with their ``property_units`` (name -> unit). Construction validates
    what the frames share once (a probe ``AtomGraph`` through the full validator), the finiteness of every row with
    one vectorised pass, and the block labels in one loop.

    ``graph(i, ...)`` then builds frame ``i``. A frame that passed every block check is built by the trusted
    constructor of this module, which skips only the checks already done for the whole block and still runs the
    per-frame ones (key, index, and every scalar passed to ``graph``), so it is accepted or refused exactly as
    ``AtomGraph(...)`` would accept or refuse it, with the same arrays. Any other frame (or every frame of a block
    that is not read-only float32 of the right shape, or whose shared fields are invalid) is built by
    ``AtomGraph(...)`` itself and raises the validator's own ``SchemaError``. The trusted constructor is used
    nowhere else."""

    def __init__(self, common: dict[str, Any], positions: np.ndarray, forces: np.ndarray | None = None, *,
                 energy: Sequence[float | None] | None = None,
                 properties: Mapping[str, Sequence[float | None]] | None = None,
                 property_units: Mapping[str, str] | None = None) -> None:
        unknown = set(common) - _STACK_COMMON
        if unknown:
            raise TypeError(f"FrameStack cannot share {sorted(unknown)} between frames")
        n_frames = len(positions)
        for name, col in (("energy", energy), *((f"properties[{k}]", v) for k, v in (properties or {}).items())):
            if col is not None and len(col) != n_frames:
                raise TypeError(f"FrameStack {name} has {len(col)} values for {n_frames} frames")
        self._common, self._positions, self._forces = common, positions, forces
        self._energy, self._properties = energy, dict(properties or {})
        self._units = dict(property_units or {})
        self._per_frame = _FRAME_SCALARS - common.keys() - {
            *(("energy",) if energy is not None else ()), *(("properties", "property_units") if properties else ())}
        self._trusted: list[bool] | None = None  # per frame: positions, forces if any, block labels passed
        self._trusted_without_forces: list[bool] | None = None
        self._base: dict[str, Any] = {}
        self._frame_props: list[Any] | None = None
        self._frame_units: list[Any] = []
        try:
            probe = AtomGraph(key="probe", index=0, positions=np.zeros((len(common.get("atomic_numbers", ())), 3),
                                                                        dtype=np.float32), **common)
        except (SchemaError, TypeError):
            return  # the shared fields are invalid: every frame takes the validator's path and its reason
        n = probe.n_atoms
        if not _trusted_block(positions, n) or (forces is not None and (
                not _trusted_block(forces, n) or len(forces) != n_frames)):
            return
        if not self._trusted_labels():
            return
        self._base = {**_NONE_FIELDS, **{k: probe.__dict__[k] for k in common}}
        ok_pos = finite_rows(positions)
        if energy is not None:
            ok_pos &= plain_labels(energy)
        for col in self._properties.values():
            ok_pos &= plain_labels(col)
        self._trusted_without_forces = ok_pos.tolist()
        self._frame_props, self._frame_units = self._all_properties(n_frames) or (None, [])
        self._trusted = self._trusted_without_forces if forces is None else (ok_pos & finite_rows(forces)).tolist()
        self._rows = list(positions)  # row views, as the validator would keep them
        self._force_rows = None if forces is None else list(forces)

    def _trusted_labels(self) -> bool:
        """Property names and units the validator keeps as they are (else every frame takes its path)."""
        return all(type(k) is str and k for k in self._properties) and all(
            type(k) is str and type(u) is str and k in self._properties for k, u in self._units.items())

    def __len__(self) -> int:
        return len(self._positions)

    def _labels(self, i: int) -> dict[str, Any]:
        """Frame ``i``'s block labels as ``AtomGraph`` keyword arguments."""
        out: dict[str, Any] = {}
        if self._energy is not None:
            out["energy"] = self._energy[i]
        if self._properties:
            props = {k: col[i] for k, col in self._properties.items() if col[i] is not None}
            out["properties"] = props or None
            units = {k: self._units[k] for k in props if k in self._units}
            out["property_units"] = units or None
        return out

    def _all_properties(self, n_frames: int) -> tuple[list[Any], list[Any]] | None:
        """The ``properties`` and ``property_units`` of ``_labels(i)`` for every frame, in one pass per block; None
        when the frames have no block properties."""
        if not self._properties:
            return None
        names, units = tuple(self._properties), self._units
        if len(names) == 1 and None not in self._properties[names[0]]:  # one column, every frame has it
            k = names[0]
            props: list[Any] = [{k: v} for v in self._properties[k]]
            return props, [{k: units[k]} for _ in range(n_frames)] if k in units else [None] * n_frames
        props = [{k: v for k, v in zip(names, row, strict=True) if v is not None} or None
                 for row in zip(*self._properties.values(), strict=True)]
        return props, [None if p is None else ({k: units[k] for k in p if k in units} or None) for p in props]

    def graph(self, i: int, *, key: str, index: int, with_forces: bool = True, **scalars: Any) -> AtomGraph:
        """Frame ``i`` as a validated ``AtomGraph`` (forces from the block unless ``with_forces`` is False)."""
        if scalars and not self._per_frame.issuperset(scalars):
            bad = sorted(set(scalars) - self._per_frame)
            raise TypeError(f"FrameStack frames take no {bad} (not a per-frame scalar, or given by the stack)")
        with_forces = with_forces and self._forces is not None
        trusted = self._trusted if with_forces else self._trusted_without_forces
        if trusted is None or not trusted[i] or type(index) is not int or index < 0:
            return self._validated(i, key, index, with_forces, scalars)
        check_key(key)
        g = self._trusted_graph(i, key, index, with_forces)
        if scalars:
            g.__dict__.update(scalars)
            check_scalars(g)
        return g

    def graphs(self, keys: Sequence[str] | FileKeys, first: int, refuse: Callable[[int, Exception], R], *,
               with_forces: Sequence[bool] | None = None) -> Iterator[AtomGraph | R]:
        """Every frame in order, as ``graph(i, key=keys[i], index=first + i, with_forces=with_forces[i])`` would
        build it; a frame that ``graph`` refuses (``SchemaError``, ``ValueError``, ``TypeError``) becomes
        ``refuse(index, exc)``. One loop for the block, without a call per frame for the trusted ones. ``keys`` may
        be a file's :class:`FileKeys`, which gives the keys of indices ``first, first + 1, ...`` and matches them
        against the key pattern once for the block."""
        n = len(self._positions)
        valid: bool | None = None
        if isinstance(keys, FileKeys):
            valid = keys.valid
            keys = keys.many(range(first, first + n))
        if len(keys) != n or (with_forces is not None and len(with_forces) != n):
            raise TypeError(f"FrameStack.graphs needs one key (and with_forces flag) for each of {len(self)} frames")
        has_forces = self._forces is not None
        flags = [has_forces] * n if with_forces is None else [has_forces and bool(f) for f in with_forces]
        fast = self._fast_frames(keys, first, flags, valid)
        base, rows, force_rows, energy = self._base, self._rows, self._force_rows, self._energy
        props, units = self._frame_props, self._frame_units
        new = object.__new__
        for i in range(n):
            # every check of this frame was done for the block: the body of _trusted_graph, inlined because a
            # method call per frame costs about a tenth of an NPZ frame's whole conversion (measured 0.4-0.6 us)
            if fast[i]:
                g = new(AtomGraph)
                d = g.__dict__
                d.update(base)
                d["key"], d["index"], d["positions"] = keys[i], first + i, rows[i]
                if flags[i] and force_rows is not None:
                    d["forces"] = force_rows[i]
                if energy is not None:
                    d["energy"] = energy[i]
                if props is not None:
                    d["properties"], d["property_units"] = props[i], units[i]
                yield g
                continue
            try:
                graph = self._validated(i, keys[i], first + i, flags[i], {})
            except (ValueError, TypeError) as exc:  # SchemaError is a ValueError
                yield refuse(first + i, exc)
            else:
                yield graph

    def _fast_frames(self, keys: Sequence[str], first: int, flags: list[bool],
                     valid: bool | None = None) -> list[bool]:
        """Per frame: whether the trusted constructor may build it (its rows and block labels passed, its key
        matches the key pattern (``valid``: known for all keys at once), its index is a non-negative int)."""
        if self._trusted is None or self._trusted_without_forces is None or type(first) is not int or first < 0:
            return [False] * len(keys)
        with_f, without_f = self._trusted, self._trusted_without_forces
        if valid is not None and len(set(flags)) <= 1:  # one key check and one forces flag for the whole block
            return list(with_f if flags and flags[0] else without_f) if valid else [False] * len(keys)
        if valid is not None:
            key_ok = [valid] * len(keys)
        elif all(type(k) is str for k in keys):
            key_ok = [m is not None for m in map(KEY_RE.match, keys)]
        else:
            key_ok = [type(k) is str and KEY_RE.match(k) is not None for k in keys]
        return [ok and (with_f[i] if f else without_f[i]) for i, (ok, f) in enumerate(zip(key_ok, flags, strict=True))]

    def _validated(self, i: int, key: str, index: int, with_forces: bool, scalars: dict[str, Any]) -> AtomGraph:
        return AtomGraph(**self._common, key=key, index=index, positions=self._positions[i],
                         forces=self._forces[i] if with_forces and self._forces is not None else None,
                         **self._labels(i), **scalars)

    def _trusted_graph(self, i: int, key: str, index: int, with_forces: bool) -> AtomGraph:
        """The trusted constructor: every array and block-label check was done for the whole block."""
        g = object.__new__(AtomGraph)
        d = g.__dict__
        d.update(self._base)
        d["key"], d["index"], d["positions"] = key, index, self._rows[i]
        if with_forces and self._force_rows is not None:
            d["forces"] = self._force_rows[i]
        if self._energy is not None:
            d["energy"] = self._energy[i]
        if self._frame_props is not None:
            d["properties"], d["property_units"] = self._frame_props[i], self._frame_units[i]
        return g


def _trusted_block(block: Any, n: int) -> bool:
    """A block whose rows the validator would keep as they are: read-only, C-contiguous float32 ``[C, n, 3]``."""
    return (type(block) is np.ndarray and block.dtype == np.float32 and block.ndim == 3
            and block.shape[1:] == (n, 3) and block.flags.c_contiguous and not block.flags.writeable)
