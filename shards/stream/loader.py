"""The streaming loader the trainer asks for batches: planner -> fetch/decode -> per-sample transform -> collate.

The transform is the objective's hook (the SCD views live in ``scd_train.views``): a callable
``transform(graph, ctx) -> dict of arrays`` given the decoded :class:`~shards.format.schema.AtomGraph` and a
:class:`SampleContext` (seed, step, the planner's crop and cell repeats). Without one, :func:`plain_arrays`
passes the structure through unchanged, so this layer knows nothing of any objective.

Batches are a pure function of (datasets, mixture, seed, world size, rank, atom budget): DataLoader
workers split *steps* (worker w of k materialises the w-th, (w+k)-th, ... step from where the stream
starts; all of them run the cheap planner), so the stream does not depend on the number of workers, and a
stream resumed at any step hands its next step to worker 0, the first the DataLoader reads from.
:meth:`BatchStream.state_dict`, taken after a batch is yielded, is the planner state after that batch;
loading it resumes exactly after it.
Each batch also names its samples (``keys``) and their global stream positions (``positions``).

Samples are left out of a batch, and counted, when they are larger than the atom budget (the planner,
``oversize_reasons["atoms"]``), when their graph is over the edge budget (``oversize_reasons["edges"]``,
each logged with its key and pair count), or when their bytes are corrupt and ``on_corrupt: skip``
(``corrupt_skipped``). ``oversize`` is the sum of the first two. These counts run over the whole stream and
are part of its state, so a resumed stream goes on counting; ``left_out`` has the counts of the batch alone
(from which a reader of several workers' batches sums its own totals, as the trainer's loader does).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from shards.format.reader import ShardDataset, ShardError
from shards.format.schema import AtomGraph
from shards.stream.collate import collate
from shards.stream.fetch import SampleFetcher, ShardCache
from shards.stream.graph import EdgeBudgetError
from shards.stream.mixture import MixtureConfig
from shards.stream.plan import Planner, RepeatSpec, build_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoaderConfig:
    """Where the data is and how batches are formed (``data:`` in a training config)."""

    datasets: tuple[str, ...] = ()
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    seed: int = 0
    max_atoms: int = 4000
    shuffle: Literal["windowed", "global", "none"] = "windowed"
    cache_dir: str | None = None
    cache_bytes: int = 4 << 30
    on_corrupt: Literal["error", "skip"] = "error"


@dataclass(frozen=True)
class SampleContext:
    """What a transform may use besides the graph: the run seed, the step, the planner's decisions.

    ``crop_atoms`` is the atom count to crop to (None: keep all); ``repeats`` the cell repeats per axis
    (1, 1, 1 when none), decided by the planner so that the atom budget counts the supercell.
    """

    seed: int
    step: int
    crop_atoms: int | None
    repeats: tuple[int, int, int]


Transform = Callable[[AtomGraph, SampleContext], dict[str, Any]]


def plain_arrays(g: AtomGraph, ctx: SampleContext) -> dict[str, Any]:
    """The default transform: the structure's arrays as stored (``z, pos, cell, pbc, n_atoms``), no graph."""
    if ctx.crop_atoms is not None or ctx.repeats != (1, 1, 1):
        raise ValueError(f"sample {g.key!r}: the planner asked for a crop or cell repeat; pass a transform that "
                         "makes them (for example scd_train.views.ViewTransform)")
    return {"z": g.atomic_numbers.astype(np.int64), "pos": g.positions.astype(np.float32),
            "cell": g.cell.astype(np.float32), "pbc": g.pbc.astype(bool), "n_atoms": np.int64(g.n_atoms)}


def make_planner(cfg: LoaderConfig, table: Any, world_size: int, rank: int,
                 repeat: RepeatSpec | None = None) -> Planner:
    """The planner of a loader config (shared by the loader and ``scd shards preview``)."""
    return Planner(table, cfg.mixture, seed=cfg.seed, world_size=world_size, rank=rank,
                   max_atoms=cfg.max_atoms, repeat=repeat, shuffle=cfg.shuffle)


