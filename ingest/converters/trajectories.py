"""MD trajectory converters, streamed frame by frame: MDAnalysis (DCD, XTC, TRR, NetCDF + topology),
ASE ``.traj``, and zarr trajectory stores. Record r is the r-th selected frame (frame = r * stride)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ingest.converters.molecules import xyz_frame_atoms, xyz_frame_count, xyz_records
from ingest.plugin import Converter, Reject, open_input, owned
from shards.format.schema import NO_PBC, ZERO_CELL, AtomGraph, make_key

KJ_MOL_TO_EV = 0.010364269656262174
TOPOLOGY_SUFFIXES = (".psf", ".tpr", ".gro", ".prmtop", ".parm7", ".pdb", ".top")


@dataclass(frozen=True)
class TrajectoryOptions:
    """Frame ``stride``, ``max_frames`` per trajectory, an MDAnalysis atom ``select``ion (e.g.
    ``not resname SOL``), the ``topology`` file (relative to the trajectory's folder; default: a file
    with the same stem and a topology suffix), and the ``trajectory_id`` (default: the file stem).
    ``drop_virtual`` removes massless virtual sites (e.g. TIP4P dummies), which are not atoms.
    ``timestep`` (ps between stored frames) gives ``frame_time`` when the file stores no times.
    Every sample records its frame index in the file as ``properties["frame"]``."""

    stride: int = 1
    max_frames: int | None = None
    select: str = "all"
    topology: str | None = None
    trajectory_id: str | None = None
    drop_virtual: bool = True
    timestep: float | None = None

    def __post_init__(self) -> None:
        if self.stride < 1 or (self.max_frames is not None and self.max_frames < 1):
            raise ValueError("stride and max_frames must be >= 1")


def frame_count(n_frames: int, options: TrajectoryOptions) -> int:
    n = len(range(0, n_frames, options.stride))
    return n if options.max_frames is None else min(n, options.max_frames)


def frame_time(stored: float | None, frame: int, options: TrajectoryOptions) -> float | None:
    """The stored time of a frame (ps), else ``frame * timestep``, else None."""
    if stored is not None:
        return float(stored)
    return None if options.timestep is None else frame * options.timestep


FRAME_UNITS = {"frame": "-"}
_ALL_PBC = np.ones(3, dtype=bool)
_ALL_PBC.flags.writeable = False


def _cell(dimensions: Any) -> tuple[np.ndarray, np.ndarray]:
    from MDAnalysis.lib.mdamath import triclinic_vectors

    if dimensions is None or not np.all(np.asarray(dimensions[:3]) > 0):
        return ZERO_CELL, NO_PBC
    return owned(triclinic_vectors(dimensions), np.float64), _ALL_PBC


class MDAnalysisConverter(Converter):
    """DCD, XTC, TRR and AMBER NetCDF trajectories with their topology (MDAnalysis)."""

    name = "mdanalysis"
    domain = "md"
    suffixes = (".dcd", ".xtc", ".trr", ".nc", ".ncdf")
    default_source = "md"
    Options = TrajectoryOptions

    def _topology(self, path: Path, options: TrajectoryOptions) -> Path:
        if options.topology:
            top = Path(options.topology)
            return top if top.is_absolute() else path.parent / top
        for suffix in TOPOLOGY_SUFFIXES:
            cand = path.with_suffix(suffix)
            if cand.is_file():
                return cand
        raise FileNotFoundError(f"no topology for {path.name}: set the option topology: FILE")

    def _universe(self, path: Path, options: TrajectoryOptions) -> Any:
        import warnings

        import MDAnalysis as mda

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return mda.Universe(str(self._topology(path, options)), str(path))

    def count_records(self, path: Path, options: TrajectoryOptions) -> int | None:
        return frame_count(self._universe(path, options).trajectory.n_frames, options)

    def convert(self, path: Path, options: TrajectoryOptions, *, source: str, file_id: str,
                records: range | None = None) -> Iterator[AtomGraph | Reject]:
        try:
            u = self._universe(path, options)
        except Exception as exc:  # noqa: BLE001 - a topology that does not match is one reject for the file
            yield self.reject(file_id, None, f"cannot open trajectory with its topology: {type(exc).__name__}: {exc}")
            return
        atoms = u.select_atoms(options.select)
        if options.drop_virtual and hasattr(atoms, "masses"):
            atoms = atoms[np.asarray(atoms.masses) > 0.5]
        if atoms.n_atoms == 0:
            yield self.reject(file_id, None, f"selection {options.select!r} matches no atoms")
            return
        z = self._elements(atoms)
        meta = {"residue_index": owned(atoms.resindices, np.int32),
                "atom_name": owned([n[:4] for n in atoms.names], "S4"),
                "residue_name": owned([n[:4] for n in atoms.resnames], "S4")}
        traj_id = options.trajectory_id or Path(file_id).stem
        n = frame_count(u.trajectory.n_frames, options)
        wanted = records if records is not None else range(n)
        inside = wanted[:max(0, len(range(wanted.start, min(wanted.stop, n), wanted.step)))]
        if inside:
            stride = options.stride
            frames = u.trajectory[inside.start * stride:inside[-1] * stride + 1:inside.step * stride]  # sequential
            for r, ts in zip(inside, frames, strict=True):
                f = r * stride
                yield self.build(file_id, r, lambda ts=ts, r=r, f=f: self._graph(ts, atoms, z, meta, r, f, traj_id,
                                                                                 source, file_id))
        for r in wanted[len(inside):]:
            yield self.reject(file_id, r, "frame beyond the end of the trajectory")

    @staticmethod
    def _elements(atoms: Any) -> np.ndarray:
        from ase.data import atomic_numbers
        from MDAnalysis.guesser.default_guesser import DefaultGuesser

        if hasattr(atoms, "elements") and all(e.strip() for e in atoms.elements):
            symbols = [e.strip().capitalize() for e in atoms.elements]
        else:
            guesser = DefaultGuesser(None)
            names, inverse = np.unique(np.asarray(atoms.names, dtype=object).astype(str), return_inverse=True)
            guessed = [guesser.guess_atom_element(name).capitalize() for name in names]
            symbols = [guessed[k] for k in inverse.ravel()]
        bad = sorted({s for s in symbols if s not in atomic_numbers or s == "X"})
        if bad:
            raise ValueError(f"unknown element symbols {bad[:5]}")
        return owned([atomic_numbers[s] for s in symbols], np.uint8)

    @staticmethod
    def _graph(ts: Any, atoms: Any, z: np.ndarray, meta: dict[str, Any], r: int, f: int, traj_id: str,
               source: str, file_id: str) -> AtomGraph:
        cell, pbc = _cell(ts.dimensions)
        forces = None
        if ts.has_forces:
            forces = owned(np.multiply(atoms.forces, np.float32(KJ_MOL_TO_EV), dtype=np.float32), np.float32)
        return AtomGraph(key=make_key(source, file_id, r), domain="md", source=source, source_file=file_id, index=r,
                         atomic_numbers=z, positions=owned(atoms.positions, np.float32), cell=cell,
                         pbc=pbc, forces=forces, trajectory_id=traj_id, frame_time=float(ts.time),
                         properties={"frame": float(f)}, property_units=FRAME_UNITS, **meta)


class ASETrajConverter(Converter):
    """ASE ``.traj`` files and, when named explicitly, multi-frame extended XYZ trajectories, frame by
    frame; energies and forces from the stored calculator results."""

    name = "ase_traj"
    domain = "md"
    suffixes = (".traj",)
    default_source = "ase"
    Options = TrajectoryOptions

    def count_records(self, path: Path, options: TrajectoryOptions) -> int | None:
        from ase.io.trajectory import Trajectory

        if not _is_traj(path):
            return frame_count(xyz_frame_count(path), options)
        with Trajectory(str(path)) as traj:
            return frame_count(len(traj), options)

    def convert(self, path: Path, options: TrajectoryOptions, *, source: str, file_id: str,
                records: range | None = None) -> Iterator[AtomGraph | Reject]:
        traj_id = options.trajectory_id or Path(file_id).stem
        wanted = records if records is not None else range(options.max_frames or (1 << 62))
        if options.max_frames is not None:
            wanted_in = wanted[:max(0, len(range(wanted.start, min(wanted.stop, options.max_frames), wanted.step)))]
        else:
            wanted_in = wanted
        last = -1
        for r, atoms in self._frames(path, options, wanted_in):
            last, f = r, r * options.stride
            if isinstance(atoms, str):  # an XYZ stretch that is no frame
                yield self.reject(file_id, r, atoms)
                continue
            yield self.build(file_id, r, lambda a=atoms, r=r, f=f: _graph(
                xyz_frame_atoms(a) if isinstance(a, list) else a, key=make_key(source, file_id, r),
                source=source, file_id=file_id, index=r, traj_id=traj_id, frame=f, options=options))
        if records is not None:
            for r in records:
                if r > last:
                    yield self.reject(file_id, r, "frame beyond the end of the trajectory")

    @staticmethod
    def _frames(path: Path, options: TrajectoryOptions, wanted: range) -> Iterator[tuple[int, Any]]:
        """(record, Atoms) for the records of ``wanted`` that exist, one frame in memory at a time; for XYZ files
        (record, the frame's lines) or (record, why the stretch is no frame)."""
        from ase.io.trajectory import Trajectory

        if not wanted:
            return
        stride = options.stride
        if _is_traj(path):
            with Trajectory(str(path)) as traj:
                n = frame_count(len(traj), options)
                for r in wanted:
                    if r >= n:
                        return
                    yield r, traj[r * stride]
            return
        with open_input(path) as fh:
            for k, (lines, why) in enumerate(xyz_records(fh)):
                r, off = divmod(k, stride)
                if r >= wanted.stop:
                    return
                if not off and r in wanted:
                    yield r, why if lines is None else lines


def _graph(atoms: Any, *, key: str, source: str, file_id: str, index: int, traj_id: str, frame: int,
           options: TrajectoryOptions) -> AtomGraph:
    return AtomGraph.from_ase(atoms, key=key, domain="md", source=source, source_file=file_id, index=index,
                              trajectory_id=traj_id, frame_time=frame_time(atoms.info.get("time"), frame, options),
                              properties={"frame": float(frame)}, property_units=FRAME_UNITS)


def _is_traj(path: Path) -> bool:
    return path.name.lower().endswith(".traj")


class ZarrTrajConverter(Converter):
    """zarr trajectory stores: positions [T,N,3], atomic_numbers [N], optional cell [T,3,3], energy [T],
    forces [T,N,3], time [T] (Å, eV, eV/Å, ps). Frames are read one at a time."""

    name = "zarr_traj"
    domain = "md"
    suffixes = (".zarr",)
    default_source = "zarr"
    Options = TrajectoryOptions

    def count_records(self, path: Path, options: TrajectoryOptions) -> int | None:
        import zarr

        return frame_count(zarr.open_group(str(path), mode="r")["positions"].shape[0], options)

    def convert(self, path: Path, options: TrajectoryOptions, *, source: str, file_id: str,
                records: range | None = None) -> Iterator[AtomGraph | Reject]:
        import zarr

        g = zarr.open_group(str(path), mode="r")
        pos, z = g["positions"], np.asarray(g["atomic_numbers"][:])
        if pos.ndim != 3 or pos.shape[1:] != (z.shape[0], 3):
            yield self.reject(file_id, None, f"positions {pos.shape} do not match {z.shape[0]} atomic numbers")
            return
        names = set(g.array_keys())
        traj_id = options.trajectory_id or Path(file_id).stem
        n = frame_count(pos.shape[0], options)
        for r in records if records is not None else range(n):
            if r >= n:
                yield self.reject(file_id, r, "frame beyond the end of the trajectory")
                continue
            f = r * options.stride

            def make(f: int = f, r: int = r) -> AtomGraph:
                cell = np.asarray(g["cell"][f]) if "cell" in names else np.zeros((3, 3))
                return AtomGraph(key=make_key(source, file_id, r), domain="md", source=source, source_file=file_id,
                                 index=r, atomic_numbers=z, positions=np.asarray(pos[f]), cell=cell,
                                 pbc=np.full(3, bool(np.any(cell))),
                                 energy=float(g["energy"][f]) if "energy" in names else None,
                                 forces=np.asarray(g["forces"][f]) if "forces" in names else None,
                                 trajectory_id=traj_id, properties={"frame": float(f)},
                                 property_units=FRAME_UNITS,
                                 frame_time=frame_time(g["time"][f] if "time" in names else None, f, options))

            yield self.build(file_id, r, make)


def write_zarr_trajectory(path: str | Path, positions: np.ndarray, atomic_numbers: np.ndarray,
                          cell: np.ndarray | None = None, energy: np.ndarray | None = None,
                          forces: np.ndarray | None = None, time: np.ndarray | None = None) -> Path:
    """Write a zarr trajectory store that :class:`ZarrTrajConverter` reads (chunked by frame)."""
    import zarr

    g = zarr.open_group(str(path), mode="w")
    t, n = positions.shape[:2]
    g.create_array("positions", data=np.asarray(positions, np.float32), chunks=(1, n, 3))
    g.create_array("atomic_numbers", data=np.asarray(atomic_numbers, np.int32))
    for name, arr, chunks in (("cell", cell, (1, 3, 3)), ("energy", energy, (t,)), ("forces", forces, (1, n, 3)),
                              ("time", time, (t,))):
        if arr is not None:
            g.create_array(name, data=np.asarray(arr, np.float64 if name != "forces" else np.float32),
                           chunks=chunks)
    return Path(path)
