"""SCD views and collation: determinism, noise scales, augmentations, crops, batch offsets."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from scd_train.views import ViewConfig, crop_indices, make_views, noise_rng, random_rotation, supercell
from shards.format.schema import AtomGraph
from shards.stream.collate import collate
from shards.stream.graph import radius_graph_with_offsets


def molecule(n: int = 18, key: str = "mol-1", seed: int = 0, box: float = 4.0) -> AtomGraph:
    rng = np.random.default_rng(seed)
    return AtomGraph(key=key, domain="molecule", source="test", source_file="", index=0,
                     atomic_numbers=rng.integers(1, 10, n).astype(np.uint8),
                     positions=rng.uniform(0, box, (n, 3)).astype(np.float32),
                     cell=np.zeros((3, 3)), pbc=np.zeros(3, bool))


def crystal(key: str = "cry-1", pbc=(True, True, True)) -> AtomGraph:
    cell = np.array([[3.9, 0.0, 0.0], [0.4, 4.1, 0.0], [0.3, -0.2, 4.4]])
    frac = np.array([[0.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, 0.0, 0.25]])
    return AtomGraph(key=key, domain="crystal", source="test", source_file="", index=0,
                     atomic_numbers=np.array([38, 22, 8], np.uint8),
                     positions=(frac @ cell).astype(np.float32), cell=cell, pbc=np.array(pbc))


def protein(n_res: int = 60, seed: int = 1) -> AtomGraph:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(5, 13, n_res)
    res = np.repeat(np.arange(1, n_res + 1), sizes).astype(np.int32)
    centres = np.cumsum(rng.normal(0, 2.0, (n_res, 3)), axis=0)
    pos = centres[res - 1] + rng.normal(0, 1.0, (res.shape[0], 3))
    return AtomGraph(key="prot-1", domain="protein", source="test", source_file="", index=0,
                     atomic_numbers=np.full(res.shape[0], 6, np.uint8),
                     positions=pos.astype(np.float32), cell=np.zeros((3, 3)), pbc=np.zeros(3, bool),
                     residue_index=res)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        np.asarray(a[k]).dtype == np.asarray(b[k]).dtype
        and np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes() for k in a)


def test_noise_rng_keyed_and_process_independent():
    a = noise_rng(3, "k-1", 7, "noise").random(8)
    assert a.tobytes() == noise_rng(3, "k-1", 7, "noise").random(8).tobytes()
    for other in [(4, "k-1", 7, "noise"), (3, "k-2", 7, "noise"), (3, "k-1", 8, "noise"),
                  (3, "k-1", 7, "clean")]:
        assert not np.array_equal(a, noise_rng(*other).random(8))
    code = ("from scd_train.views import noise_rng; import sys; "
            "sys.stdout.write(noise_rng(3, 'k-1', 7, 'noise').random(8).tobytes().hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == a.tobytes().hex()


@pytest.mark.parametrize("g", [molecule(), crystal()], ids=["molecule", "crystal"])
def test_views_deterministic(g):
    cfg = ViewConfig(rotate=True)
    a, b = make_views(g, cfg, 0, 5), make_views(g, cfg, 0, 5)
    assert same(a, b)
    c = make_views(g, cfg, 0, 6)
    assert not np.array_equal(a["noise"], c["noise"])
    assert not np.array_equal(make_views(g, cfg, 1, 5)["noise"], a["noise"])


def test_view_arrays_and_noise_scales():
    g = molecule(3000, box=40.0)
    v = make_views(g, ViewConfig(cutoff=3.0), 0, 1)
    assert v["z"].dtype == np.int64 and int(v["n_atoms"]) == 3000
    for k in ("pos_clean", "pos_noisy", "noise"):
        assert v[k].dtype == np.float32 and v[k].shape == (3000, 3)
    for s in ("clean", "noisy"):
        assert v[f"edge_index_{s}"].dtype == np.int64 and v[f"edge_shift_{s}"].dtype == np.float32
    assert v["cell"].dtype == np.float32 and v["pbc"].dtype == bool
    pos = g.positions.astype(np.float64)
    assert abs(v["noise"].std() - 0.04) < 0.002 and abs(v["noise"].mean()) < 0.002
    np.testing.assert_allclose(v["pos_noisy"] - pos, v["noise"], atol=1e-5)
    jitter = v["pos_clean"] - pos
    assert abs(jitter.std() - 0.005) < 0.0003
    assert abs(np.corrcoef(jitter.ravel(), v["noise"].ravel())[0, 1]) < 0.05


def test_graphs_are_built_per_view_after_noising():
    g = molecule(40, box=6.0)
    v = make_views(g, ViewConfig(noisy_sigma=0.5), 0, 1)
    for s in ("clean", "noisy"):
        ei, pos = v[f"edge_index_{s}"], v[f"pos_{s}"].astype(np.float64)
        d = np.linalg.norm(pos[ei[0]] - pos[ei[1]], axis=1)
        assert d.max() < 5.0
        full = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
        assert ei.shape[1] == int((full < 5.0).sum()) - 40


def test_rotation_preserves_distances_and_edges():
    rng = np.random.default_rng(0)
    for _ in range(5):
        r = random_rotation(rng)
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(r) == pytest.approx(1.0)
    g = molecule(25, box=6.0)
    cfg = ViewConfig(clean_sigma=0.0, noisy_sigma=0.0)
    plain = make_views(g, cfg, 0, 1)
    rot = make_views(g, ViewConfig(clean_sigma=0.0, noisy_sigma=0.0, rotate=True), 0, 1)
    assert not np.allclose(rot["pos_clean"], plain["pos_clean"])
    p, q = plain["pos_clean"].astype(np.float64), rot["pos_clean"].astype(np.float64)
    dp = np.linalg.norm(p[:, None] - p[None], axis=-1)
    dq = np.linalg.norm(q[:, None] - q[None], axis=-1)
    np.testing.assert_allclose(dp, dq, atol=1e-4)
    assert rot["edge_index_clean"].shape == plain["edge_index_clean"].shape
    np.testing.assert_array_equal(rot["pos_clean"], rot["pos_noisy"])


def test_crystal_repeat_multiplies_atoms():
    g = crystal()
    v = make_views(g, ViewConfig(crystal_repeat_p=1.0, crystal_max_repeat=2), 0, 1)
    assert int(v["n_atoms"]) == 3 * 8 and v["z"].tolist() == g.atomic_numbers.tolist() * 8
    np.testing.assert_allclose(v["cell"], 2 * g.cell, rtol=1e-6)
    seen = set()
    for step in range(40):
        v = make_views(g, ViewConfig(crystal_max_repeat=3), 0, step)
        ratio = int(v["n_atoms"]) // 3
        vol = abs(np.linalg.det(v["cell"].astype(np.float64))) / abs(np.linalg.det(g.cell))
        assert ratio == round(vol)
        seen.add(ratio)
    assert 1 in seen and len(seen) > 3
    slab = crystal(pbc=(True, True, False))
    v = make_views(slab, ViewConfig(crystal_repeat_p=1.0), 0, 1)
    assert int(v["n_atoms"]) == 12 and np.allclose(v["cell"][2], slab.cell[2])
    assert int(make_views(crystal(), ViewConfig(noise=False, crystal_repeat_p=1.0), 0, 1)["n_atoms"]) == 3


def test_supercell_graph_is_repeated_cell_graph():
    g = crystal()
    pos, cell = g.positions.astype(np.float64), g.cell
    reps = np.array([2, 1, 3])
    n = pos.shape[0]
    ei, off, _ = radius_graph_with_offsets(pos, cell, g.pbc)
    spos, _, scell = supercell(pos, g.atomic_numbers, cell, reps)
    sei, soff, _ = radius_graph_with_offsets(spos, scell, g.pbc)
    got = {(int(a), int(b), tuple(o)) for a, b, o in zip(sei[0], sei[1], soff.tolist(), strict=True)}
    images = np.stack(np.meshgrid(*[np.arange(r) for r in reps], indexing="ij"), -1).reshape(-1, 3)

    def flat(m):
        return int((m[0] * reps[1] + m[1]) * reps[2] + m[2])

    want = set()
    for m in images:
        for a, b, o in zip(ei[0], ei[1], off, strict=True):
            t = m + o
            want.add((flat(t % reps) * n + int(a), flat(m) * n + int(b), tuple((t // reps).tolist())))
    assert got == want


def test_crop_keeps_whole_nearest_residues_within_budget():
    g = protein()
    res = g.residue_index
    for step in range(10):
        v = make_views(g, ViewConfig(crop_atoms=150), 0, step)
        assert int(v["n_atoms"]) <= 150
    rng = noise_rng(0, "x", 0, "augment")
    idx = crop_indices(g.positions.astype(np.float64), res, 150, rng)
    kept = np.unique(res[idx])
    for r in kept:
        assert np.isin(np.nonzero(res == r)[0], idx).all()
    assert 139 <= idx.shape[0] <= 150  # close to the budget: residues have <= 12 atoms
    assert np.all(np.diff(idx) > 0)
    centre = int(noise_rng(0, "x", 0, "augment").integers(res.shape[0]))
    d = np.linalg.norm(g.positions - g.positions[centre], axis=1)
    res_d = {r: d[res == r].min() for r in np.unique(res)}
    dropped = [res_d[r] for r in res_d if r not in kept]
    assert max(res_d[r] for r in kept) <= min(dropped)
    small = molecule(30)
    assert int(make_views(small, ViewConfig(crop_atoms=10), 0, 1)["n_atoms"]) == 10
    assert int(make_views(protein(5), ViewConfig(crop_atoms=1000), 0, 1)["n_atoms"]) == protein(5).n_atoms


def test_no_noise_single_clean_view():
    g = molecule()
    v = make_views(g, ViewConfig(noise=False), 0, 1)
    assert set(v) == {"z", "pos", "edge_index", "edge_shift", "cell", "pbc", "n_atoms"}
    np.testing.assert_array_equal(v["pos"], g.positions)


@pytest.mark.parametrize("noise", [True, False])
def test_collate_offsets_and_graph_fields(noise):
    graphs = [molecule(18, "m-a", 0), crystal("c-b"), molecule(7, "m-c", 2), crystal("c-d")]
    items = []
    for i, g in enumerate(graphs):
        it = make_views(g, ViewConfig(noise=noise), 0, 3)
        it["key"], it["domain_id"] = g.key, i % 2
        items.append(it)
    b = collate(items)
    sizes = [int(it["n_atoms"]) for it in items]
    assert b["n_atoms"].tolist() == sizes and b["keys"] == [g.key for g in graphs]
    assert b["domain"].tolist() == [0, 1, 0, 1]
    assert b["batch"].tolist() == sum(([i] * n for i, n in enumerate(sizes)), [])
    assert b["cell"].shape == (4, 3, 3) and b["pbc"].shape == (4, 3)
    assert b["z"].shape == (sum(sizes),)
    suffixes = ["_clean", "_noisy"] if noise else [""]
    for s in suffixes:
        ei = b["edge_index" + s]
        assert b["batch"][ei[0]].tolist() == b["batch"][ei[1]].tolist()
        assert b["n_edges" + s].tolist() == [it["edge_index" + s].shape[1] for it in items]
        assert b["edge_shift" + s].shape == (ei.shape[1], 3)
        start = 0
        for i, it in enumerate(items):
            e = it["edge_index" + s].shape[1]
            off = sum(sizes[:i])
            np.testing.assert_array_equal(ei[:, start:start + e] - off, it["edge_index" + s])
            start += e
    with pytest.raises(ValueError):
        collate([])
