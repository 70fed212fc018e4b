"""HDF5 molecule datasets in the SPICE and ANI-1x layouts (h5py), one sample per conformation.

Both layouts have one top-level group per molecule (SPICE) or formula (ANI-1x) holding ``atomic_numbers``
[N] and per-conformation arrays; the layout is detected from the groups' dataset names. Record ``r`` is
the r-th conformation counting through the groups in the file's link order. Conformations are read with
h5py slices of at most ``BLOCK_BYTES`` per dataset, so memory never holds a whole group.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ingest.converters.units import check_units, clip, elements, energy_factor, labels, length_factor, scaled_block
from ingest.plugin import Converter, Reject, read_head
from shards.format.frames import FrameStack
from shards.format.schema import NO_PBC, ZERO_CELL, AtomGraph, FileKeys

BLOCK_BYTES = 8 * 1024 ** 2
MAX_SMILES = 10_000
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


@dataclass(frozen=True)
class H5Layout:
    """Dataset names of one published layout (``{method}`` is filled from the options) and its units."""

    positions: str
    energy: str
    forces: str
    forces_are_gradient: bool
    energy_unit: str
    length_unit: str
    extra_energies: str  # suffix (or exact name) of per-conformation energies kept as properties, in eV


LAYOUTS: Mapping[str, H5Layout] = {
    # SPICE: conformations [C,N,3] bohr, dft_total_energy [C] Ha, dft_total_gradient [C,N,3] Ha/bohr
    "spice": H5Layout("conformations", "dft_total_energy", "dft_total_gradient", True, "Ha", "bohr",
                      "formation_energy"),
    # ANI-1x: coordinates [C,N,3] Å, <method>.energy [C] Ha, <method>.forces [C,N,3] Ha/Å
    "ani1x": H5Layout("coordinates", "{method}.energy", "{method}.forces", False, "Ha", "Å", ".energy"),
}


@dataclass(frozen=True)
class HDF5Options:
    """``layout``: auto (by content), spice or ani1x. ``method``: the ANI-1x level of theory whose energy
    and forces become the labels (other ``*.energy`` datasets become properties in eV). ``energy_unit`` /
    ``length_unit`` override the layout's source units. ``charge_from_smiles``: SPICE total charge from the
    formal charges of the group's SMILES (RDKit, unsanitised)."""

    layout: Literal["auto", "spice", "ani1x"] = "auto"
    method: str = "wb97x_dz"
    energy_unit: str | None = None
    length_unit: str | None = None
    charge_from_smiles: bool = True

    def __post_init__(self) -> None:
        check_units(self.energy_unit or "eV", self.length_unit or "Å")


def detect_layout(h5: Any) -> str | None:
    """The layout of an open file: the first group with ``atomic_numbers`` decides; None when neither."""
    import h5py

    for name in h5:
        if not _is_hard(h5, name):
            continue
        grp = h5[name]
        if not isinstance(grp, h5py.Group):
            continue
        keys = set(grp.keys())
        if "atomic_numbers" not in keys:
            continue
        for layout, lay in LAYOUTS.items():
            if lay.positions in keys:
                return layout
        return None
    return None


@dataclass(frozen=True)
class _Group:
    name: str
    start: int  # first record of the group
    count: int  # records of the group (1 for a group without readable conformations: its one reject)
    problem: str | None


