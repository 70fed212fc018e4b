"""MD converters: MDAnalysis (DCD, GRO+XTC, TPR+TRR forces, AMBER NetCDF), ASE .traj (EMT), zarr stores."""
from __future__ import annotations

import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest

from ingest.converters.trajectories import write_zarr_trajectory
from ingest.registry import get_converter
from shards.format.schema import AtomGraph
from tests.convhelp import convert

EV_PER_KJ_MOL = 0.0103642697  # written out here, not imported from the converter under test


@pytest.fixture(scope="module")
def d():
    import MDAnalysisTests.datafiles as datafiles

    return datafiles


def _universe(top: str, traj: str):
    import MDAnalysis as mda

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mda.Universe(top, traj)


def test_dcd_with_psf_stride_and_max_frames(d) -> None:
    opts = {"topology": d.PSF, "stride": 10, "max_frames": 5, "trajectory_id": "adk"}
    conv = get_converter("mdanalysis")()
    assert conv.count_records(Path(d.DCD), conv.parse_options(opts)) == 5
    graphs, rejects = convert("mdanalysis", d.DCD, opts)
    u = _universe(d.PSF, d.DCD)
    assert not rejects and len(graphs) == 5 and u.trajectory.n_frames == 98
    assert [g.properties["frame"] for g in graphs] == [0, 10, 20, 30, 40]
    u.trajectory[20]
    np.testing.assert_allclose(graphs[2].positions, u.atoms.positions, atol=1e-4)
    assert graphs[2].frame_time == pytest.approx(u.trajectory.time) and graphs[0].trajectory_id == "adk"
    assert all(g.n_atoms == 3341 and g.domain == "md" for g in graphs)
    _, beyond = convert("mdanalysis", d.DCD, opts, records=range(4, 7))
    assert [r.record for r in beyond] == [5, 6]


def test_gro_xtc_box_select_and_lazy_frames(d) -> None:
    u = _universe(d.GRO, d.XTC)
    assert u.atoms.n_atoms == 47681 and u.trajectory.n_frames == 10
    virtual = int((u.atoms.masses < 0.5).sum())  # TIP4P dummy sites
    graphs, rejects = convert("mdanalysis", d.XTC, {"topology": d.GRO}, records=range(0, 2))
    assert not rejects and len(graphs) == 2
    assert graphs[0].n_atoms == 47681 - virtual
    assert graphs[1].pbc.all()  # triclinic (dodecahedron) box: row lengths are a, b, c
    np.testing.assert_allclose(np.linalg.norm(graphs[1].cell, axis=1), u.trajectory[1].dimensions[:3], rtol=1e-5)
    assert graphs[1].frame_time == pytest.approx(u.trajectory[1].time)
    (whole,), _ = convert("mdanalysis", d.XTC, {"topology": d.GRO, "drop_virtual": False, "select": "protein"},
                          records=range(1, 2))
    assert whole.n_atoms == u.select_atoms("protein").n_atoms == 3341 and whole.index == 1


def test_xtc_frames_stream_in_flat_memory(d) -> None:
    """Streaming the 10 frames of the 47k-atom box: after the first frame, memory traced by tracemalloc
    does not accumulate (holding the samples would add ~0.44 MB per frame) and peaks under two raw frames
    (the frame being read and the sample made from it), not ten."""
    from ingest.plugin import safe_convert

    warnings.simplefilter("ignore")
    u = _universe(d.GRO, d.XTC)
    frame_bytes = u.atoms.n_atoms * 3 * 4  # one raw float32 frame, virtual sites included
    conv = get_converter("mdanalysis")()
    stream = safe_convert(conv, Path(d.XTC), conv.parse_options({"topology": d.GRO}), source="s", file_id="f")
    current: list[int] = []
    tracemalloc.start()
    try:
        for item in stream:
            assert isinstance(item, AtomGraph), item
            del item
            current.append(tracemalloc.get_traced_memory()[0])
            if len(current) == 1:
                tracemalloc.reset_peak()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(current) == 10
    assert max(current) - current[0] < frame_bytes // 4, (current, frame_bytes)
    assert peak - current[0] < 2 * frame_bytes, (peak, current[0], frame_bytes)


def test_xtc_reader_is_lazy(d, monkeypatch) -> None:
    from MDAnalysis.coordinates.XTC import XTCReader

    reads: list[int] = []
    orig = XTCReader._read_frame

    def spy(self, frame):
        reads.append(frame)
        return orig(self, frame)

    monkeypatch.setattr(XTCReader, "_read_frame", spy)
    convert("mdanalysis", d.XTC, {"topology": d.GRO}, records=range(0, 2))
    assert reads and set(reads) <= {0, 1}


