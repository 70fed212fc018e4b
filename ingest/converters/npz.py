"""NumPy ``.npz`` MD trajectories in the rMD17 and original MD17 (sGDML) layouts, read member by member.

Every array is read with its ``.npy`` header parsed by ``numpy.lib.format`` (object arrays refused, so
nothing is ever unpickled). Uncompressed members are memory-mapped; compressed members are streamed
forward. A unit holds at most one block of frames (``BLOCK_BYTES`` per array) in memory.
"""
from __future__ import annotations

import struct
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import numpy as np

from ingest.converters.units import check_units, clip, elements, energy_factor, labels, length_factor, scaled_block
from ingest.plugin import Converter, Reject, owned
from shards.format.frames import FrameStack
from shards.format.schema import NO_PBC, ZERO_CELL, AtomGraph, FileKeys

BLOCK_BYTES = 8 * 1024 ** 2
MAX_SMALL_MEMBER = 64 * 1024 ** 2  # whole-read members (atomic numbers, lattice, Fortran-ordered arrays)
_ALL_PBC = np.ones(3, dtype=bool)
_ALL_PBC.flags.writeable = False


@dataclass(frozen=True)
class NPZLayout:
    """Member names of one published layout and its units."""

    numbers: str
    positions: str
    energy: str
    forces: str
    energy_unit: str
    length_unit: str
    lattice: str | None = None
    index_property: tuple[str, str] | None = None  # (member, property) of a per-frame provenance index


LAYOUTS: Mapping[str, NPZLayout] = {
    # revised MD17 (Christensen & von Lilienfeld 2020): energies [T], forces [T,N,3] in kcal/mol(/Å)
    "rmd17": NPZLayout("nuclear_charges", "coords", "energies", "forces", "kcal/mol", "Å",
                       index_property=("old_indices", "md17_index")),
    # original MD17 / sGDML: z [N], R [T,N,3] Å, E [T,1] kcal/mol, F [T,N,3] kcal/mol/Å, optional lattice
    "md17": NPZLayout("z", "R", "E", "F", "kcal/mol", "Å", lattice="lattice"),
}


@dataclass(frozen=True)
class NPZOptions:
    """``layout``: auto (by member names), rmd17 or md17. ``energy_unit`` / ``length_unit`` override the
    layout's source units (forces are energy/length). ``trajectory_id`` defaults to the file stem."""

    layout: Literal["auto", "rmd17", "md17"] = "auto"
    energy_unit: str | None = None
    length_unit: str | None = None
    trajectory_id: str | None = None

    def __post_init__(self) -> None:
        check_units(self.energy_unit or "eV", self.length_unit or "Å")


