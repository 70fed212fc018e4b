"""Seeded train/validation/test splits of labelled samples (by frame or by whole trajectory)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from shards.config import ConfigError
from shards.format.reader import ShardDataset
from shards.format.schema import AtomGraph

__all__ = ["SplitConfig", "labelled_graphs", "make_splits"]


@dataclass(frozen=True)
class SplitConfig:
    """Sizes of the train/val/test splits, drawn by ``seed`` from the sorted labelled keys.

    ``by: trajectory`` keeps every trajectory (``trajectory_id``) in one split: whole trajectories, in a
    seeded order, fill train, then val, then test until each holds at least its size.
    """

    train: int = 2000
    val: int = 500
    test: int = 2000
    seed: int = 0
    by: Literal["frames", "trajectory"] = "frames"

    def __post_init__(self) -> None:
        if min(self.train, self.val, self.test) < 1:
            raise ConfigError("split: train, val and test must each be >= 1")


def make_splits(keys: list[str], split: SplitConfig, groups: dict[str, str] | None = None) -> dict[str, list[str]]:
    """A seeded permutation of the sorted keys cut into train/val/test (disjoint, deterministic).

    With ``split.by == "trajectory"``, ``groups`` maps each key to its trajectory id and whole
    trajectories are dealt instead of frames.
    """
    if split.by == "trajectory":
        return _split_by_group(keys, split, groups or {})
    need = split.train + split.val + split.test
    if len(keys) < need:
        raise ValueError(f"too few labelled samples: {len(keys)} available, the split needs {need} "
                         f"(train {split.train} + val {split.val} + test {split.test})")
    ordered = sorted(keys)
    perm = np.random.default_rng(split.seed).permutation(len(ordered))
    picked = [ordered[i] for i in perm[:need]]
    a, b = split.train, split.train + split.val
    return {"train": picked[:a], "val": picked[a:b], "test": picked[b:]}


def _split_by_group(keys: list[str], split: SplitConfig, groups: dict[str, str]) -> dict[str, list[str]]:
    missing = [k for k in keys if not groups.get(k)]
    if missing:
        raise ValueError(f"split by trajectory: {len(missing)} samples have no trajectory_id (first: {missing[0]})")
    members: dict[str, list[str]] = {}
    for k in sorted(keys):
        members.setdefault(groups[k], []).append(k)
    names = sorted(members)
    order = [names[i] for i in np.random.default_rng(split.seed).permutation(len(names))]
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    sizes = {"train": split.train, "val": split.val, "test": split.test}
    parts = iter(out)
    part = next(parts)
    for name in order:
        while len(out[part]) >= sizes[part]:
            part = next(parts, "")
            if not part:
                break
        if not part:
            break
        out[part].extend(members[name])
    short = [p for p in out if len(out[p]) < sizes[p]]
    if short:
        raise ValueError(f"split by trajectory: {len(names)} trajectories ({len(keys)} frames) cannot fill "
                         f"{short[0]} ({len(out[short[0]])} of {sizes[short[0]]} frames)")
    return out


def labelled_graphs(data: str | Path, prop: str) -> dict[str, AtomGraph]:
    """All graphs of a shard dataset that carry property ``prop``, by key."""
    out: dict[str, AtomGraph] = {}
    seen: set[str] = set()
    for g in ShardDataset(str(data)):
        props = g.properties or {}
        seen.update(props)
        if prop in props and math.isfinite(float(props[prop])):
            out[g.key] = g
    if not out:
        raise ValueError(f"property {prop!r} is not in {data}; available: {sorted(seen) or 'none'}")
    return out
