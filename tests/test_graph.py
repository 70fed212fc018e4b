"""Radius graphs: against a brute-force reference and ASE's neighbor_list on real and random cells."""
from __future__ import annotations

import glob
import itertools
import math
import os
import warnings

import ase
import numpy as np
import pytest
from ase.neighborlist import neighbor_list

from shards.stream.graph import image_counts, radius_graph, radius_graph_with_offsets

CUTOFF = 5.0


def brute_force(pos: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> dict:
    """O(N^2 * images) reference without wrapping: images from the heights of the cell."""
    pos = np.asarray(pos, dtype=np.float64)
    vol = abs(np.linalg.det(cell)) if pbc.any() else 1.0
    frac_span = np.zeros(3)
    if pbc.any():
        frac = pos @ np.linalg.inv(cell)
        frac_span = np.where(pbc, frac.max(0) - frac.min(0), 0.0)
    reach = []
    for i in range(3):
        if pbc[i]:
            h = vol / np.linalg.norm(np.cross(cell[(i + 1) % 3], cell[(i + 2) % 3]))
            reach.append(int(math.ceil(cutoff / h + frac_span[i])) + 1)
        else:
            reach.append(0)
    out = {}
    for s in itertools.product(*[range(-r, r + 1) for r in reach]):
        shift = np.array(s, dtype=np.float64) @ cell
        d = np.linalg.norm(pos[:, None, :] + shift - pos[None, :, :], axis=-1)  # [src, dst]
        for src, dst in zip(*np.nonzero(d < cutoff), strict=True):
            if src == dst and not any(s):
                continue
            out[(int(src), int(dst), tuple(int(v) for v in s))] = float(d[src, dst])
    return out


def ours(pos, cell, pbc, cutoff=CUTOFF) -> dict:
    ei, off, dist = radius_graph_with_offsets(pos, cell, pbc, cutoff)
    return {(int(a), int(b), tuple(int(v) for v in o)): float(d)
            for a, b, o, d in zip(ei[0], ei[1], off, dist, strict=True)}


def from_ase(atoms, cutoff=CUTOFF) -> dict:
    i, j, S, d = neighbor_list("ijSd", atoms, cutoff)
    return {(int(b), int(a), tuple(int(v) for v in s)): float(x) for a, b, s, x in zip(i, j, S, d, strict=True)}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), (len(a), len(b), list(a.keys() ^ b.keys())[:5])
    if a:
        diff = max(abs(a[k] - b[k]) for k in a)
        assert diff < 1e-5


def random_cell(rng: np.random.Generator, lo: float = 2.0, hi: float = 9.0) -> np.ndarray:
    lengths = rng.uniform(lo, hi, 3)
    alpha, beta, gamma = np.radians(rng.uniform(60, 120, 3))
    from ase.geometry import cellpar_to_cell

    cell = cellpar_to_cell(np.r_[lengths, np.degrees([alpha, beta, gamma])])
    if abs(np.linalg.det(cell)) < 0.2 * np.prod(lengths):  # keep reasonably shaped cells
        return random_cell(rng, lo, hi)
    rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return cell @ rot


def crystal_files() -> list[str]:
    try:
        import pymatgen.core
    except ImportError:
        return []
    root = os.path.dirname(os.path.dirname(pymatgen.core.__file__))
    return sorted(glob.glob(os.path.join(root, "util", "structures", "*.json")))


def mineral_files() -> list[str]:
    root = os.path.dirname(ase.__file__)
    return sorted(glob.glob(os.path.join(root, "test", "testdata", "minerals", "cod_*.cif")))


@pytest.mark.parametrize("path", crystal_files(), ids=os.path.basename)
def test_pymatgen_crystals_match_ase(path):
    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    s = Structure.from_file(path)
    if not s.is_ordered:
        pytest.skip("disordered structure")
    if len(s) > 400:
        pytest.skip("large interface structure; covered by the random clouds")
    atoms = AseAtomsAdaptor.get_atoms(s)
    assert_same(ours(atoms.positions, atoms.cell.array, atoms.pbc), from_ase(atoms))


