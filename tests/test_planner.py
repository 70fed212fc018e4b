"""The batch planner: exactly-once passes across ranks, determinism, exact resume, mixture accuracy,
atom budgets, trajectory caps, equal steps per rank, and the preview CLI (local and http)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from shards.mixture import MixtureConfig, group_probabilities
from shards.plan import Planner, SampleTable, build_table
from shards.manifest import write_dataset
from shards.reader import ShardDataset
from shards.writer import WriterConfig

DOMAINS = ["molecule", "protein", "crystal", "md"]


def _table(m: int = 20000, seed: int = 0) -> SampleTable:
    rng = np.random.default_rng(seed)
    dom = rng.choice(4, m, p=[0.7, 0.05, 0.15, 0.1]).astype(np.int16)
    n_atoms = np.select([dom == 0, dom == 1, dom == 2], [rng.integers(3, 30, m), rng.integers(300, 5000, m),
                                                         rng.integers(1, 200, m)], rng.integers(10, 60, m))
    traj = np.where(dom == 3, rng.integers(1, 40, m), 0).astype(np.uint64)
    z = np.zeros(m, np.int64)
    return SampleTable(dataset=z.astype(np.int16), shard=z.astype(np.int32), offset=np.arange(m), size=z,
                       n_atoms=n_atoms.astype(np.int32), domain=dom, source=dom.copy(), trajectory=traj,
                       domain_names=DOMAINS, source_names=[f"src{i}" for i in range(4)])


def _run(planner: Planner, steps: int) -> list[np.ndarray]:
    return [planner.next_batch().rows for _ in range(steps)]


def test_every_sample_once_per_pass_across_ranks():
    t = _table(3000)
    t.domain[:] = 0
    t.n_atoms[:] = np.minimum(t.n_atoms, 50)
    world = 2
    planners = [Planner(t, MixtureConfig(), seed=5, world_size=world, rank=r, max_atoms=400) for r in range(world)]
    per_rank = []
    for p in planners:
        rows: list[int] = []
        while len(rows) < len(t) // world:
            rows += p.next_batch().rows.tolist()
        per_rank.append(rows[: len(t) // world])
    union = np.concatenate(per_rank)
    assert sorted(union.tolist()) == list(range(len(t)))
    assert not set(per_rank[0]) & set(per_rank[1])


def test_same_seed_same_batches_other_seed_differs():
    t = _table()
    a = _run(Planner(t, MixtureConfig(), seed=1, max_atoms=2000), 30)
    b = _run(Planner(t, MixtureConfig(), seed=1, max_atoms=2000), 30)
    c = _run(Planner(t, MixtureConfig(), seed=2, max_atoms=2000), 30)
    assert all((x == y).all() for x, y in zip(a, b))
    assert any(x.shape != y.shape or (x != y).any() for x, y in zip(a, c))


@pytest.mark.parametrize("k", [0, 1, 7, 40])
def test_resume_equals_uninterrupted(k):
    t = _table()
    mix = MixtureConfig(strategy="temperature", temperature=2.0, max_frames_per_trajectory=3)
    full = _run(Planner(t, mix, seed=3, world_size=2, rank=1, max_atoms=3000), k + 25)
    first = Planner(t, mix, seed=3, world_size=2, rank=1, max_atoms=3000)
    _run(first, k)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = Planner(t, mix, seed=3, world_size=2, rank=1, max_atoms=3000)
    resumed.load_state_dict(state)
    rest = _run(resumed, 25)
    assert all((x == y).all() for x, y in zip(full[k:], rest))


def test_resume_with_other_world_size_is_refused():
    t = _table()
    p = Planner(t, MixtureConfig(), seed=0, world_size=2, rank=0)
    q = Planner(t, MixtureConfig(), seed=0, world_size=4, rank=0)
    with pytest.raises(ValueError, match="world_size"):
        q.load_state_dict(p.state_dict())


@pytest.mark.parametrize("mix", [
    MixtureConfig(strategy="proportions", weights={"molecule": 4, "protein": 1, "crystal": 3, "md": 2},
                  crop_protein_atoms=2000),
    MixtureConfig(strategy="temperature", temperature=3.0, crop_protein_atoms=2000),
    MixtureConfig(strategy="weights", weights={"crystal": 5.0}, crop_protein_atoms=2000),
])
def test_realised_mix_within_two_points(mix):
    t = _table()
    p = Planner(t, mix, seed=11, max_atoms=4000)
    while p.seen.sum() < 10_000:
        p.next_batch()
    target, real = p.target_mix(), p.realised_mix()
    assert all(abs(target[g] - real[g]) < 0.02 for g in target), (target, real)


def test_group_probabilities():
    sizes = {"a": 100, "b": 900}
    assert group_probabilities(MixtureConfig(), sizes) == pytest.approx({"a": 0.1, "b": 0.9})
    assert group_probabilities(MixtureConfig(strategy="temperature", temperature=1e9), sizes) == \
        pytest.approx({"a": 0.5, "b": 0.5}, abs=1e-6)
    assert group_probabilities(MixtureConfig(strategy="proportions", weights={"a": 3, "b": 1}), sizes) == \
        pytest.approx({"a": 0.75, "b": 0.25})


def test_budget_never_exceeded_and_oversize_reported():
    t = _table()
    p = Planner(t, MixtureConfig(), seed=0, max_atoms=1000)
    batches = [p.next_batch() for _ in range(200)]
    assert all(0 < b.n_atoms <= 1000 for b in batches)
    assert p.oversize > 0, "proteins above the budget must be counted"
    q = Planner(t, MixtureConfig(crop_protein_atoms=800), seed=0, max_atoms=1000)
    batches = [q.next_batch() for _ in range(200)]
    assert q.oversize == 0 and any(b.crop.any() for b in batches)
    assert all(b.n_atoms <= 1000 for b in batches)


def test_trajectory_cap_per_pass():
    t = _table(4000)
    cap = 2
    p = Planner(t, MixtureConfig(group_by="domain", max_frames_per_trajectory=cap), seed=0, max_atoms=500)
    md = p.groups[p.group_names.index("md")]
    n_traj = len(np.unique(t.trajectory[t.trajectory != 0]))
    assert md.n <= cap * n_traj
    pass0 = md.units_at(np.arange(md.n))
    assert len(set(pass0.tolist())) == md.n
    _, counts = np.unique(t.trajectory[pass0], return_counts=True)
    assert counts.max() <= cap
    pass1 = md.units_at(np.arange(md.n, 2 * md.n))
    assert set(pass0.tolist()) != set(pass1.tolist()), "a new pass draws other frames"


def test_equal_steps_per_rank_with_unequal_data():
    t = _table(7)
    steps = [len(_run(Planner(t, MixtureConfig(), seed=0, world_size=3, rank=r, max_atoms=5000), 50))
             for r in range(3)]
    assert steps == [50, 50, 50]


@pytest.fixture(scope="module")
def mixed_dataset(real_graphs, tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed") / "ds"
    write_dataset(real_graphs, root, config=WriterConfig(max_shard_samples=30))
    return root


def _preview(*args: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "shards.cli", "shards", "preview", *args, "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_preview_state_round_trip(mixed_dataset, tmp_path):
    state = tmp_path / "state.json"
    full = _preview(str(mixed_dataset), "--steps", "8", "--max-atoms", "500", "--seed", "4")
    head = _preview(str(mixed_dataset), "--steps", "3", "--max-atoms", "500", "--seed", "4",
                    "--state-out", str(state))
    tail = _preview(str(mixed_dataset), "--steps", "5", "--max-atoms", "500", "--seed", "4",
                    "--state-in", str(state))
    assert head[:-1] + tail[:-1] == full[:-1]
    assert full[-1]["oversize"] > 0  # the 3,341-atom protein does not fit 500 atoms
    assert all(s["atoms"] <= 500 for s in full[:-1])


def test_preview_over_http_equals_local(mixed_dataset, http_root):
    import shutil

    base, folder = http_root
    shutil.copytree(mixed_dataset, folder / "ds")
    local = _preview(str(mixed_dataset), "--steps", "4", "--max-atoms", "800")
    remote = _preview(f"{base}/ds", "--steps", "4", "--max-atoms", "800")
    assert local == remote


def test_table_from_datasets(mixed_dataset, real_graphs):
    t = build_table([ShardDataset(str(mixed_dataset)), ShardDataset(str(mixed_dataset))])
    assert len(t) == 2 * len(real_graphs)
    assert set(t.domain_names) == {"molecule", "crystal", "protein"}
    assert t.n_atoms.max() == 3341
