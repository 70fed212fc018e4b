"""Small labelled MD trajectories for tests and studies: ASE Langevin dynamics with any ASE calculator.

``molecule_from_smiles`` embeds a molecule with RDKit (hydrogens included, seeded ETKDG + MMFF);
``xtb_calculator`` is tblite's GFN2-xTB; ``langevin_frames`` runs seeded Langevin MD and keeps every
``stride``-th frame with its energy and forces (a single-point calculator per frame), which
``write_traj`` stores as an ASE ``.traj`` that the ``ase_traj`` converter ingests.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["langevin_frames", "molecule_from_smiles", "write_traj", "xtb_calculator"]


def molecule_from_smiles(smiles: str, seed: int = 0) -> Any:
    """An ``ase.Atoms`` with explicit hydrogens, 3D-embedded by RDKit (ETKDG, then MMFF)."""
    from ase import Atoms
    from rdkit import Chem
    from rdkit.Chem import rdDistGeom, rdForceFieldHelpers

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"RDKit cannot parse SMILES {smiles!r}")
    mol = Chem.AddHs(mol)
    if rdDistGeom.EmbedMolecule(mol, randomSeed=seed) != 0:
        raise ValueError(f"RDKit could not embed {smiles!r} in 3D")
    rdForceFieldHelpers.MMFFOptimizeMolecule(mol)
    pos = mol.GetConformer().GetPositions()
    return Atoms(numbers=[a.GetAtomicNum() for a in mol.GetAtoms()], positions=pos)


def xtb_calculator(method: str = "GFN2-xTB") -> Any:
    """tblite's ASE calculator, quiet."""
    from tblite.ase import TBLite

    return TBLite(method=method, verbosity=0)


def langevin_frames(atoms: Any, calc: Any, *, frames: int, stride: int = 1, temperature_K: float = 500.0,
                    timestep_fs: float = 0.5, friction: float = 0.01, seed: int = 0) -> list[Any]:
    """``frames`` snapshots (every ``stride`` steps, first after ``stride`` steps) with energy and forces."""
    from ase import units
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import thermalize_momenta

    if frames < 1 or stride < 1:
        raise ValueError("frames and stride must be >= 1")
    atoms = atoms.copy()
    atoms.calc = calc
    rng = np.random.default_rng(seed)
    thermalize_momenta(atoms, temperature_K, rng=rng)
    atoms.set_constraint(FixCom())
    dyn = Langevin(atoms, timestep_fs * units.fs, temperature_K=temperature_K, friction=friction, fixcm=False,
                   rng=np.random.RandomState(seed))
    out = []
    for i in range(frames):
        dyn.run(stride)
        snap = atoms.copy()
        snap.set_constraint()
        snap.calc = SinglePointCalculator(snap, energy=float(atoms.get_potential_energy()),
                                          forces=atoms.get_forces(apply_constraint=False).copy())
        snap.info["time"] = (i + 1) * stride * timestep_fs / 1000.0  # ps
        out.append(snap)
    return out


def write_traj(frames: list[Any], path: str | Path) -> Path:
    """Write frames (with their single-point results) to an ASE ``.traj``, atomically."""
    from ase.io.trajectory import Trajectory

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with Trajectory(str(tmp), "w") as traj:
        for a in frames:
            traj.write(a)
    tmp.replace(path)
    return path
