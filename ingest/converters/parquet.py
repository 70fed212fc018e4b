"""Parquet tables (pyarrow) with one structure per row, the layout of hosted dataset hubs.

A column mapping in the options names the columns of atomic numbers, positions (nested ``[N][3]`` or flat
``[3N]`` lists), cell (``[3][3]`` or ``[9]``), pbc (``[3]`` booleans), energy, forces, charge, spin and
further numeric properties. Record ``r`` is row ``r`` of the file. Rows are read in record batches of the
row groups that overlap a unit, with only the mapped columns, and turned into arrays batch-wise.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ingest.converters.units import check_units, clip, elements, energy_factor, length_factor, scaled, scaled_block
from ingest.plugin import Converter, Reject, owned
from shards.format.schema import NAME_RE, NO_PBC, ZERO_CELL, AtomGraph, make_key

BATCH_ROWS = 1024
_ALL_PBC = np.ones(3, dtype=bool)
_ALL_PBC.flags.writeable = False


@dataclass(frozen=True)
class ParquetColumns:
    """Which column holds each field (None: not in the table)."""

    atomic_numbers: str = "atomic_numbers"
    positions: str = "positions"
    cell: str | None = None
    pbc: str | None = None
    energy: str | None = None
    forces: str | None = None
    charge: str | None = None
    spin: str | None = None


@dataclass(frozen=True)
class ParquetOptions:
    """``columns``: the column mapping. ``properties``: property name -> column of a numeric per-row label,
    stored as is with its unit from ``property_units``. ``energy_unit`` / ``length_unit``: the table's units
    (converted to eV and Å; forces are energy/length). ``domain``: auto (crystal when any axis is periodic,
    else molecule) or a fixed domain name. Without a pbc column a nonzero cell means periodic on all axes."""

    columns: ParquetColumns = field(default_factory=ParquetColumns)
    properties: dict[str, str] = field(default_factory=dict)
    property_units: dict[str, str] = field(default_factory=dict)
    energy_unit: str = "eV"
    length_unit: str = "Å"
    domain: str = "auto"

    def __post_init__(self) -> None:
        check_units(self.energy_unit, self.length_unit)
        if self.domain != "auto" and not NAME_RE.match(self.domain):
            raise ValueError(f"domain {self.domain!r} is not a lowercase identifier")
        unknown = sorted(set(self.property_units) - set(self.properties))
        if unknown:
            raise ValueError(f"property_units names properties without a column: {unknown}")


class ListColumn:
    """A (nested) list column of one record batch as flat numpy values plus per-row value ranges."""

    def __init__(self, arr: Any, name: str, factor: float | None = None) -> None:
        self.name = name
        self.null = np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        if not _is_list(arr.type):
            raise ValueError(f"column {name!r} is {arr.type}, not a list column")
        starts, stops = _bounds(arr)
        inner = arr.values
        self.inner_ok = np.ones(len(starts), dtype=bool)
        if _is_list(inner.type):  # nested [N][3]: each inner list must hold 3 values
            i_starts, i_stops = _bounds(inner)
            bad = np.flatnonzero(i_stops - i_starts != 3)
            if bad.size:
                self.inner_ok[np.searchsorted(starts, bad, side="right") - 1] = False
            edges = np.append(i_starts, i_stops[-1] if len(i_stops) else 0)  # list offsets are contiguous
            starts, stops = edges[starts], edges[stops]
            inner = inner.values
        self.starts, self.stops = starts, stops
        values = inner.to_numpy(zero_copy_only=False)
        self.values = values if factor is None else scaled_block(values, factor)  # float32, read-only, once

    def row(self, i: int) -> np.ndarray | None:
        """Row ``i``'s values (flat), or None when the row is null."""
        if self.null[i]:
            return None
        if not self.inner_ok[i]:
            raise ValueError(f"column {self.name!r}: inner lists are not of length 3")
        return self.values[self.starts[i]:self.stops[i]]


def _is_list(tp: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_list(tp) or pa.types.is_large_list(tp) or pa.types.is_fixed_size_list(tp))


def _bounds(arr: Any) -> tuple[np.ndarray, np.ndarray]:
    """Start and stop of each row's values in ``arr.values`` (which ignores the array's slice offset)."""
    import pyarrow as pa

    if pa.types.is_fixed_size_list(arr.type):
        size = arr.type.list_size
        starts = (np.arange(len(arr), dtype=np.int64) + arr.offset) * size
        return starts, starts + size
    offsets = arr.offsets.to_numpy()
    return offsets[:-1].astype(np.int64), offsets[1:].astype(np.int64)


