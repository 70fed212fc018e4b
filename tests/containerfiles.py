"""Container files in the published layouts (HDF5 SPICE / ANI-1x, NPZ rMD17 / MD17, ASE databases, Parquet),
written with the real libraries, for the container converter tests; expected values in eV / Å are written
out by hand (1 Ha = 27.211386245988 eV, 1 bohr = 0.529177210903 Å, 1 kcal/mol = 4.184 / 96.48533212 eV)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ingest.registry import get_converter

BOHR = 0.529177210903  # Å
HA_PER_BOHR = 51.422067476325886  # eV/Å
HA = 27.211386245988  # eV
KCAL = 4.184 / 96.48533212331  # eV: thermochemical kcal over the Faraday constant in J/(mol V)


def count_records(name: str, path: Path, options: dict | None = None) -> int | None:
    """The converter's own record count of ``path``."""
    conv = get_converter(name)()
    return conv.count_records(path, conv.parse_options(options or {}))


def same_graphs(a, b) -> bool:
    """Two lists of samples equal field by field, bit for bit."""
    return len(a) == len(b) and all(x.equals(y) for x, y in zip(a, b, strict=True))


class Boom:
    """Unpickling this creates a marker file: proof that a converter unpickled something."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def write_spice(path: Path) -> Path:
    import h5py

    water = np.array([[[0.0, 0.0, 0.0], [1.8, 0.0, 0.0], [0.0, 1.8, 0.0]],
                      [[0.0, 0.0, 0.1], [1.8, 0.0, 0.1], [0.0, 1.8, 0.1]]], dtype=np.float32)  # bohr
    with h5py.File(path, "w") as h5:
        g = h5.create_group("water")
        g["atomic_numbers"] = np.array([8, 1, 1], dtype=np.int16)
        g["conformations"] = water
        g["dft_total_energy"] = np.array([-76.4, -76.3])
        grad = np.zeros((2, 3, 3), dtype=np.float32)
        grad[0, 1, 0] = 0.01  # Ha/bohr on H1 along x
        grad[1, 2, 1] = -0.02
        g["dft_total_gradient"] = grad
        g["formation_energy"] = np.array([-0.5, 0.25])
        g.create_dataset("smiles", data=["[H:2][O:1][H:3]"], dtype=h5py.string_dtype())
        g.create_dataset("subset", data=["SPICE Water Clusters v1.0"], dtype=h5py.string_dtype())
        a = h5.create_group("ammonium")
        a["atomic_numbers"] = np.array([7, 1, 1, 1, 1], dtype=np.int16)
        a["conformations"] = np.arange(3 * 5 * 3, dtype=np.float32).reshape(3, 5, 3) * 0.5
        a["dft_total_energy"] = np.array([-56.5, -56.4, -56.3])
        a["dft_total_gradient"] = np.zeros((3, 5, 3), dtype=np.float32)
        a["formation_energy"] = np.array([0.1, 0.2, 0.3])
        a.create_dataset("smiles", data=["[NH4+]"], dtype=h5py.string_dtype())
        a.create_dataset("subset", data=["SPICE PubChem Set 1 Single Points Dataset v1.2"], dtype=h5py.string_dtype())
    return path


def write_ani1x(path: Path) -> Path:
    import h5py

    with h5py.File(path, "w") as h5:
        g = h5.create_group("C1H4")
        g["atomic_numbers"] = np.array([6, 1, 1, 1, 1], dtype=np.uint8)
        coords = np.zeros((2, 5, 3), dtype=np.float32)
        coords[:, 1:, 0] = [1.09, -1.09, 0.0, 0.0]
        coords[:, 1:, 1] = [0.0, 0.0, 1.09, -1.09]
        coords[1] += 0.25
        g["coordinates"] = coords  # Å
        g["wb97x_dz.energy"] = np.array([-40.0, -39.9])
        forces = np.zeros((2, 5, 3), dtype=np.float32)
        forces[0, 0, 2] = 0.05  # Ha/Å
        g["wb97x_dz.forces"] = forces
        g["ccsd(t)_cbs.energy"] = np.array([np.nan, -40.1])  # computed for a subset only
        g["wb97x_tz.energy"] = np.array([-40.2, np.nan])
        g["wb97x_tz.forces"] = np.full((2, 5, 3), np.nan, dtype=np.float32)
        g["wb97x_dz.dipole"] = np.zeros((2, 3))
    return path


Z_ETHANOL = [6, 6, 8, 1, 1, 1, 1, 1, 1]


def ethanol_frames(t: int = 4) -> np.ndarray:
    base = np.arange(27, dtype=np.float64).reshape(9, 3) * 0.1
    return np.stack([base + 0.01 * k for k in range(t)])


def write_rmd17(path: Path, compressed: bool = False, **override) -> Path:
    t = 4
    arrays = dict(nuclear_charges=np.array(Z_ETHANOL), coords=ethanol_frames(t),
                  energies=np.array([-100.0, 2.5, 0.0, 1.0]),
                  forces=np.full((t, 9, 3), 2.5), old_indices=np.array([10, 20, 30, 40]),
                  old_energies=np.zeros(t), old_forces=np.zeros((t, 9, 3)))
    arrays.update(override)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def write_db(path: Path, backend: str) -> list:
    import ase.db
    from ase import Atoms
    from ase.build import bulk, molecule
    from ase.calculators.singlepoint import SinglePointCalculator

    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    cu.calc = SinglePointCalculator(cu, energy=-14.5, forces=np.full((4, 3), 0.125),
                                    stress=np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06]))
    water = molecule("H2O")
    water.calc = SinglePointCalculator(water, energy=-14.2, forces=np.zeros((3, 3)))
    oh = Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.97]])
    rows = [cu, water, oh]
    db = ase.db.connect(str(path), type=backend)
    db.write(cu, sid=7)
    db.write(water, data={"charge": 0, "spin": 1})  # OMol25 style: charge and spin in data
    db.write(oh, charge=-1, spin=1)  # key-value pairs
    if hasattr(db, "close"):
        db.close()
    return rows


def write_parquet(path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i in range(10):
        n = 2 + i % 3
        pos = [[0.1 * i + a, 0.5 * a, 1.0] for a in range(n)]
        rows.append({"numbers": [6] + [1] * (n - 1), "symbols": ["C"] + ["H"] * (n - 1), "pos": pos,
                     "pos_flat": [x for p in pos for x in p],
                     "energy_kcal": -100.0 + i, "forces": [[2.5, 0.0, -2.5]] * n, "q": i % 2, "mult": 1,
                     "gap_ev": 0.5 + i, "cell": [[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]] if i == 9 else None,
                     "smiles": "C"})
    rows[4]["pos"][1] = [1.0, 2.0]  # an inner list of 2: mismatched shape
    rows[5]["numbers"][0] = 0
    rows[6]["pos"] = None
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
    return path


PARQUET_OPTIONS = {"columns": {"atomic_numbers": "numbers", "positions": "pos", "energy": "energy_kcal",
                               "forces": "forces", "charge": "q", "spin": "mult", "cell": "cell"},
                   "properties": {"gap": "gap_ev"}, "property_units": {"gap": "eV"}, "energy_unit": "kcal/mol"}
