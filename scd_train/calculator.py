"""An ASE calculator for a fine-tuned SCD force field (``scd finetune`` with ``task: energy_forces``).

>>> calc = SCDCalculator("ft-out/")                     # doctest: +SKIP
>>> atoms.calc = calc; atoms.get_forces()               # doctest: +SKIP
>>> calc.compute_many([a, b, c])                        # batched, same numbers as one by one  # doctest: +SKIP

Energies in eV, forces in eV/Å, stress in eV/Å^3 (ASE's sign and Voigt order) for cells periodic in all
three directions. The neighbour graph is the project's exact periodic radius graph
(:func:`shards.stream.graph.radius_graph_with_offsets`, no neighbour cap), rebuilt at every call. Outputs are
deterministic (eval mode, no random draws). Structures with elements absent from the training split are
refused with a one-line message naming them.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.data import chemical_symbols

from scd_train.forcefield import EnergyModel, atom_batches, graph_item, load_forcefield, structure_batch

__all__ = ["SCDCalculator"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class SCDCalculator(Calculator):
    """``SCDCalculator(checkpoint, device="cpu")``: energy, forces and (periodic) stress.

    ``checkpoint`` is the output folder of an energy + forces fine-tuning (``forcefield.json`` +
    ``model.safetensors``). ``dtype`` is ``"float32"`` (default) or ``"float64"``; ``max_atoms`` bounds
    the atoms of one batch in :meth:`compute_many`.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, checkpoint: str | Path, device: str = "cpu", dtype: str = "float32",
                 max_atoms: int = 4096, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        model, meta = load_forcefield(checkpoint, device, _DTYPES[dtype])
        self.setup(model, meta, str(checkpoint), device, dtype, max_atoms)

    def setup(self, model: EnergyModel, meta: dict[str, Any], name: str, device: str, dtype: str,
              max_atoms: int) -> None:
        """Attach ``model`` (eval mode, on ``device`` in ``dtype``) and its metadata (``elements``)."""
        if max_atoms < 1:
            raise ValueError("max_atoms must be >= 1")
        self.checkpoint, self.device, self.dtype, self.max_atoms = name, torch.device(device), _DTYPES[dtype], max_atoms
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.meta = meta
        self.elements = frozenset(int(z) for z in meta["elements"])

    @classmethod
    def from_model(cls, model: EnergyModel, meta: dict[str, Any], device: str = "cpu", dtype: str = "float32",
                   max_atoms: int = 4096) -> SCDCalculator:
        """A calculator around an in-memory model (``meta`` needs ``elements``)."""
        self = cls.__new__(cls)
        Calculator.__init__(self)
        self.setup(model, meta, "<in-memory model>", device, dtype, max_atoms)
        return self

    def check_elements(self, numbers: np.ndarray) -> None:
        """Raise ``ValueError`` naming the elements the force field was not trained on."""
        unknown = sorted({int(z) for z in np.unique(numbers)} - self.elements)
        if unknown:
            names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in unknown)
            trained = ", ".join(chemical_symbols[z] for z in sorted(self.elements))
            raise ValueError(f"{self.checkpoint}: this force field was not trained on {names}; "
                             f"it knows {trained}")

    def compute_many(self, structures: Sequence[Any], stress: bool | None = None) -> list[dict[str, Any]]:
        """Energy, forces (and stress when every structure is 3D-periodic, or when asked) of several
        ``ase.Atoms`` in batches of at most ``max_atoms`` atoms; results match one-by-one calls."""
        for atoms in structures:
            self.check_elements(atoms.numbers)
        periodic = [bool(np.all(a.pbc)) for a in structures]
        want_stress = all(periodic) if stress is None else stress
        if want_stress and not all(periodic):
            raise PropertyNotImplementedError("stress needs a cell periodic in all three directions")
        cutoff = self.model.cutoff
        items = [graph_item(a.numbers, a.positions, a.cell.array, a.pbc, cutoff) for a in structures]
        results: list[dict[str, Any]] = []
        for idx in atom_batches([len(a) for a in structures], self.max_atoms):
            batch = structure_batch([items[i] for i in idx], self.device, self.dtype)
            out = self.model(batch, forces=True, stress=want_stress)
            energy = out["energy"].detach().cpu().numpy()
            bounds = np.cumsum(batch["n_atoms"].cpu().numpy())[:-1]
            forces = np.split(out["forces"].detach().cpu().double().numpy(), bounds)
            for j in range(len(idx)):
                res: dict[str, Any] = {"energy": float(energy[j]), "free_energy": float(energy[j]),
                                       "forces": forces[j]}
                if want_stress:
                    s = out["stress"][j].detach().cpu().double().numpy()
                    res["stress"] = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
                results.append(res)
        return results

    def calculate(self, atoms: Any = None, properties: Sequence[str] = ("energy",),
                  system_changes: Sequence[str] = tuple(all_changes)) -> None:
        super().calculate(atoms, properties, system_changes)
        assert self.atoms is not None
        wants_stress = "stress" in properties
        if wants_stress and not np.all(self.atoms.pbc):
            raise PropertyNotImplementedError("stress needs a cell periodic in all three directions")
        self.results = self.compute_many([self.atoms], stress=wants_stress or bool(np.all(self.atoms.pbc)))[0]