@pytest.mark.parametrize("path", mineral_files(), ids=os.path.basename)
def test_cod_minerals_match_ase(path):
    import ase.io

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            atoms = ase.io.read(path)
    except Exception as exc:  # some COD files need features ASE lacks
        pytest.skip(f"ase cannot read it: {exc}")
    assert_same(ours(atoms.positions, atoms.cell.array, atoms.pbc), from_ase(atoms))


def test_random_triclinic_cells_match_ase_and_brute_force():
    rng = np.random.default_rng(1234)
    for trial in range(50):
        cell = random_cell(rng)
        n = int(rng.integers(1, 9))
        # positions deliberately outside the cell: offsets must refer to the unwrapped positions
        pos = rng.uniform(-0.5, 1.5, (n, 3)) @ cell
        pbc = np.ones(3, dtype=bool)
        atoms = ase.Atoms(numbers=[6] * n, positions=pos, cell=cell, pbc=pbc)
        got = ours(pos, cell, pbc)
        assert_same(got, from_ase(atoms))
        if trial < 10:
            assert_same(got, brute_force(pos, cell, pbc, CUTOFF))


@pytest.mark.parametrize("cell", [np.eye(3) * 1.5,
                                  np.array([[1.2, 0, 0], [1.1, 1.0, 0], [0.9, 0.8, 1.3]]),
                                  np.array([[6.0, 0, 0], [5.7, 0.6, 0], [0, 0, 2.0]])],
                         ids=["cubic-1.5", "skewed-small", "very-skewed"])
def test_cells_smaller_than_cutoff(cell):
    rng = np.random.default_rng(7)
    for n in (1, 2):
        pos = rng.uniform(0, 1, (n, 3)) @ cell
        pbc = np.ones(3, dtype=bool)
        got = ours(pos, cell, pbc)
        atoms = ase.Atoms(numbers=[1] * n, positions=pos, cell=cell, pbc=pbc)
        assert_same(got, from_ase(atoms))
        assert_same(got, brute_force(pos, cell, pbc, CUTOFF))
        assert any(k[0] == k[1] for k in got)  # own periodic images are neighbours


def test_image_counts_from_heights():
    assert image_counts(np.eye(3) * 1.5, np.ones(3, bool), 5.0).tolist() == [4, 4, 4]
    assert image_counts(np.eye(3) * 10, np.array([True, True, False]), 5.0).tolist() == [1, 1, 0]


def test_slab_mixed_pbc():
    rng = np.random.default_rng(3)
    cell = np.array([[4.0, 0, 0], [1.5, 3.8, 0], [0, 0, 20.0]])
    pbc = np.array([True, True, False])
    pos = np.c_[rng.uniform(0, 4, (12, 2)), rng.uniform(8, 14, 12)]
    got = ours(pos, cell, pbc)
    atoms = ase.Atoms(numbers=[8] * 12, positions=pos, cell=cell, pbc=pbc)
    assert_same(got, from_ase(atoms))
    assert_same(got, brute_force(pos, cell, pbc, CUTOFF))
    assert all(k[2][2] == 0 for k in got)


def test_slab_with_zero_vacuum_vector():
    rng = np.random.default_rng(4)
    cell = np.array([[3.0, 0, 0], [0.5, 3.2, 0], [0, 0, 0]])
    pbc = np.array([True, True, False])
    pos = rng.uniform(0, 3, (5, 3))
    full = cell.copy()
    full[2] = [0, 0, 1]
    assert_same(ours(pos, cell, pbc), brute_force(pos, full, pbc, CUTOFF))


def test_molecule_and_large_cloud_match_ase():
    rng = np.random.default_rng(5)
    for n, box in ((18, 4.0), (300, 14.0)):
        pos = rng.uniform(0, box, (n, 3))
        atoms = ase.Atoms(numbers=[6] * n, positions=pos)
        got = ours(pos, np.zeros((3, 3)), np.zeros(3, bool))
        assert_same(got, from_ase(atoms))
        ei, shift = radius_graph(pos.astype(np.float32))
        assert ei.dtype == np.int64 and shift.dtype == np.float32 and not shift.any()
        assert ei.shape[1] == len(got)


