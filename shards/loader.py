"""The streaming loader the trainer asks for batches: planner -> fetch/decode -> SCD views -> collate.

Batches are a pure function of (datasets, mixture, seed, world size, rank, atom budget): DataLoader
workers split *steps* (worker w of k materialises the steps s with s % k == w, all of them run the
cheap planner), so the stream does not depend on the number of workers. Every batch carries the
sampler state after it (``batch["sampler_state"]``); loading that state resumes exactly after it.

Samples are left out of a batch, and counted, when they are larger than the atom budget (the planner,
``oversize_reasons["atoms"]``), when their graph is over the edge budget (``oversize_reasons["edges"]``,
each logged with its key and pair count), or when their bytes are corrupt and ``on_corrupt: skip``
(``corrupt_skipped``). ``oversize`` is the sum of the first two.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from shards.collate import collate
from shards.fetch import SampleFetcher, ShardCache
from shards.graph import EdgeBudgetError
from shards.mixture import MixtureConfig
from shards.plan import Planner, RepeatSpec, build_table
from shards.reader import ShardDataset, ShardError
from shards.views import ViewConfig, make_views

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoaderConfig:
    """Where the data is and how batches are formed (``data:`` in a training config)."""

    datasets: tuple[str, ...] = ()
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    seed: int = 0
    max_atoms: int = 4000
    cache_dir: str | None = None
    cache_bytes: int = 4 << 30
    on_corrupt: Literal["error", "skip"] = "error"


def make_planner(cfg: LoaderConfig, table: Any, world_size: int, rank: int) -> Planner:
    """The planner of a loader config (shared by the loader and ``scd shards preview``)."""
    v = cfg.views
    repeat = RepeatSpec(v.crystal_repeat_p, v.crystal_max_repeat, tuple(v.repeat_domains)) if v.noise else None
    return Planner(table, cfg.mixture, seed=cfg.seed, world_size=world_size, rank=rank,
                   max_atoms=cfg.max_atoms, repeat=repeat)


class BatchStream:
    """An infinite, deterministic stream of collated batches for one (rank, worker)."""

    def __init__(self, cfg: LoaderConfig, *, world_size: int = 1, rank: int = 0, worker: int = 0,
                 num_workers: int = 1) -> None:
        if not cfg.datasets:
            raise ValueError("no datasets given (data.datasets is empty)")
        self.cfg = cfg
        self.worker, self.num_workers = worker, num_workers
        self.datasets = [ShardDataset(d) for d in cfg.datasets]
        self.table = build_table(self.datasets)
        self.planner = make_planner(cfg, self.table, world_size, rank)
        self.fetcher = SampleFetcher(self.datasets, ShardCache(cfg.cache_dir, cfg.cache_bytes))
        self.corrupt_skipped = 0
        self.edge_oversize = 0

    def state_dict(self) -> dict[str, Any]:
        return self.planner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.planner.load_state_dict(state)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            plan = self.planner.next_batch()
            if plan.step % self.num_workers != self.worker:
                continue
            yield self.materialise(plan)

    def materialise(self, plan: Any) -> dict[str, Any]:
        t = self.table
        checksums = t.checksum
        assert checksums is not None, "tables built by build_table carry checksums"
        items = []
        cols = (plan.rows.tolist(), plan.atoms.tolist(), plan.crop.tolist(), plan.repeats)
        for row, n, crop, reps in zip(*cols, strict=True):
            try:
                g = self.fetcher.get(int(t.dataset[row]), int(t.shard[row]), int(t.offset[row]), int(t.size[row]),
                                     int(checksums[row]))
            except ShardError:
                if self.cfg.on_corrupt == "error":
                    raise
                self.corrupt_skipped += 1
                continue
            vcfg = dataclasses.replace(self.cfg.views, crop_atoms=n) if crop else self.cfg.views
            try:
                item = make_views(g, vcfg, self.cfg.seed, plan.step, repeats=reps)
            except EdgeBudgetError as exc:
                self.edge_oversize += 1
                log.warning("left out of step %d as oversize: sample %r: %s", plan.step, g.key, exc)
                continue
            item["domain_id"] = int(t.domain[row])
            item["key"] = g.key
            items.append(item)
        if not items:
            raise ValueError(f"step {plan.step}: all {len(plan.rows)} sample(s) of the batch were left out "
                             f"({self.edge_oversize} over the edge budget, {self.corrupt_skipped} corrupt so far); "
                             "raise data.views.max_edges_per_atom or fix the data")
        batch = collate(items)
        batch["step"] = plan.step
        batch["sampler_state"] = self.planner.state_dict()
        batch["oversize"] = self.planner.oversize + self.edge_oversize
        batch["oversize_reasons"] = {"atoms": self.planner.oversize, "edges": self.edge_oversize}
        batch["corrupt_skipped"] = self.corrupt_skipped
        return batch


def realised_mix_report(planner: Planner) -> dict[str, Any]:
    """Target and realised shares per group, oversize count: what the user checks before training."""
    return {"target": planner.target_mix(), "realised": planner.realised_mix(),
            "samples": int(np.sum(planner.seen)), "oversize": planner.oversize}
