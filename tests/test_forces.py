"""Energy + forces: forces are -dE/dx, stress is the strain derivative, both equivariant, for every
registered backbone; element references; splits by trajectory; fine-tuning lowers the force error."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from scd_train.finetune import FinetuneConfig, SplitConfig, finetune, make_splits
from scd_train.forcefield import EnergyModel, atom_batches, fit_element_references, graph_item, structure_batch
from scd_train.models import BACKBONE_CONFIGS
from scd_train.objectives import ObjectiveConfig, build_objective

CUTOFF = 3.2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small graphs: one intra-op thread is fastest and immune to oversubscribed CI machines."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

TINY = {"hidden": 32, "layers": 2, "num_rbf": 8, "cutoff": CUTOFF, "drop_path": 0.0}


def _model(backbone: str, seed: int = 0) -> EnergyModel:
    fields = {f.name for f in dataclasses.fields(BACKBONE_CONFIGS[backbone])}
    heads = 4 if "heads" in fields else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        obj = build_objective(ObjectiveConfig(backbone=backbone, heads=heads, **TINY))
        model = EnergyModel(obj, scale=0.5)
        torch.nn.init.normal_(model.head[-1].weight, std=0.5)  # the head starts at zero for training
    return model.double().eval()


def _molecule(seed: int = 0, n: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.choice([1, 6, 8], size=n), rng.normal(scale=1.1, size=(n, 3)), np.zeros((3, 3)), np.zeros(3, bool)


def _triclinic(seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    cell = np.array([[3.4, 0.0, 0.0], [0.9, 3.1, 0.0], [0.6, -0.7, 3.6]])  # skewed, lower triangular
    frac = rng.random((5, 3))
    return rng.choice([13, 29], size=5), frac @ cell, cell, np.ones(3, bool)


def _run(model: EnergyModel, z, pos, cell, pbc, stress: bool = False) -> dict[str, np.ndarray]:
    batch = structure_batch([graph_item(z, pos, cell, pbc, CUTOFF)], torch.device("cpu"), torch.float64)
    out = model(batch, forces=True, stress=stress)
    return {k: v.detach().numpy() for k, v in out.items()}


def _energy(model, z, pos, cell, pbc) -> float:
    return float(_run(model, z, pos, cell, pbc)["energy"][0])


BACKBONES = pytest.mark.parametrize("backbone", sorted(BACKBONE_CONFIGS))
SYSTEMS = pytest.mark.parametrize("system", [_molecule, _triclinic], ids=["molecule", "triclinic"])


@BACKBONES
@SYSTEMS
def test_forces_are_minus_finite_difference_gradient(backbone, system) -> None:
    model = _model(backbone)
    z, pos, cell, pbc = system()
    forces = _run(model, z, pos, cell, pbc)["forces"]
    h = 1e-5
    fd = np.zeros_like(pos)
    for i in range(pos.shape[0]):
        for k in range(3):
            up, down = pos.copy(), pos.copy()
            up[i, k] += h
            down[i, k] -= h
            fd[i, k] = -(_energy(model, z, up, cell, pbc) - _energy(model, z, down, cell, pbc)) / (2 * h)
    assert np.abs(forces).max() > 1e-3  # not trivially zero
    np.testing.assert_allclose(forces, fd, atol=1e-8, rtol=1e-6)


@BACKBONES
def test_stress_is_strain_derivative(backbone) -> None:
    model = _model(backbone)
    z, pos, cell, pbc = _triclinic()
    stress = _run(model, z, pos, cell, pbc, stress=True)["stress"][0]
    volume = abs(np.linalg.det(cell))
    h = 1e-6
    fd = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            eps = np.zeros((3, 3))
            eps[i, j] += h / 2
            eps[j, i] += h / 2
            ep = _energy(model, z, pos @ (np.eye(3) + eps), cell @ (np.eye(3) + eps), pbc)
            em = _energy(model, z, pos @ (np.eye(3) - eps), cell @ (np.eye(3) - eps), pbc)
            fd[i, j] = (ep - em) / (2 * h) / volume
    assert np.abs(stress).max() > 1e-5
    np.testing.assert_allclose(stress, fd, atol=1e-8, rtol=1e-5)
    np.testing.assert_allclose(stress, stress.T, atol=1e-12)
    assert np.isnan(_run(model, *_molecule(), stress=True)["stress"]).all()  # no stress without a 3D cell


def _orthogonal(seed: int, reflect: bool) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q @ np.diag([1.0, 1.0, -1.0]) if reflect else q


@BACKBONES
@SYSTEMS
@pytest.mark.parametrize("reflect", [False, True], ids=["rotation", "reflection"])
def test_forces_rotate_energy_and_stress_invariant(backbone, system, reflect) -> None:
    model = _model(backbone)
    z, pos, cell, pbc = system()
    rot = _orthogonal(5, reflect)
    periodic = bool(pbc.any())
    a = _run(model, z, pos, cell, pbc, stress=periodic)
    shift = np.array([0.3, -1.2, 2.0])
    b = _run(model, z, pos @ rot.T + shift, cell @ rot.T, pbc, stress=periodic)
    np.testing.assert_allclose(b["energy"], a["energy"], rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(b["forces"], a["forces"] @ rot.T, atol=1e-10)
    if periodic:
        np.testing.assert_allclose(b["stress"][0], rot @ a["stress"][0] @ rot.T, atol=1e-10)
        # a lattice translation of one atom changes nothing
        moved = pos.copy()
        moved[2] += cell[1] - cell[0]
        np.testing.assert_allclose(_run(model, z, moved, cell, pbc)["forces"], a["forces"], atol=1e-10)


@BACKBONES
def test_batched_equals_single(backbone) -> None:
    model = _model(backbone)
    systems = [_molecule(0), _triclinic(1), _molecule(2, n=5)]
    items = [graph_item(*s, CUTOFF) for s in systems]
    out = model(structure_batch(items, torch.device("cpu"), torch.float64), forces=True)
    singles = [_run(model, *s) for s in systems]
    np.testing.assert_allclose(out["energy"].detach().numpy(), [s["energy"][0] for s in singles], rtol=1e-12)
    np.testing.assert_allclose(out["forces"].detach().numpy(), np.concatenate([s["forces"] for s in singles]),
                               atol=1e-12)


def test_element_references_recover_known_energies() -> None:
    rng = np.random.default_rng(0)
    true = {1: -13.6, 6: -1029.1, 8: -2041.3}
    numbers = [rng.choice(list(true), size=rng.integers(3, 12)) for _ in range(40)]
    energies = np.array([sum(true[int(z)] for z in zs) for zs in numbers]) + rng.normal(scale=1e-3, size=40)
    ref = fit_element_references(numbers, energies)
    for z, e in true.items():
        assert ref[z] == pytest.approx(e, abs=5e-3)
    assert ref[7] == 0.0 and ref.shape == (119,)


def test_atom_batches_respect_budget() -> None:
    sizes = [5, 7, 3, 20, 1, 1, 9]
    groups = atom_batches(sizes, 10)
    assert [i for g in groups for i in g] == list(range(len(sizes)))
    assert groups == [[0], [1, 2], [3], [4, 5], [6]]
    assert all(sum(sizes[i] for i in g) <= 10 or len(g) == 1 for g in groups)


def test_split_by_trajectory_keeps_trajectories_whole() -> None:
    keys = [f"t{t}-f{f:03d}" for t in range(6) for f in range(10)]
    groups = {k: k.split("-")[0] for k in keys}
    split = SplitConfig(train=30, val=10, test=10, seed=3, by="trajectory")
    a = make_splits(keys, split, groups)
    b = make_splits(list(reversed(keys)), split, groups)
    assert a == b
    trajs = {p: {groups[k] for k in a[p]} for p in a}
    assert not (trajs["train"] & trajs["val"] or trajs["train"] & trajs["test"] or trajs["val"] & trajs["test"])
    assert [len(a[p]) for p in ("train", "val", "test")] == [30, 10, 10]
    with pytest.raises(ValueError, match="cannot fill test"):
        make_splits(keys, SplitConfig(train=40, val=20, test=10, by="trajectory"), groups)


@pytest.fixture(scope="module")
def cu_md(tmp_path_factory):
    """Two short EMT Langevin trajectories of an 8-atom periodic Cu cell, as a shard dataset."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from scd_train.mdgen import langevin_frames
    from shards.format.manifest import write_dataset
    from shards.format.schema import AtomGraph, make_key

    root = tmp_path_factory.mktemp("cu") / "md"
    graphs = []
    for t in range(2):
        frames = langevin_frames(bulk("Cu", "fcc", a=3.61) * (2, 2, 2), EMT(), frames=40, stride=4,
                                 temperature_K=900.0, timestep_fs=2.0, seed=t)
        graphs += [AtomGraph.from_ase(a, key=make_key("cu", f"traj{t}", i), domain="md", source="cu",
                                      source_file=f"traj{t}", index=i, trajectory_id=f"traj{t}")
                   for i, a in enumerate(frames)]
    write_dataset(graphs, root)
    return root