class BatchStream:
    """An infinite, deterministic stream of collated batches for one (rank, worker).

    ``transform`` turns each decoded sample into the arrays of a batch item (default :func:`plain_arrays`);
    ``repeat`` lets the planner draw cell repeats (the transform must then make the supercells).
    """

    def __init__(self, cfg: LoaderConfig, *, transform: Transform = plain_arrays, repeat: RepeatSpec | None = None,
                 world_size: int = 1, rank: int = 0, worker: int = 0, num_workers: int = 1) -> None:
        if not cfg.datasets:
            raise ValueError("no datasets given (data.datasets is empty)")
        self.cfg = cfg
        self.worker, self.num_workers = worker, num_workers
        self.datasets = [ShardDataset(d) for d in cfg.datasets]
        self.table = build_table(self.datasets)
        self.transform = transform
        self.planner = make_planner(cfg, self.table, world_size, rank, repeat)
        self.fetcher = SampleFetcher(self.datasets, ShardCache(cfg.cache_dir, cfg.cache_bytes))
        self.corrupt_skipped = 0
        self.edge_oversize = 0

    def state_dict(self) -> dict[str, Any]:
        """The planner state after the last batch this stream yielded, with the stream's counts of samples
        left out over the edge budget and as corrupt (JSON-able)."""
        return {**self.planner.state_dict(), "edge_oversize": self.edge_oversize,
                "corrupt_skipped": self.corrupt_skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after ``state``; a state without the left-out counts (older ones) starts them at 0."""
        self.planner.load_state_dict(state)
        self.edge_oversize = int(state.get("edge_oversize", 0))
        self.corrupt_skipped = int(state.get("corrupt_skipped", 0))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        first: int | None = None
        while True:
            plan = self.planner.next_batch()
            first = plan.step if first is None else first
            if (plan.step - first) % self.num_workers != self.worker:
                continue
            yield self.materialise(plan)

    def materialise(self, plan: Any) -> dict[str, Any]:
        t = self.table
        checksums = t.checksum
        assert checksums is not None, "tables built by build_table carry checksums"
        items, positions = [], []
        edges_before, corrupt_before = self.edge_oversize, self.corrupt_skipped
        cols = (plan.rows.tolist(), plan.atoms.tolist(), plan.crop.tolist(), plan.repeats, plan.positions.tolist())
        for row, n, crop, reps, pos in zip(*cols, strict=True):
            try:
                g = self.fetcher.get(int(t.dataset[row]), int(t.shard[row]), int(t.offset[row]), int(t.size[row]),
                                     int(checksums[row]))
            except ShardError:
                if self.cfg.on_corrupt == "error":
                    raise
                self.corrupt_skipped += 1
                continue
            ctx = SampleContext(self.cfg.seed, plan.step, int(n) if crop else None,
                                (int(reps[0]), int(reps[1]), int(reps[2])))
            try:
                item = self.transform(g, ctx)
            except EdgeBudgetError as exc:
                self.edge_oversize += 1
                log.warning("left out of step %d as oversize: sample %r: %s", plan.step, g.key, exc)
                continue
            item["domain_id"] = int(t.domain[row])
            item["key"] = g.key
            items.append(item)
            positions.append(pos)
        if not items:
            raise ValueError(f"step {plan.step}: all {len(plan.rows)} sample(s) of the batch were left out "
                             f"({self.edge_oversize} over the edge budget, {self.corrupt_skipped} corrupt so far); "
                             "raise the edge budget (data.views.max_edges_per_atom) or fix the data")
        batch = collate(items)
        batch["step"] = plan.step
        batch["positions"] = positions
        batch["oversize"] = self.planner.oversize + self.edge_oversize
        batch["oversize_reasons"] = {"atoms": self.planner.oversize, "edges": self.edge_oversize}
        batch["corrupt_skipped"] = self.corrupt_skipped
        batch["left_out"] = {"edges": self.edge_oversize - edges_before,
                             "corrupt": self.corrupt_skipped - corrupt_before}
        return batch

