"""Conversions between ``AtomGraph`` and ASE ``Atoms`` / pymatgen ``Structure``/``Molecule``."""
from __future__ import annotations

from typing import Any

import numpy as np

from shards.format.schema import AtomGraph, SchemaError


def graph_from_ase(atoms: Any, *, key: str, domain: str, source: str, source_file: str = "", index: int = 0,
                   **extra: Any) -> AtomGraph:
    """From ``ase.Atoms``; energy and forces are taken from an attached calculator's results."""
    results = getattr(getattr(atoms, "calc", None), "results", None) or {}
    fields: dict[str, Any] = {}
    if "energy" in results:
        fields["energy"] = float(results["energy"])
    if "forces" in results:
        fields["forces"] = np.asarray(results["forces"])
    charge = atoms.info.get("charge")
    if charge is not None:
        fields["charge"] = int(charge)
    fields.update(extra)
    pbc = np.asarray(atoms.pbc, dtype=bool)
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    return AtomGraph(key=key, domain=domain, source=source, source_file=source_file, index=index,
                     atomic_numbers=np.asarray(atoms.numbers), positions=np.asarray(atoms.positions),
                     cell=cell, pbc=pbc, **fields)


def graph_to_ase(g: AtomGraph) -> Any:
    """To ``ase.Atoms``; energy/forces become a single-point calculator, labels go into ``info``."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms = Atoms(numbers=g.atomic_numbers.astype(int), positions=g.positions.astype(np.float64),
                  cell=g.cell, pbc=g.pbc)
    atoms.info.update({"key": g.key, "domain": g.domain, "source": g.source, **(g.properties or {})})
    if g.charge is not None:
        atoms.info["charge"] = g.charge
    if g.energy is not None or g.forces is not None:
        results: dict[str, Any] = {}
        if g.energy is not None:
            results["energy"] = g.energy
        if g.forces is not None:
            results["forces"] = g.forces.astype(np.float64)
        atoms.calc = SinglePointCalculator(atoms, **results)
    if g.atom_name is not None:
        atoms.arrays["atomtypes"] = np.char.decode(g.atom_name, "ascii")
    if g.residue_name is not None:
        atoms.arrays["residuenames"] = np.char.decode(g.residue_name, "ascii")
    if g.residue_index is not None:
        atoms.arrays["residuenumbers"] = g.residue_index.astype(int)
    return atoms


def graph_from_pymatgen(obj: Any, *, key: str, domain: str, source: str, source_file: str = "",
                        index: int = 0, **extra: Any) -> AtomGraph:
    """From a pymatgen ``Structure`` (periodic) or ``Molecule``; disordered sites are rejected."""
    if not obj.is_ordered:
        raise SchemaError(key, "atomic_numbers", "structure has partially occupied (disordered) sites")
    numbers = [site.specie.Z for site in obj]
    lattice = getattr(obj, "lattice", None)
    if lattice is not None:
        cell, pbc = np.asarray(lattice.matrix, dtype=np.float64), np.asarray(lattice.pbc, dtype=bool)
        if "charge" not in extra and getattr(obj, "charge", None):
            extra["charge"] = int(round(obj.charge))
    else:
        cell, pbc = np.zeros((3, 3)), np.zeros(3, dtype=bool)
        extra.setdefault("charge", int(round(obj.charge)))
        extra.setdefault("spin", int(obj.spin_multiplicity))
    return AtomGraph(key=key, domain=domain, source=source, source_file=source_file, index=index,
                     atomic_numbers=np.asarray(numbers), positions=np.asarray(obj.cart_coords), cell=cell,
                     pbc=pbc, **extra)


def graph_to_pymatgen(g: AtomGraph) -> Any:
    """A ``Structure`` when any axis is periodic, else a ``Molecule``."""
    from pymatgen.core import Lattice, Molecule, Structure

    species = g.atomic_numbers.astype(int).tolist()
    coords = g.positions.astype(np.float64)
    if g.periodic:
        pbc = (bool(g.pbc[0]), bool(g.pbc[1]), bool(g.pbc[2]))
        return Structure(Lattice(g.cell, pbc=pbc), species, coords,
                         coords_are_cartesian=True, charge=g.charge)
    kwargs: dict[str, Any] = {}
    if g.charge is not None:
        kwargs["charge"] = g.charge
    if g.spin is not None:
        kwargs["spin_multiplicity"] = g.spin
    return Molecule(species, coords, **kwargs)