def ef_config(data, out, **kw) -> FinetuneConfig:
    base = dict(data=str(data), out=str(out), task="energy_forces",
                model=ObjectiveConfig(hidden=32, layers=2, heads=4, num_rbf=8, cutoff=4.0),
                split=SplitConfig(48, 16, 16, seed=0), epochs=8, patience=8, batch_size=4, progress=False)
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.mark.slow
def test_energy_forces_finetune_lowers_validation_force_error(cu_md, tmp_path) -> None:
    from ase.build import bulk
    from ase.calculators.emt import EMT

    r = finetune(ef_config(cu_md, tmp_path / "a"), log=lambda *_: None)
    first, best = r["curve"][0]["val"], r["val"]
    assert best["force_mae_meV_per_A"] < 0.7 * first["force_mae_meV_per_A"]
    assert r["n"] == {"train": 48, "val": 16, "test": 16} and r["elements"] == [29]
    for part in ("val", "test"):
        assert set(r[part]) == {"energy_mae_meV", "energy_mae_meV_per_atom", "force_mae_meV_per_A"}
        assert r[part]["energy_mae_meV_per_atom"] == pytest.approx(r[part]["energy_mae_meV"] / 8)
    saved = json.loads((tmp_path / "a" / "result.json").read_text())
    assert saved["test"] == r["test"] and len(saved["curve"]) == 9
    assert (tmp_path / "a" / "learning_curve.png").stat().st_size > 1000
    # the reference energy is the EMT energy per atom of the training frames (one composition)
    meta = json.loads((tmp_path / "a" / "forcefield.json").read_text())
    atoms = bulk("Cu", "fcc", a=3.61) * (2, 2, 2)
    atoms.calc = EMT()
    assert abs(meta["element_ref_eV"]["29"] - atoms.get_potential_energy() / 8) < 0.1