class NpyMember:
    """One ``.npy`` member of an open ``.npz``: its header, and rows read on demand."""

    def __init__(self, path: Path, zf: zipfile.ZipFile, name: str) -> None:
        info = zf.getinfo(name + ".npy")
        if info.flag_bits & 0x1:
            raise ValueError(f"member {name!r} is encrypted")
        self.name, self._zf, self._info, self._path = name, zf, info, path
        self._stream: IO[bytes] | None = None
        with zf.open(info) as fh:
            self.shape, self.dtype, fortran = _header(fh, name)
            self._data_start = fh.tell()
        self.row_bytes = int(self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64)))
        self._mapped: np.ndarray | None = None
        self._whole: np.ndarray | None = None
        if fortran or not self.shape:
            self._whole = self._read_whole()
        elif info.compress_type == zipfile.ZIP_STORED:
            self._mapped = np.memmap(path, dtype=self.dtype, mode="r", shape=self.shape,
                                     offset=_local_data_offset(path, info) + self._data_start)

    def _read_whole(self) -> np.ndarray:
        nbytes = self.dtype.itemsize * int(np.prod(self.shape, dtype=np.int64))
        if nbytes > MAX_SMALL_MEMBER:
            raise ValueError(f"member {self.name!r}: {nbytes} bytes in Fortran order cannot be read lazily")
        with self._zf.open(self._info) as fh:
            _, _, fortran = _header(fh, self.name)
            return _read_exact(fh, self.dtype, self.shape, fortran=fortran)

    def all(self) -> np.ndarray:
        """The whole member (only for small members: atomic numbers, a lattice)."""
        return self.rows(0, self.shape[0]) if self.shape else np.asarray(self._whole)

    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows ``[a, b)`` as an array of shape ``(b - a, *shape[1:])``."""
        if self._whole is not None:
            return self._whole[a:b]
        if self._mapped is not None:
            return np.asarray(self._mapped[a:b])
        if self._stream is None or self._stream.tell() > self._data_start + a * self.row_bytes:
            if self._stream is not None:
                self._stream.close()
            self._stream = self._zf.open(self._info)
        self._stream.seek(self._data_start + a * self.row_bytes)  # forward: decompresses, keeps nothing
        return _read_exact(self._stream, self.dtype, (b - a, *self.shape[1:]))

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._mapped = None


def _header(fh: IO[bytes], name: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    fmt = np.lib.format
    version = fmt.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(fh)
    else:
        raise ValueError(f"member {name!r}: .npy format version {version} is not supported")
    if dtype.hasobject:
        raise ValueError(f"member {name!r} holds Python objects (pickled); refused, never unpickled")
    return tuple(int(s) for s in shape), dtype, bool(fortran)


def _read_exact(fh: IO[bytes], dtype: np.dtype, shape: tuple[int, ...], fortran: bool = False) -> np.ndarray:
    n = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    buf = fh.read(n)
    if len(buf) != n:
        raise ValueError(f"truncated array: {len(buf)} of {n} bytes")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def _local_data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Absolute offset of a stored member's data (after its local file header) in the zip file."""
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        head = fh.read(30)
    sig, *_, n_name, n_extra = struct.unpack("<IHHHHHIIIHH", head)
    if sig != 0x04034B50:
        raise ValueError(f"member {info.filename!r}: bad local zip header")
    return int(info.header_offset + 30 + n_name + n_extra)


def detect_layout(members: set[str]) -> str | None:
    """The first layout whose atomic-number and position members are all present."""
    for name, lay in LAYOUTS.items():
        if {lay.numbers + ".npy", lay.positions + ".npy"} <= members:
            return name
    return None