def test_large_periodic_uses_tree_and_matches_ase():
    rng = np.random.default_rng(6)
    cell = random_cell(rng, 14.0, 16.0)
    pos = rng.uniform(0, 1, (600, 3)) @ cell
    atoms = ase.Atoms(numbers=[6] * 600, positions=pos, cell=cell, pbc=True)
    assert_same(ours(pos, cell, np.ones(3, bool)), from_ase(atoms))


def test_shift_convention_and_order():
    rng = np.random.default_rng(8)
    cell = random_cell(rng, 3.0, 6.0)
    pos = (rng.uniform(0, 1, (6, 3)) @ cell).astype(np.float32)
    ei, shift = radius_graph(pos, cell, np.ones(3, bool))
    vec = pos[ei[0]].astype(np.float64) + shift - pos[ei[1]]
    d = np.linalg.norm(vec, axis=1)
    assert d.max() < CUTOFF + 1e-4
    assert np.all(np.diff(ei[1]) >= 0)
    for dst in range(6):
        dd = d[ei[1] == dst]
        assert np.all(np.diff(dd) >= -1e-5)


def test_max_neighbors_keeps_exactly_k_nearest():
    rng = np.random.default_rng(9)
    cell = random_cell(rng, 4.0, 6.0)
    pbc = np.ones(3, bool)
    pos = rng.uniform(0, 1, (10, 3)) @ cell
    full_ei, full_off, full_d = radius_graph_with_offsets(pos, cell, pbc)
    k = 12
    ei, off, d = radius_graph_with_offsets(pos, cell, pbc, max_neighbors=k)
    for dst in range(10):
        sel = full_ei[1] == dst
        want = np.sort(full_d[sel])[:k]
        got = d[ei[1] == dst]
        assert got.shape[0] == min(k, sel.sum())
        np.testing.assert_allclose(np.sort(got), want)
    # molecule path and tie-breaking: a symmetric square gives ties, broken by src
    sq = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=np.float64)
    ei, _ = radius_graph(sq, max_neighbors=2)
    assert ei[:, ei[1] == 0].tolist() == [[1, 2], [0, 0]]


def test_self_loops_and_determinism():
    pos = np.array([[0.0, 0, 0], [1.0, 0, 0]])
    ei, _ = radius_graph(pos, self_loops=True)
    assert ei.tolist() == [[0, 1, 1, 0], [0, 0, 1, 1]]
    cell = np.eye(3) * 3.0
    a = radius_graph_with_offsets(pos, cell, np.ones(3, bool), self_loops=True)
    b = radius_graph_with_offsets(pos, cell, np.ones(3, bool), self_loops=True)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    zero_self = (a[0][0] == a[0][1]) & ~a[1].any(1)
    assert zero_self.sum() == 2


def test_strict_cutoff():
    pos = np.array([[0.0, 0, 0], [2.0, 0, 0]])
    assert radius_graph(pos, cutoff=2.0)[0].shape[1] == 0
    assert radius_graph(pos, cutoff=2.0 + 1e-9)[0].shape[1] == 2


def test_skewed_cell_is_reduced_and_still_exact():
    cell = np.array([[5.0, 0, 0], [40.0, 5.0, 0], [-15.0, 25.0, 5.0]])  # a cubic 5 Å lattice, skewed
    rng = np.random.default_rng(11)
    pos = rng.uniform(0, 1, (4, 3)) @ cell
    atoms = ase.Atoms(numbers=[6] * 4, positions=pos, cell=cell, pbc=True)
    got = ours(pos, cell, np.ones(3, bool))
    assert_same(got, from_ase(atoms))
    cubic = ours(pos, np.eye(3) * 5.0, np.ones(3, bool))
    assert sorted(got.values()) == pytest.approx(sorted(cubic.values()), abs=1e-9)