class HDF5Converter(Converter):
    """SPICE / ANI-1x HDF5 files -> one ``molecule`` sample per conformation (eV, eV/Å, Å)."""

    name = "hdf5"
    domain = "molecule"
    suffixes = (".h5", ".hdf5", ".hdf")
    default_source = "hdf5"
    Options = HDF5Options

    suffix_gated = True

    def can_convert(self, path: Path) -> bool:
        return super().can_convert(path) and read_head(path, 8) == HDF5_MAGIC

    def count_records(self, path: Path, options: HDF5Options) -> int | None:
        import h5py

        with h5py.File(path, "r") as h5:
            layout = options.layout if options.layout != "auto" else detect_layout(h5)
            if layout is None:
                return None
            groups = self._groups(h5, LAYOUTS[layout])
        return groups[-1].start + groups[-1].count if groups else 0

    @staticmethod
    def _groups(h5: Any, lay: H5Layout, stop: int | None = None) -> list[_Group]:
        """Top-level groups with their first record and record count (shapes only, no data read), up to the
        group holding record ``stop - 1`` (all groups when ``stop`` is None). Links are not followed."""
        import h5py

        out: list[_Group] = []
        start = 0
        for name in h5:
            if stop is not None and start >= stop:
                break
            if not _is_hard(h5, name):
                out.append(_Group(name, start, 1, f"group {name!r} is a soft or external link, which is not followed"))
                start += 1
                continue
            grp = _child(h5, name)
            if not isinstance(grp, h5py.Group):
                continue
            shape = _dataset_shape(grp, lay.positions)
            if isinstance(shape, str):
                count, problem = 1, f"group {name!r}: {shape}"
            elif not shape:
                count, problem = 1, f"group {name!r} has no {lay.positions} dataset"
            else:
                count, problem = int(shape[0]), None
            out.append(_Group(name, start, count, problem))
            start += count
        return out

    def convert(self, path: Path, options: HDF5Options, *, source: str, file_id: str,
                records: range | None = None) -> Iterator[AtomGraph | Reject]:
        import h5py

        with h5py.File(path, "r") as h5:
            layout = options.layout if options.layout != "auto" else detect_layout(h5)
            if layout is None:
                yield self.reject(file_id, None, f"{file_id}: HDF5 layout is neither SPICE (groups with "
                                  "atomic_numbers, conformations) nor ANI-1x (groups with atomic_numbers, "
                                  "coordinates)")
                return
            lay = LAYOUTS[layout]
            groups = self._groups(h5, lay, None if records is None else records.stop)
            n = groups[-1].start + groups[-1].count if groups else 0  # >= records.stop unless the file ends
            inside, beyond = clip(records, n)
            if inside:
                for g in groups:
                    lo, hi = max(inside.start, g.start), min(inside.stop, g.start + g.count)
                    if lo < hi:
                        yield from self._group(_child(h5, g.name), g, lo, hi, lay, layout, options, source, file_id)
        for r in beyond:
            yield self.reject(file_id, r, "conformation beyond the end of the file")

    def _group(self, grp: Any, g: _Group, lo: int, hi: int, lay: H5Layout, layout: str, options: HDF5Options,
               source: str, file_id: str) -> Iterator[AtomGraph | Reject]:
        """Records ``[lo, hi)`` of one group, read in slices of at most ``BLOCK_BYTES``."""
        names = _names(lay, options)
        ds, problem = _datasets(grp, g, lay, names) if g.problem is None else ({}, g.problem)
        z = None
        if problem is None:
            try:
                z = elements(ds["atomic_numbers"][()]) if "atomic_numbers" in ds else None
                problem = None if z is not None else f"group {g.name!r} has no atomic_numbers"
            except ValueError as exc:
                problem = f"group {g.name!r}: {exc}"
        if z is not None and problem is None:
            problem = _shape_problem(ds, g, names, z.shape[0])
        if problem is not None or z is None:
            for r in range(lo, hi):
                yield self.reject(file_id, r, problem or "unreadable group")
            return
        e_f = energy_factor(options.energy_unit or lay.energy_unit)
        l_f = length_factor(options.length_unit or lay.length_unit)
        f_f = (-1.0 if lay.forces_are_gradient else 1.0) * e_f / l_f
        extras = _extra_energies(ds, lay, names, g.count)
        charge = _spice_charge(ds) if layout == "spice" and options.charge_from_smiles else None
        read = {k: ds[v] for k, v in names.items() if v in ds} | {k: ds[k] for k in extras}
        row_bytes = sum(8 * math.prod(d.shape[1:]) for d in read.values())  # as float64, the widest label dtype
        step = max(1, BLOCK_BYTES // max(1, row_bytes))
        common = {"domain": "molecule", "source": source, "source_file": file_id, "atomic_numbers": z,
                  "cell": ZERO_CELL, "pbc": NO_PBC, "charge": charge, "trajectory_id": g.name}
        keys = FileKeys(source, file_id)
        for a in range(lo, hi, step):
            b = min(a + step, hi)
            s = slice(a - g.start, b - g.start)
            forces = scaled_block(read["forces"][s], f_f) if "forces" in read else None
            extra = {k: labels(read[k][s], e_f) for k in extras}
            frames = FrameStack(common, scaled_block(read["positions"][s], l_f), forces,
                                energy=labels(read["energy"][s], e_f) if "energy" in read else None,
                                properties=extra, property_units=dict.fromkeys(extra, "eV"))
            # ANI-1x: forces all NaN where a method was not computed: no forces label
            has_forces = [False] * (b - a) if forces is None else (~np.isnan(forces).all(axis=(1, 2))).tolist()
            yield from frames.graphs(keys, a, lambda r, exc: self.refusal(file_id, r, exc),
                                     with_forces=has_forces)


def _names(lay: H5Layout, options: HDF5Options) -> dict[str, str]:
    return {"positions": lay.positions, "energy": lay.energy.format(method=options.method),
            "forces": lay.forces.format(method=options.method)}


def _datasets(grp: Any, g: _Group, lay: H5Layout, names: dict[str, str]) -> tuple[dict[str, Any], str | None]:
    """The group's datasets this layout reads, each opened once; a link, or data stored outside the file, in
    one of them is a problem of the group."""
    import h5py

    out: dict[str, Any] = {}
    wanted = {"atomic_numbers", "smiles", *names.values()}
    for k in grp:
        if k not in wanted and not _is_extra(k, lay):
            continue
        if not _is_hard(grp, k):
            return {}, f"group {g.name!r}: {k} is a soft or external link, which is not followed"
        ds = _child(grp, k)
        if isinstance(ds, h5py.Dataset):
            if ds.is_virtual or ds.external:
                return {}, f"group {g.name!r}: {k} is stored outside the file, which is not read"
            out[k] = ds
    return out, None


def _is_hard(grp: Any, name: str) -> bool:
    """Whether ``name`` in an open group is a hard link (h5py's ``get(name, getlink=True)`` is a ``HardLink``)."""
    from h5py import h5l

    return bool(grp.id.links.get_info(name.encode("utf-8", "surrogateescape")).type == h5l.TYPE_HARD)


def _child(grp: Any, name: str) -> Any:
    """The group or dataset behind the hard link ``name`` of a group of a read-only file, as ``grp[name]`` gives
    it, without the ``File`` object h5py builds on every access to ask for the file's mode; None for a named
    datatype."""
    import h5py
    from h5py import h5i, h5o

    oid = h5o.open(grp.id, name.encode("utf-8", "surrogateescape"))
    kind = h5i.get_type(oid)
    if kind == h5i.GROUP:
        return h5py.Group(oid)
    return h5py.Dataset(oid, readonly=True) if kind == h5i.DATASET else None


def _dataset_shape(grp: Any, name: str) -> tuple[int, ...] | str | None:
    """The shape of the dataset behind the hard link ``name`` of a group (the low-level handle only: no data read,
    no ``Dataset`` object); None when there is no such dataset; the problem when the link is soft or external
    (never followed)."""
    from h5py import h5i, h5o

    raw = name.encode("utf-8", "surrogateescape")
    if not grp.id.links.exists(raw):
        return None
    if not _is_hard(grp, name):
        return f"{name} is a soft or external link, which is not followed"
    oid = h5o.open(grp.id, raw)
    return tuple(oid.shape) if h5i.get_type(oid) == h5i.DATASET else None


def _shape_problem(ds: dict[str, Any], g: _Group, names: dict[str, str], n: int) -> str | None:
    """A shape mismatch of the group's datasets, as the reason every conformation of it is rejected."""
    pos = ds[names["positions"]]
    if pos.shape != (g.count, n, 3):
        return f"group {g.name!r}: {names['positions']} {pos.shape} does not match {n} atomic numbers"
    energy, forces = ds.get(names["energy"]), ds.get(names["forces"])
    if energy is not None and energy.shape not in ((g.count,), (g.count, 1)):
        return f"group {g.name!r}: {names['energy']} {energy.shape} does not match {g.count} conformations"
    if forces is not None and forces.shape != (g.count, n, 3):
        return f"group {g.name!r}: {names['forces']} {forces.shape} does not match {pos.shape}"
    return None


def _extra_energies(ds: dict[str, Any], lay: H5Layout, names: dict[str, str], count: int) -> tuple[str, ...]:
    """Per-conformation energy datasets other than the label, kept as properties (converted to eV)."""
    return tuple(k for k, d in ds.items() if k != names["energy"] and _is_extra(k, lay)
                 and d.shape == (count,) and d.dtype.kind == "f")


def _is_extra(name: str, lay: H5Layout) -> bool:
    suffix = lay.extra_energies
    return name == suffix or (suffix.startswith(".") and name.endswith(suffix))


def _spice_charge(ds: dict[str, Any]) -> int | None:
    """Total charge from the formal charges of the group's SMILES; None when there is none or it does not parse."""
    from rdkit import Chem, rdBase

    if "smiles" not in ds:
        return None
    raw = ds["smiles"][()]
    raw = raw.reshape(-1)[0] if isinstance(raw, np.ndarray) and raw.size else raw
    smiles = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    if not smiles or len(smiles) > MAX_SMILES:
        return None
    quiet = rdBase.BlockLogs()
    mol = Chem.MolFromSmiles(smiles, sanitize=False)
    del quiet
    return None if mol is None else sum(a.GetFormalCharge() for a in mol.GetAtoms())