class NPZConverter(Converter):
    """rMD17 / MD17 ``.npz`` trajectories -> one ``md`` sample per frame, labels converted to eV and eV/Å."""

    name = "npz"
    domain = "md"
    suffixes = (".npz",)
    default_source = "md17"
    Options = NPZOptions

    def _layout(self, zf: zipfile.ZipFile, options: NPZOptions) -> str | None:
        members = set(zf.namelist())
        if options.layout != "auto":
            lay = LAYOUTS[options.layout]
            return options.layout if {lay.numbers + ".npy", lay.positions + ".npy"} <= members else None
        return detect_layout(members)

    def count_records(self, path: Path, options: NPZOptions) -> int | None:
        with zipfile.ZipFile(path) as zf:
            layout = self._layout(zf, options)
            if layout is None:
                return None
            with zf.open(LAYOUTS[layout].positions + ".npy") as fh:
                shape, _, _ = _header(fh, LAYOUTS[layout].positions)
        return shape[0] if shape else 0

    def convert(self, path: Path, options: NPZOptions, *, source: str, file_id: str,
                records: range | None = None) -> Iterator[AtomGraph | Reject]:
        with zipfile.ZipFile(path) as zf:
            layout = self._layout(zf, options)
            if layout is None:
                names = sorted(n.removesuffix(".npy") for n in zf.namelist())[:20]
                want = " or ".join(f"{k} ({v.numbers}, {v.positions})" for k, v in LAYOUTS.items())
                yield self.reject(file_id, None, f"{file_id}: npz layout is neither {want}; members: {names}")
                return
            lay = LAYOUTS[layout]
            members = {n.removesuffix(".npy") for n in zf.namelist()}
            opened = {m: NpyMember(path, zf, m) for m in (lay.positions, lay.energy, lay.forces, lay.numbers,
                                                           lay.lattice, (lay.index_property or ("",))[0])
                      if m and m in members}
            try:
                yield from self._frames(opened, lay, options, source, file_id, records)
            finally:
                for m in opened.values():
                    m.close()

    def _frames(self, m: dict[str, NpyMember], lay: NPZLayout, options: NPZOptions, source: str, file_id: str,
                records: range | None) -> Iterator[AtomGraph | Reject]:
        pos = m[lay.positions]
        n_frames = pos.shape[0] if pos.shape else 0
        inside, beyond = clip(records, n_frames)
        e_f = energy_factor(options.energy_unit or lay.energy_unit)
        l_f = length_factor(options.length_unit or lay.length_unit)
        z_raw = m[lay.numbers].all()
        problem = _file_problem(m, lay, z_raw, n_frames)
        try:
            z = elements(z_raw)
        except ValueError as exc:
            problem = problem or str(exc)
        if problem:
            for r in inside:
                yield self.reject(file_id, r, problem)
        else:
            cell, pbc = _lattice(m.get(lay.lattice or ""), l_f)
            traj = options.trajectory_id or Path(file_id).stem
            idx_member = m.get(lay.index_property[0]) if lay.index_property else None
            step = max(1, BLOCK_BYTES // max(1, pos.row_bytes + (m[lay.forces].row_bytes if lay.forces in m else 0)))
            common = {"domain": "md", "source": source, "source_file": file_id, "atomic_numbers": z, "cell": cell,
                      "pbc": pbc, "trajectory_id": traj}
            keys = FileKeys(source, file_id)
            for a in range(inside.start, inside.stop, step):
                b = min(a + step, inside.stop)
                props = None if idx_member is None or lay.index_property is None else \
                    {lay.index_property[1]: np.asarray(idx_member.rows(a, b), dtype=np.float64).reshape(-1).tolist()}
                frames = FrameStack(common, scaled_block(pos.rows(a, b), l_f),
                                    scaled_block(m[lay.forces].rows(a, b), e_f / l_f) if lay.forces in m else None,
                                    energy=labels(m[lay.energy].rows(a, b), e_f) if lay.energy in m else None,
                                    properties=props,
                                    property_units=None if props is None else dict.fromkeys(props, "-"))
                yield from frames.graphs(keys, a,
                                         lambda r, exc: self.refusal(file_id, r, exc))
        for r in beyond:
            yield self.reject(file_id, r, "frame beyond the end of the trajectory")


def _file_problem(m: dict[str, NpyMember], lay: NPZLayout, z: np.ndarray, n_frames: int) -> str | None:
    """A shape mismatch that makes every frame unusable, as the reason of each frame's reject."""
    n = z.shape[0] if z.ndim == 1 else -1
    pos = m[lay.positions]
    if len(pos.shape) != 3 or pos.shape[1:] != (n, 3):
        return f"{lay.positions} has shape {pos.shape}, expected (frames, {n}, 3) for {lay.numbers} {z.shape}"
    for name, tail in ((lay.energy, ((), (1,))), (lay.forces, ((n, 3),))):
        if name in m and (m[name].shape[:1] != (n_frames,) or m[name].shape[1:] not in tail):
            return f"{name} has shape {m[name].shape}, which does not match {lay.positions} {pos.shape}"
    return None


def _lattice(member: NpyMember | None, l_f: float) -> tuple[np.ndarray, np.ndarray]:
    if member is None:
        return ZERO_CELL, NO_PBC
    lat = np.asarray(member.all(), dtype=np.float64)
    if lat.shape != (3, 3):
        raise ValueError(f"lattice has shape {lat.shape}, expected (3, 3)")
    return owned(lat * l_f, np.float64), _ALL_PBC