class ParquetConverter(Converter):
    """Parquet rows -> samples through a column mapping (pyarrow, batch-wise)."""

    name = "parquet"
    domain = "molecule"
    suffixes = (".parquet", ".pq")
    default_source = "parquet"
    Options = ParquetOptions

    def count_records(self, path: Path, options: ParquetOptions) -> int | None:
        import pyarrow.parquet as pq

        with pq.ParquetFile(path) as pf:
            return int(pf.metadata.num_rows)

    def convert(self, path: Path, options: ParquetOptions, *, source: str, file_id: str,
                records: range | None = None) -> Iterator[AtomGraph | Reject]:
        import pyarrow.parquet as pq

        cols = options.columns
        wanted_cols = {k: v for k, v in vars(cols).items() if v is not None}
        wanted_cols.update({f"property:{k}": v for k, v in options.properties.items()})
        with pq.ParquetFile(path, memory_map=True) as pf:
            names = set(pf.schema_arrow.names)
            missing = sorted(set(wanted_cols.values()) - names)
            if missing:
                yield self.reject(file_id, None, f"{file_id}: columns {missing} are not in the table; "
                                  f"it has {sorted(names)[:30]}")
                return
            inside, beyond = clip(records, pf.metadata.num_rows)
            e_f, l_f = energy_factor(options.energy_unit), length_factor(options.length_unit)
            columns = sorted(set(wanted_cols.values()))
            for first, batch in self._batches(pf, inside, columns):
                view = {field: batch.column(col) for field, col in wanted_cols.items()}
                factors = {"atomic_numbers": None, "positions": l_f, "cell": None, "pbc": None, "forces": e_f / l_f}
                lists = {f: ListColumn(view[f], wanted_cols[f], factor) for f, factor in factors.items() if f in view}
                scalars = {f: _scalar(view[f]) for f in view if f not in lists}
                for i in range(batch.num_rows):
                    r = first + i
                    if r < inside.start:
                        continue
                    if r >= inside.stop:
                        break
                    yield self.build(file_id, r, lambda r=r, i=i, ls=lists, sc=scalars: self._graph(
                        ls, sc, i, r, options, e_f, l_f, source, file_id))
        for r in beyond:
            yield self.reject(file_id, r, "row beyond the end of the table")

    @staticmethod
    def _batches(pf: Any, inside: range, columns: list[str]) -> Iterator[tuple[int, Any]]:
        """(first row, record batch) over the row groups overlapping ``inside``."""
        if not inside:
            return
        meta = pf.metadata
        start = 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if start + n > inside.start and start < inside.stop:
                first = start
                for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[g], columns=columns,
                                             use_threads=False):
                    if first >= inside.stop:
                        break
                    if first + batch.num_rows > inside.start:
                        yield first, batch
                    first += batch.num_rows
            start += n
            if start >= inside.stop:
                return

    @staticmethod
    def _graph(lists: dict[str, ListColumn], scalars: dict[str, np.ndarray], i: int, r: int,
               options: ParquetOptions, e_f: float, l_f: float, source: str, file_id: str) -> AtomGraph:
        z = elements(_required(lists, "atomic_numbers", i))
        n = z.shape[0]
        pos = _atoms3(_required(lists, "positions", i), n, "positions")
        cell, pbc = ZERO_CELL, NO_PBC
        cell_row, pbc_row, forces_row = (lists[k].row(i) if k in lists else None for k in ("cell", "pbc", "forces"))
        if cell_row is not None:
            cell = owned(scaled(cell_row, l_f, (3, 3), "cell"), np.float64)
            pbc = _ALL_PBC if np.any(cell) else NO_PBC
        if pbc_row is not None:
            pbc = owned(pbc_row, bool)
            if pbc.shape != (3,):
                raise ValueError(f"pbc has shape {pbc.shape}, expected (3,)")
        forces = None if forces_row is None else _atoms3(forces_row, n, "forces")
        energy = _value(scalars, "energy", i)
        charge, spin = _value(scalars, "charge", i), _value(scalars, "spin", i)
        props = {k.split(":", 1)[1]: v for k in scalars if k.startswith("property:")
                 if (v := _value(scalars, k, i)) is not None}
        units = {k: u for k, u in options.property_units.items() if k in props}
        domain = options.domain if options.domain != "auto" else ("crystal" if pbc.any() else "molecule")
        return AtomGraph(key=make_key(source, file_id, r), domain=domain, source=source, source_file=file_id,
                         index=r, atomic_numbers=z, positions=pos, cell=cell, pbc=pbc,
                         energy=None if energy is None else energy * e_f, forces=forces,
                         charge=_int(charge, "charge"), spin=_int(spin, "spin"),
                         properties=props or None, property_units=units or None)


def _atoms3(values: np.ndarray, n: int, what: str) -> np.ndarray:
    """Flat per-atom values (already in schema units) as an (n, 3) view."""
    if values.shape != (3 * n,):
        raise ValueError(f"{what} has {values.shape[0]} values, expected {3 * n} for {n} atoms")
    return values.reshape(n, 3)


def _required(lists: dict[str, ListColumn], field: str, i: int) -> np.ndarray:
    values = lists[field].row(i)
    if values is None:
        raise ValueError(f"{field} column {lists[field].name!r} is null")
    return values


def _scalar(arr: Any) -> np.ndarray:
    """A numeric column as float64 with NaN for nulls."""
    import pyarrow as pa

    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_boolean(arr.type)):
        raise ValueError(f"column of type {arr.type} is not numeric")
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.float64)


def _value(scalars: dict[str, np.ndarray], name: str, i: int) -> float | None:
    if name not in scalars:
        return None
    v = float(scalars[name][i])
    return None if np.isnan(v) else v


def _int(v: float | None, what: str) -> int | None:
    if v is None:
        return None
    if v != round(v):
        raise ValueError(f"{what} {v} is not an integer")
    return int(v)
