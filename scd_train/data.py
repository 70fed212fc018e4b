"""The trainer's view of the loader: a torch IterableDataset over :class:`shards.stream.loader.BatchStream`.

DataLoader workers split steps (worker w takes steps s % k == w) and the DataLoader interleaves them
back in order, so batches do not depend on ``num_workers``.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from scd_train.config import DataConfig
from scd_train.views import ViewTransform
from shards.stream.loader import BatchStream

_META = ("step", "sampler_state", "oversize", "corrupt_skipped", "keys")


class StreamDataset(IterableDataset):
    """Yields collated numpy batches of one rank, starting after ``state`` when given."""

    def __init__(self, cfg: DataConfig, world_size: int, rank: int, state: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.cfg, self.world_size, self.rank, self.state = cfg, world_size, rank, state

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n = (info.id, info.num_workers) if info else (0, 1)
        stream = make_stream(self.cfg, world_size=self.world_size, rank=self.rank, worker=worker, num_workers=n)
        if self.state is not None:
            stream.load_state_dict(self.state)
        yield from stream


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


def make_loader(cfg: DataConfig, world_size: int, rank: int, num_workers: int,
                state: dict[str, Any] | None = None) -> DataLoader:
    """A DataLoader that yields this rank's batches in step order."""
    return DataLoader(StreamDataset(cfg, world_size, rank, state), batch_size=None, num_workers=num_workers,
                      prefetch_factor=4 if num_workers else None, persistent_workers=False)

