"""The trainer's view of the loader: :class:`StatefulLoader`, a torch DataLoader over
:class:`shards.stream.loader.BatchStream` with ``state_dict()`` / ``load_state_dict()``.

DataLoader workers split steps (worker w takes the w-th, (w+k)-th, ... step after the state it starts
from) and the DataLoader interleaves them back in order, so batches do not depend on ``num_workers``. A
worker hands each batch over with the planner state after it; the loader keeps the state of the last batch
it gave the trainer (never of a batch still prefetched), so a checkpoint taken between steps resumes
exactly after the last step.
The loader's state holds every rank's planner state; loading a state saved on another number of ranks
deals the rest of the global stream again (:func:`shards.stream.plan.redeal_states`).

A worker's stream counts only the samples its own steps left out (over the edge budget, corrupt), so the
loader sums the counts of each batch it hands out (``left_out``) and sets the batch's running counts and the
saved state from those sums: the counts are the same for any number of workers and go on after a resume.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from scd_train.config import DataConfig
from scd_train.dist import DistInfo, all_gather_json
from scd_train.views import ViewTransform
from shards.stream.loader import BatchStream
from shards.stream.plan import redeal_states

_META = ("step", "positions", "oversize", "oversize_reasons", "corrupt_skipped", "left_out", "keys")
STATE_VERSION = 1
log = logging.getLogger(__name__)


class StreamDataset(IterableDataset):
    """Yields ``(batch, planner state after it as JSON text)`` of one rank, starting after ``state`` when given
    (JSON text crosses the worker boundary as one string, untouched by the DataLoader's conversion)."""

    def __init__(self, cfg: DataConfig, world_size: int, rank: int, state: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.cfg, self.world_size, self.rank, self.state = cfg, world_size, rank, state

    def __iter__(self) -> Iterator[tuple[dict[str, Any], str]]:
        info = get_worker_info()
        worker, n = (info.id, info.num_workers) if info else (0, 1)
        stream = make_stream(self.cfg, world_size=self.world_size, rank=self.rank, worker=worker, num_workers=n)
        if self.state is not None:
            stream.load_state_dict(self.state)
        for batch in stream:
            yield batch, json.dumps(stream.state_dict())


class StatefulLoader:
    """This rank's batches in step order, and the state of the whole stream (every rank's planner state).

    ``state_dict()`` gathers from every rank (all ranks call it, as the checkpointer does);
    ``load_state_dict()`` takes such a state before iteration starts, from this world size or another."""

    def __init__(self, cfg: DataConfig, info: DistInfo, num_workers: int = 0) -> None:
        self.cfg, self.info, self.num_workers = cfg, info, num_workers
        self._state: dict[str, Any] | None = None  # this rank's planner state after the last batch handed out
        self._text: str | None = None
        self.left_out = {"edges": 0, "corrupt": 0}  # this rank's samples left out so far, summed over batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dataset = StreamDataset(self.cfg, self.info.world_size, self.info.rank, self.rank_state())
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=4 if self.num_workers else None, persistent_workers=False)
        for batch, text in loader:
            self._text, self._state = text, None
            yield self._with_totals(batch)

    def _with_totals(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with this rank's running left-out counts in place of its worker's."""
        edges = self.left_out["edges"] = self.left_out["edges"] + int(batch["left_out"]["edges"])
        corrupt = self.left_out["corrupt"] = self.left_out["corrupt"] + int(batch["left_out"]["corrupt"])
        atoms = int(batch["oversize_reasons"]["atoms"])
        return {**batch, "oversize": atoms + edges, "oversize_reasons": {"atoms": atoms, "edges": edges},
                "corrupt_skipped": corrupt}

    def rank_state(self) -> dict[str, Any] | None:
        """This rank's planner state after the last batch handed out, with its left-out counts (None before
        the first batch)."""
        if self._state is None and self._text is not None:
            self._state = {**json.loads(self._text), "edge_oversize": self.left_out["edges"],
                           "corrupt_skipped": self.left_out["corrupt"]}
        return self._state

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "world_size": self.info.world_size,
                "ranks": all_gather_json(self.rank_state(), self.info)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ranks = state.get("ranks") if isinstance(state, dict) else None
        if not isinstance(ranks, list) or not ranks:
            raise ValueError("loader state: 'ranks' must be a non-empty list of planner states")
        if int(state.get("version", 1)) > STATE_VERSION:
            raise ValueError(f"loader state version {state['version']} is newer than this version reads "
                             f"({STATE_VERSION})")
        if any(r is None for r in ranks):
            if not all(r is None for r in ranks):
                raise ValueError("loader state: some ranks have a planner state and others none")
            self._state = self._text = None
            return
        if len(ranks) != self.info.world_size:
            if self.info.is_main:
                log.warning("resuming a stream saved on %d ranks on %d ranks: the positions not yet taken are "
                            "dealt again; every sample of the pass is still seen once, batches differ from an "
                            "uninterrupted run", len(ranks), self.info.world_size)
            ranks = redeal_states(ranks, self.info.world_size)
        self._state, self._text = ranks[self.info.rank], None
        self.left_out = {"edges": int(self._state.get("edge_oversize", 0)),
                         "corrupt": int(self._state.get("corrupt_skipped", 0))}


def to_torch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """numpy arrays -> tensors on ``device`` (pinned and non-blocking on GPU); metadata passes through."""
    out: dict[str, Any] = {}
    pin = device.type == "cuda"
    for k, v in batch.items():
        if isinstance(v, (np.ndarray, torch.Tensor)) and k not in _META:
            t = torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
            if pin:
                t = t.pin_memory()
            out[k] = t.to(device, non_blocking=pin)
        else:
            out[k] = v
    return out


def make_stream(cfg: DataConfig, *, world_size: int = 1, rank: int = 0, worker: int = 0,
                num_workers: int = 1) -> BatchStream:
    """The loader's batch stream with the SCD views of ``cfg.views`` as its per-sample transform."""
    views = ViewTransform(cfg.views)
    return BatchStream(cfg, transform=views, repeat=views.repeat_spec(), world_size=world_size, rank=rank,
                       worker=worker, num_workers=num_workers)
