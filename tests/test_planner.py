"""The batch planner: exactly-once passes across ranks, determinism, exact resume, mixture accuracy,
atom budgets, trajectory caps, equal steps per rank, and the preview CLI (local and http)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from shards.format.manifest import write_dataset
from shards.format.reader import ShardDataset
from shards.format.writer import WriterConfig
from shards.stream.mixture import MixtureConfig, group_probabilities
from shards.stream.plan import Planner, SampleTable, build_table

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
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert any(x.shape != y.shape or (x != y).any() for x, y in zip(a, c, strict=True))


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
    assert all((x == y).all() for x, y in zip(full[k:], rest, strict=True))


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
def test_logged_mix_is_the_mix_of_emitted_rows(mix):
    """``realised_mix`` (what users read in the log) equals the domain shares of the rows really emitted,
    read from the table; the shares against hand-written targets are in test_mixture_oracle.py."""
    t = _table()
    p = Planner(t, mix, seed=11, max_atoms=4000)
    rows = []
    while sum(r.size for r in rows) < 10_000:
        rows.append(p.next_batch().rows)
    counts = np.bincount(t.domain[np.concatenate(rows)], minlength=len(DOMAINS))
    emitted = {d: counts[i] / counts.sum() for i, d in enumerate(DOMAINS)}
    assert p.realised_mix() == pytest.approx(emitted, abs=1e-12)
    target = p.target_mix()
    assert all(abs(target[g] - emitted[g]) < 0.02 for g in target), (target, emitted)


def test_group_probabilities():
    sizes = {"a": 100, "b": 900}
    assert group_probabilities(MixtureConfig(), sizes) == pytest.approx({"a": 0.1, "b": 0.9})
    assert group_probabilities(MixtureConfig(strategy="temperature", temperature=1e9), sizes) == \
        pytest.approx({"a": 0.5, "b": 0.5}, abs=1e-6)
    assert group_probabilities(MixtureConfig(strategy="proportions", weights={"a": 3, "b": 1}), sizes) == \
        pytest.approx({"a": 0.75, "b": 0.25})


def _index_atoms(t: SampleTable, b, crop_to: int | None) -> np.ndarray:
    """Atoms of each planned sample from the index: n_atoms, or the crop size when flagged, times repeats."""
    base = np.where(b.crop, crop_to if crop_to is not None else -1, t.n_atoms[b.rows])
    return base * b.repeats.prod(axis=1)


def test_budget_never_exceeded_and_oversize_reported():
    t = _table()
    fit = t.n_atoms <= 1000
    p = Planner(t, MixtureConfig(), seed=0, max_atoms=1000)
    batches = [p.next_batch() for _ in range(200)]
    for b in batches:
        assert not b.crop.any() and fit[b.rows].all(), "no sample above the budget is emitted uncropped"
        atoms = _index_atoms(t, b, None)
        assert 0 < atoms.sum() <= 1000 and (b.atoms == atoms).all()
    assert p.oversize > 0, "proteins above the budget must be counted"
    q = Planner(t, MixtureConfig(crop_protein_atoms=800), seed=0, max_atoms=1000)
    batches = [q.next_batch() for _ in range(200)]
    assert q.oversize == 0
    for b in batches:
        assert (t.n_atoms[b.rows][b.crop] > 1000).all() and (t.domain[b.rows][b.crop] == 1).all()
        assert fit[b.rows][~b.crop].all()
        assert 0 < _index_atoms(t, b, 800).sum() <= 1000
    assert sum(int(b.crop.sum()) for b in batches) > 0


def test_oversize_count_equals_the_big_samples_of_a_pass():
    """One domain, world size 1: the stream is pass after pass of a permutation of the table, so once every
    sample that fits was emitted once, the oversize counter holds the big samples of that pass (+ at most
    those read ahead from the next one) and the emitted rows are exactly the samples that fit."""
    m = 300
    n_atoms = np.where(np.arange(m) % 10 == 0, 900, 20 + np.arange(m) % 30).astype(np.int32)
    z = np.zeros(m, np.int64)
    t = SampleTable(dataset=z.astype(np.int16), shard=z.astype(np.int32), offset=np.arange(m), size=z,
                    n_atoms=n_atoms, domain=z.astype(np.int16), source=z.astype(np.int16),
                    trajectory=z.astype(np.uint64), domain_names=["protein"], source_names=["s"])
    p = Planner(t, MixtureConfig(), seed=4, max_atoms=500)
    n_fit, n_big = int((n_atoms <= 500).sum()), int((n_atoms > 500).sum())
    rows: list[int] = []
    while len(rows) < n_fit:
        b = p.next_batch()
        assert _index_atoms(t, b, None).sum() <= 500
        rows += b.rows.tolist()
    assert sorted(rows[:n_fit]) == np.flatnonzero(n_atoms <= 500).tolist()
    assert n_big <= p.oversize <= 2 * n_big
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


@pytest.mark.parametrize(("m", "world"), [(7, 3), (5, 4), (2, 3)])
def test_equal_steps_per_rank_with_unequal_data(m, world):
    """m samples over ``world`` ranks (m not a multiple of world, even m < world): every rank gives a
    non-empty batch at every one of 40 steps, and interleaving the ranks' rows gives the global stream,
    whose consecutive windows of m positions are each a permutation of the table (every sample once per pass)."""
    z = np.zeros(m, np.int64)
    t = SampleTable(dataset=z.astype(np.int16), shard=z.astype(np.int32), offset=np.arange(m), size=z,
                    n_atoms=np.full(m, 10, np.int32), domain=z.astype(np.int16), source=z.astype(np.int16),
                    trajectory=z.astype(np.uint64), domain_names=["molecule"], source_names=["s"])
    per_rank = []
    for r in range(world):
        p = Planner(t, MixtureConfig(), seed=0, world_size=world, rank=r, max_atoms=25)
        batches = _run(p, 40)
        assert [b.size for b in batches] == [2] * 40, "each step: one non-empty batch of 2 x 10 atoms"
        per_rank.append(np.concatenate(batches))
    stream = np.stack(per_rank, axis=1).reshape(-1)  # position i = rank i % world, its (i // world)-th row
    whole = stream[: stream.size // m * m].reshape(-1, m)
    assert all(sorted(w.tolist()) == list(range(m)) for w in whole)


@pytest.fixture(scope="module")
def mixed_dataset(real_graphs, tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed") / "ds"
    write_dataset(real_graphs, root, config=WriterConfig(max_shard_samples=30))
    return root


def _preview(*args: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "shards", "shards", "preview", *args, "--json"],
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