def test_trr_forces_in_ev_per_angstrom(d) -> None:
    graphs, rejects = convert("mdanalysis", d.TRR_xvf, {"topology": d.TPR_xvf}, records=range(0, 2))
    u = _universe(d.TPR_xvf, d.TRR_xvf)
    atoms = u.atoms[u.atoms.masses > 0.5]
    assert not rejects and graphs[0].forces is not None and graphs[0].n_atoms == atoms.n_atoms
    np.testing.assert_allclose(graphs[0].forces, atoms.forces * EV_PER_KJ_MOL, rtol=1e-5, atol=1e-6)
    assert np.abs(graphs[0].forces).max() > 0


def test_amber_netcdf_and_mismatched_topology(d) -> None:
    graphs, rejects = convert("mdanalysis", d.NCDF, records=range(0, 3))  # bala.prmtop found by stem
    assert not rejects and graphs[0].n_atoms == 2661 and graphs[0].pbc.all()
    bad, (rej,) = convert("mdanalysis", d.NCDF, {"topology": d.PSF})
    assert not bad and rej.record is None and "topology" in rej.reason


def _emt_traj(path: Path, steps: int = 6) -> None:
    from ase import units
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.io.trajectory import Trajectory
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    atoms.calc = EMT()
    MaxwellBoltzmannDistribution(atoms, temperature_K=600, rng=np.random.default_rng(0))
    dyn = VelocityVerlet(atoms, timestep=2 * units.fs)
    with Trajectory(str(path), "w", atoms) as traj:
        dyn.attach(traj.write, interval=1)
        dyn.run(steps)


def test_ase_traj_energies_and_forces(tmp_path: Path) -> None:
    from ase.io.trajectory import Trajectory

    path = tmp_path / "cu.traj"
    _emt_traj(path)
    graphs, rejects = convert("ase_traj", path, {"stride": 2, "timestep": 0.002})
    with Trajectory(str(path)) as traj:
        ref = [traj[i] for i in range(len(traj))]
    assert not rejects and len(graphs) == len(range(0, len(ref), 2))
    g = graphs[1]
    assert g.energy == pytest.approx(ref[2].get_potential_energy())
    np.testing.assert_allclose(g.forces, ref[2].get_forces(), atol=1e-5)
    assert g.pbc.all() and g.n_atoms == 32 and g.frame_time == pytest.approx(0.004)


def test_zarr_roundtrip_from_real_trajectory(d, tmp_path: Path) -> None:
    u = _universe(d.PSF, d.DCD)
    frames = [u.atoms.positions.copy() for _ in u.trajectory[:6]]
    store = write_zarr_trajectory(tmp_path / "adk.zarr", np.stack(frames), np.ones(u.atoms.n_atoms, int),
                                  cell=np.tile(np.eye(3) * 80.0, (6, 1, 1)), energy=np.arange(6.0),
                                  time=np.arange(6.0) * 0.5)
    graphs, rejects = convert("zarr_traj", store, {"stride": 2})
    assert not rejects and [g.properties["frame"] for g in graphs] == [0, 2, 4]
    np.testing.assert_allclose(graphs[1].positions, frames[2], atol=1e-4)
    assert graphs[2].energy == 4.0 and graphs[2].frame_time == 2.0 and graphs[0].pbc.all()
    conv = get_converter("zarr_traj")()
    assert conv.count_records(store, conv.parse_options({"stride": 2})) == 3


def test_multiframe_extxyz_as_trajectory(tmp_path: Path) -> None:
    import ase.io
    from ase.io.trajectory import Trajectory

    traj_path, xyz_path = tmp_path / "cu.traj", tmp_path / "cu.extxyz"
    _emt_traj(traj_path, steps=8)
    with Trajectory(str(traj_path)) as traj:
        ref = [traj[i] for i in range(len(traj))]
    ase.io.write(xyz_path, ref, format="extxyz")
    opts = {"stride": 3, "max_frames": 2, "timestep": 0.002}
    conv = get_converter("ase_traj")()
    assert conv.count_records(xyz_path, conv.parse_options(opts)) == 2 == conv.count_records(
        traj_path, conv.parse_options(opts))
    from_xyz, rejects = convert("ase_traj", xyz_path, opts)
    from_traj, _ = convert("ase_traj", traj_path, opts)
    assert not rejects and [g.properties["frame"] for g in from_xyz] == [0, 3]
    for a, b in zip(from_xyz, from_traj, strict=True):
        assert a.energy == pytest.approx(b.energy) and a.frame_time == b.frame_time and a.trajectory_id == "cu"
        np.testing.assert_allclose(a.forces, b.forces, atol=1e-5)
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-5)
    tail, beyond = convert("ase_traj", xyz_path, {"stride": 3}, records=range(2, 5))
    assert [g.properties["frame"] for g in tail] == [6] and [r.record for r in beyond] == [3, 4]