def test_energy_forces_finetune_is_deterministic(cu_md, tmp_path) -> None:
    runs = [finetune(ef_config(cu_md, tmp_path / name, epochs=1, save_model=False), log=lambda *_: None)
            for name in "ab"]
    assert runs[0]["test"] == runs[1]["test"] and runs[0]["curve"] == runs[1]["curve"]
    other = finetune(ef_config(cu_md, tmp_path / "c", epochs=1, save_model=False, seed=1), log=lambda *_: None)
    assert other["test"] != runs[0]["test"]


def test_energy_forces_needs_labels(tmp_path) -> None:
    from ase.build import molecule

    from shards.format.manifest import write_dataset
    from shards.format.schema import AtomGraph

    write_dataset([AtomGraph.from_ase(molecule("H2O"), key="w-0", domain="molecule", source="w")], tmp_path / "d")
    with pytest.raises(ValueError, match="none of its 1 samples has both an energy and forces"):
        finetune(ef_config(tmp_path / "d", tmp_path / "o"), log=lambda *_: None)


@pytest.mark.slow
def test_tiny_md_study_end_to_end(tmp_path) -> None:
    """`scd study md` on a 40-frame xTB trajectory with a 1-layer model: every arm and seed, tables, files."""
    pytest.importorskip("tblite")
    import yaml

    from shards.tools.cli import main

    tiny = {"md": {"frames": 40}, "split": {"train": 24, "val": 8, "test": 8}, "pretrain_records": 200,
            "model": {"hidden": 16, "layers": 1, "heads": 2, "num_rbf": 8},
            "pretrain": {"steps": 3, "max_atoms": 150, "warmup_steps": 1},
            "finetune": {"epochs": 1, "patience": 1}, "seeds": [0, 1]}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    out = tmp_path / "study"
    assert main(["study", "md", "--out", str(out), "--config", str(tmp_path / "tiny.yaml")]) == 0
    table = (out / "results.md").read_text()
    for arm in ("scratch", "denoise", "scd"):
        assert f"| {arm} |" in table
        for seed in (0, 1):
            r = json.loads((out / "runs" / f"{arm}-seed{seed}" / "result.json").read_text())
            assert r["n"] == {"train": 24, "val": 8, "test": 8} and r["elements"] == [1, 6, 8]
    assert (out / "runs" / "scd-seed0" / "forcefield.json").is_file()
    assert (out / "learning_curves.png").stat().st_size > 1000
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert set(summary) == {"scratch", "denoise", "scd"} and len(summary["scd"]["test_force_mae_meV_per_A"]) == 2
