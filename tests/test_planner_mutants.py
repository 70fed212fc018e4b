"""Planner: the per-pass randomness (trajectory frame cap, block order) depends on the seed and the pass,
passes read whole unit blocks window by window, and ``build_table`` maps every dataset's codes onto one table.

The layout constants are the documented ones (blocks of 1024 units, windows of 8 blocks), written out here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shards.format.manifest import write_dataset
from shards.format.reader import ShardDataset
from shards.format.schema import AtomGraph
from shards.format.writer import WriterConfig
from shards.stream.mixture import MixtureConfig
from shards.stream.plan import Planner, RepeatSpec, SampleTable, build_table

UNIT_BLOCK, WINDOW = 1024, 8


def _one_domain(m: int, traj: np.ndarray | None = None, domain: str = "md") -> SampleTable:
    """m one-atom samples of one domain: with ``max_atoms`` = the pass length, batch k is exactly pass k."""
    z = np.zeros(m, np.int64)
    return SampleTable(dataset=z.astype(np.int16), shard=z.astype(np.int32), offset=np.arange(m), size=z,
                       n_atoms=np.ones(m, np.int32), domain=z.astype(np.int16), source=z.astype(np.int16),
                       trajectory=(z if traj is None else traj).astype(np.uint64), domain_names=[domain],
                       source_names=["src"])


def _passes(table: SampleTable, per_pass: int, n: int, *, seed: int, cap: int | None = None) -> list[np.ndarray]:
    p = Planner(table, MixtureConfig(max_frames_per_trajectory=cap), seed=seed, max_atoms=per_pass)
    return [p.next_batch().rows for _ in range(n)]


def _capped_table() -> tuple[SampleTable, np.ndarray]:
    # trajectories 1..3 with 40 frames each, trajectory 4 with 2 frames (under the cap), 5 plain samples
    traj = np.r_[np.repeat([1, 2, 3], 40), [4, 4], np.zeros(5, np.int64)]
    return _one_domain(traj.size, traj), traj


def test_frame_cap_keeps_cap_frames_per_trajectory_and_every_plain_sample_each_pass():
    table, traj = _capped_table()
    cap = 5
    per_pass = 3 * cap + 2 + 5  # short trajectories keep all their frames; plain samples are never capped
    for rows in _passes(table, per_pass, 4, seed=3, cap=cap):
        assert rows.size == per_pass and len(set(rows.tolist())) == per_pass
        kept = dict(zip(*np.unique(traj[rows], return_counts=True), strict=True))
        assert kept == {0: 5, 1: cap, 2: cap, 3: cap, 4: 2}


def test_frame_cap_draw_depends_on_seed_and_pass():
    table, _ = _capped_table()
    per_pass = 3 * 5 + 2 + 5

    def kept(seed: int) -> list[frozenset[int]]:
        return [frozenset(r.tolist()) for r in _passes(table, per_pass, 3, seed=seed, cap=5)]

    a, again, other = kept(0), kept(0), kept(1)
    assert a == again, "same seed, same frames"
    assert a[0] != a[1] and a[1] != a[2], "each pass draws other frames"
    # 5 of 40 frames in 3 trajectories: the chance that two seeds keep the same frames is ~1e-20 per pass
    assert all(x != y for x, y in zip(a, other, strict=True)), "another seed draws other frames"


def test_passes_read_whole_blocks_window_by_window_in_a_new_order_each_pass():
    m = 20 * UNIT_BLOCK  # 20 blocks: windows of 8, 8 and 4 blocks
    table = _one_domain(m, domain="molecule")
    passes = _passes(table, m, 3, seed=11)
    firsts = []
    for rows in passes:
        assert np.array_equal(np.sort(rows), np.arange(m)), "every sample once per pass"
        blocks = rows // UNIT_BLOCK
        bounds = [0, WINDOW * UNIT_BLOCK, 2 * WINDOW * UNIT_BLOCK, m]
        seen: set[int] = set()
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            ids, counts = np.unique(blocks[lo:hi], return_counts=True)
            assert (counts == UNIT_BLOCK).all(), "a window holds whole blocks"
            assert ids.size == (hi - lo) // UNIT_BLOCK and not seen & set(ids.tolist())
            seen |= set(ids.tolist())
            assert not np.array_equal(rows[lo:hi], np.sort(rows[lo:hi])), "shuffled inside the window"
        firsts.append(frozenset(blocks[:WINDOW * UNIT_BLOCK].tolist()))
    # the block order is drawn per pass: the blocks of the first window differ from pass to pass
    assert firsts[0] != firsts[1] and firsts[1] != firsts[2]
    assert firsts[0] != frozenset(_passes(table, m, 1, seed=12)[0][:WINDOW * UNIT_BLOCK] // UNIT_BLOCK)


def test_partial_last_block_is_read_once_per_pass():
    m = 9 * UNIT_BLOCK + 300  # a partial 10th block; two windows
    table = _one_domain(m, domain="molecule")
    for rows in _passes(table, m, 3, seed=5):
        assert np.array_equal(np.sort(rows), np.arange(m))
        tail = np.flatnonzero(rows >= 9 * UNIT_BLOCK)
        first_window = 8 * UNIT_BLOCK if tail.min() >= 8 * UNIT_BLOCK else 7 * UNIT_BLOCK + 300
        assert len(set((rows[:first_window] // UNIT_BLOCK).tolist())) == WINDOW


def _graph(key: str, domain: str, source: str, n: int) -> AtomGraph:
    pos = np.arange(3.0 * n).reshape(n, 3) * 1.5
    periodic = domain == "crystal"
    return AtomGraph(key=key, domain=domain, source=source, source_file=f"{source}.x", index=0,
                     atomic_numbers=np.full(n, 6), positions=pos,
                     cell=np.eye(3) * 3.0 * n if periodic else np.zeros((3, 3)), pbc=np.full(3, periodic))


@pytest.fixture()
def two_datasets(tmp_path: Path) -> tuple[list[ShardDataset], list[list[tuple[str, str, int]]]]:
    specs = [
        [("a0", "molecule", "qm9", 3), ("a1", "crystal", "cod", 4), ("a2", "molecule", "qm9", 5)],
        [("b0", "protein", "pdb", 7), ("b1", "crystal", "mp", 2), ("b2", "molecule", "qm9", 6),
         ("b3", "protein", "pdb", 8)],
    ]
    out = []
    for i, spec in enumerate(specs):
        root = tmp_path / f"ds{i}"
        write_dataset([_graph(*s) for s in spec], root, config=WriterConfig(max_shard_samples=2))
        out.append(ShardDataset(str(root)))
    return out, specs


def test_build_table_maps_every_dataset_onto_shared_codes(two_datasets):
    datasets, specs = two_datasets
    t = build_table(datasets)
    assert len(t) == 7
    assert t.dataset.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert sorted(t.domain_names) == ["crystal", "molecule", "protein"]
    assert len(t.source_names) == len(set(t.source_names)) == 4
    # rows follow each dataset's index order; compare as multisets per dataset with the specs
    for d, spec in enumerate(specs):
        sel = t.dataset == d
        got = sorted(zip((t.domain_names[c] for c in t.domain[sel]), (t.source_names[c] for c in t.source[sel]),
                         t.n_atoms[sel].tolist(), strict=True))
        assert got == sorted((dom, src, n) for _, dom, src, n in spec)
    assert t.checksum is not None and t.checksum.size == 7 and np.unique(t.checksum).size == 7
    assert (t.size > 0).all() and t.shard.max() == 1
    # the documented column types keep a table of millions of rows small
    assert (t.dataset.dtype, t.domain.dtype, t.source.dtype) == (np.int16, np.int16, np.int16)


def test_windows_are_shuffled_independently():
    """Two full windows of a pass do not share one within-window shuffle pattern."""
    m = 16 * UNIT_BLOCK
    rows = _passes(_one_domain(m, domain="molecule"), m, 1, seed=2)[0]
    w = WINDOW * UNIT_BLOCK
    assert not np.array_equal(rows[:w] % UNIT_BLOCK, rows[w:2 * w] % UNIT_BLOCK)


def test_group_by_source_draws_by_source_names():
    """Grouped by source, the weights name sources: the rows emitted come only from the weighted source,
    although every domain holds rows of it and of the others."""
    m = 600
    src = np.arange(m) % 3
    dom = (np.arange(m) // 3) % 2
    z = np.zeros(m, np.int64)
    table = SampleTable(dataset=z.astype(np.int16), shard=z.astype(np.int32), offset=np.arange(m), size=z,
                        n_atoms=np.ones(m, np.int32), domain=dom.astype(np.int16), source=src.astype(np.int16),
                        trajectory=z.astype(np.uint64), domain_names=["molecule", "crystal"],
                        source_names=["qm9", "cod", "mp"])
    mix = MixtureConfig(strategy="proportions", group_by="source", weights={"cod": 1.0}, default_weight=0.0)
    p = Planner(table, mix, seed=0, max_atoms=50)
    assert p.group_names == ["qm9", "cod", "mp"]
    rows = np.concatenate([p.next_batch().rows for _ in range(10)])
    assert rows.size == 500 and set(src[rows].tolist()) == {1} and set(dom[rows].tolist()) == {0, 1}


def test_cell_repeats_leave_unhit_axes_at_one():
    """Each axis of a repeatable structure is repeated with probability p (2..max_repeat times), else once."""
    m = 1000
    z = np.zeros(m, np.int64)
    table = SampleTable(dataset=z.astype(np.int16), shard=z.astype(np.int32), offset=np.arange(m), size=z,
                        n_atoms=np.ones(m, np.int32), domain=z.astype(np.int16), source=z.astype(np.int16),
                        trajectory=z.astype(np.uint64), domain_names=["crystal"], source_names=["cod"])
    p = Planner(table, MixtureConfig(), seed=4, max_atoms=500, repeat=RepeatSpec(p=0.3, max_repeat=3))
    reps = np.concatenate([b.repeats for b in (p.next_batch() for _ in range(40))])
    assert reps.shape[0] >= 1000
    once = float((reps == 1).mean())
    assert 0.6 < once < 0.8, once  # 1 - p = 0.7 per axis (27 atoms at most: the budget never forces 1s)
    assert set(np.unique(reps).tolist()) == {1, 2, 3}
