"""The batch planner: a pure function of (indices, mixture, seed, world size, rank, atom budget).

It works on index metadata only (no decoding):

1. The **global stream** is an infinite sequence of positions. Positions come in blocks of ``BLOCK``;
   in block b each position draws its group from a counter-based generator keyed (seed, b) with the
   mixture's probabilities. The k-th draw of group g takes unit k of that group's sequence.
2. A group's **unit sequence** is pass after pass over its units, each pass ordered by a shuffle
   strategy chosen by name (:mod:`shards.stream.shuffle`), so every unit appears exactly once per pass.
3. Ranks take positions through a virtual stream (:mod:`shards.stream.partition`): rank r of W takes
   virtual indices r, r + W, ...; in a fresh run virtual index i is position i, so position i belongs to
   rank ``i % world_size``. A rank packs its positions in order into batches of at most ``max_atoms``; a
   sample that does not fit opens the next batch (it is carried, never lost); a sample larger than the
   budget is cropped (proteins, when asked) or counted as oversize and reported.

The state after any batch is a few numbers (:meth:`Planner.state_dict`), so resume is exact.
:func:`redeal_states` turns the states of W ranks into states of W' ranks that continue the same global
stream (elastic resume): no position taken twice or skipped, the mixture draws and group passes unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from shards.stream.mixture import MixtureConfig, group_probabilities
from shards.stream.partition import stream_of
from shards.stream.shuffle import UnitSequence, keyed_rng
from shards.stream.table import SampleTable, build_table

__all__ = ["BLOCK", "Batch", "Planner", "RepeatSpec", "SampleTable", "build_table", "keyed_rng", "redeal_states"]

BLOCK = 4096


@dataclass(frozen=True)
class RepeatSpec:
    """Random cell repeats of periodic structures, decided here so that the budget counts the supercell."""

    p: float = 0.0
    max_repeat: int = 1
    domains: tuple[str, ...] = ("crystal",)

    @property
    def active(self) -> bool:
        return self.p > 0 and self.max_repeat > 1


@dataclass
class Batch:
    """A planned batch: table rows, their atom counts (after crop / cell repeat), crops and repeats, and the
    global stream position of each row."""

    step: int
    rows: np.ndarray
    atoms: np.ndarray
    crop: np.ndarray
    repeats: np.ndarray
    positions: np.ndarray

    @property
    def n_atoms(self) -> int:
        return int(self.atoms.sum())


class Planner:
    """Plans this rank's batches. ``next_batch()`` advances; ``state_dict()`` captures the position."""

    def __init__(self, table: SampleTable, mixture: MixtureConfig, *, seed: int, world_size: int = 1,
                 rank: int = 0, max_atoms: int = 4000, repeat: RepeatSpec | None = None,
                 shuffle: str = "windowed") -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if max_atoms < 1:
            raise ValueError("max_atoms must be >= 1")
        self.table, self.mixture, self.seed = table, mixture, seed
        self.world_size, self.rank, self.max_atoms = world_size, rank, max_atoms
        codes = table.domain if mixture.group_by == "domain" else table.source
        names = table.domain_names if mixture.group_by == "domain" else table.source_names
        present = [c for c in range(len(names)) if (codes == c).any()]
        self.group_names = [names[c] for c in present]
        self.groups = [UnitSequence(i, np.flatnonzero(codes == c), table.trajectory[codes == c],
                                    mixture.max_frames_per_trajectory, seed, shuffle) for i, c in enumerate(present)]
        probs = group_probabilities(mixture, {g: grp.n for g, grp in zip(self.group_names, self.groups, strict=True)})
        self.probs = np.array([probs[g] for g in self.group_names])
        self.cdf = np.cumsum(self.probs)
        self.cdf[-1] = 1.0
        crop_codes = [i for i, d in enumerate(table.domain_names) if d in mixture.crop_domains]
        self.croppable = np.isin(table.domain, crop_codes)
        self.repeat = repeat or RepeatSpec()
        rep_codes = [i for i, d in enumerate(table.domain_names) if d in self.repeat.domains]
        self.repeatable = np.isin(table.domain, rep_codes) if self.repeat.active else np.zeros(len(table), bool)
        self._block: tuple[int, np.ndarray] | None = None
        self.reset()

    def reset(self) -> None:
        self.step = 0
        self.deals: list[list[int]] = []
        self.stream = stream_of(self.deals)
        self.next_index = self.rank
        self.block_no = 0
        self.block_cursors = np.zeros(len(self.groups), dtype=np.int64)
        self.oversize = 0
        self.seen = np.zeros(len(self.groups), dtype=np.int64)

    @property
    def position(self) -> int:
        """The global stream position this rank looks at next."""
        return self.stream.position(self.next_index)

    def state_dict(self) -> dict[str, Any]:
        """A few numbers that resume the stream exactly: ``pos`` is the next virtual index, ``deals`` the
        re-deals that made the virtual stream (:func:`~shards.stream.partition.stream_of`; none in a run
        that never changed its world size)."""
        return {"step": self.step, "pos": self.next_index, "deals": [list(d) for d in self.deals],
                "block_no": self.block_no, "block_cursors": self.block_cursors.tolist(), "oversize": self.oversize,
                "seen": self.seen.tolist(), "seed": self.seed, "world_size": self.world_size,
                "rank": self.rank, "max_atoms": self.max_atoms, "groups": self.group_names}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after ``state`` (saved by this rank; a state of another world size goes through
        :func:`redeal_states` first). States without ``deals`` (older ones) are of the identity stream."""
        for name in ("seed", "world_size", "rank", "max_atoms", "groups"):
            mine = self.group_names if name == "groups" else getattr(self, name)
            if state[name] != mine:
                raise ValueError(f"sampler state was saved with {name}={state[name]!r}, this run has {mine!r}; "
                                 "resume needs the same datasets, seed and budget (another world size: "
                                 "redeal_states)")
        self.deals = [[int(v) for v in d] for d in state.get("deals", [])]
        self.stream = stream_of(self.deals)
        self.step, self.next_index, self.block_no = int(state["step"]), int(state["pos"]), int(state["block_no"])
        self.block_cursors = np.asarray(state["block_cursors"], dtype=np.int64)
        self.oversize = int(state["oversize"])
        self.seen = np.asarray(state["seen"], dtype=np.int64)
        self._block = None

    def _rows_of_block(self, b: int) -> np.ndarray:
        """Table rows of every position of block b (cached), moving the stored group cursors to block b
        (forward by adding each block's draws, back by subtracting them)."""
        if self._block is not None and self._block[0] == b:
            return self._block[1]
        while self.block_no < b:
            self.block_cursors += np.bincount(self._draw(self.block_no), minlength=len(self.groups))
            self.block_no += 1
        while self.block_no > b:
            self.block_no -= 1
            self.block_cursors -= np.bincount(self._draw(self.block_no), minlength=len(self.groups))
        groups = self._draw(b)
        rows = np.empty(BLOCK, dtype=np.int64)
        for gi, grp in enumerate(self.groups):
            sel = np.flatnonzero(groups == gi)
            if sel.size:
                rows[sel] = grp.units_at(self.block_cursors[gi] + np.arange(sel.size))
        self._block = (b, rows)
        self._block_groups = groups
        return rows

    def _draw(self, b: int) -> np.ndarray:
        return np.searchsorted(self.cdf, keyed_rng(self.seed, "mix", b).random(BLOCK), side="right").clip(
            0, len(self.groups) - 1)

    def next_batch(self) -> Batch:
        """This rank's next batch (never over ``max_atoms``)."""
        rows: list[int] = []
        atoms: list[int] = []
        crop: list[int] = []
        repeats: list[tuple[int, int, int]] = []
        positions: list[int] = []
        budget = self.max_atoms
        crop_to = self.mixture.crop_protein_atoms
        skipped = 0
        while True:
            pos = self.position
            b, j = divmod(pos, BLOCK)
            row = int(self._rows_of_block(b)[j])
            n = int(self.table.n_atoms[row])
            cropped = False
            if n > self.max_atoms:
                if crop_to is not None and self.croppable[row]:
                    n, cropped = min(crop_to, self.max_atoms), True
                else:
                    self.oversize += 1
                    self.next_index += self.world_size
                    skipped += 1
                    if skipped > 4 * BLOCK and not rows:
                        raise ValueError(f"no sample fits the atom budget of {self.max_atoms} "
                                         f"({self.oversize} oversize samples so far); raise max_atoms or crop")
                    continue
            reps = self._repeats(row, n, pos)
            n *= int(np.prod(reps))
            if n > budget:
                break
            rows.append(row)
            atoms.append(n)
            crop.append(cropped)
            repeats.append(reps)
            positions.append(pos)
            self.seen[self._block_groups[j]] += 1
            budget -= n
            self.next_index += self.world_size
        batch = Batch(self.step, np.array(rows, np.int64), np.array(atoms, np.int64), np.array(crop, bool),
                      np.array(repeats, np.int64).reshape(-1, 3), np.array(positions, np.int64))
        self.step += 1
        return batch

    def _repeats(self, row: int, n: int, pos: int) -> tuple[int, int, int]:
        """Cell repeats per axis for this occurrence (keyed by its stream position); 1s if none or too big."""
        if not self.repeatable[row]:
            return (1, 1, 1)
        rng = keyed_rng(self.seed, "repeat", pos)
        hit = rng.random(3) < self.repeat.p
        reps = np.where(hit, rng.integers(2, self.repeat.max_repeat + 1, size=3), 1)
        if n * int(np.prod(reps)) > self.max_atoms:
            return (1, 1, 1)
        return int(reps[0]), int(reps[1]), int(reps[2])

    def realised_mix(self) -> dict[str, float]:
        total = max(int(self.seen.sum()), 1)
        return {g: float(c) / total for g, c in zip(self.group_names, self.seen, strict=True)}

    def target_mix(self) -> dict[str, float]:
        return {g: float(p) for g, p in zip(self.group_names, self.probs, strict=True)}


_SAME = ("seed", "max_atoms", "groups", "step", "deals")
# counts of the whole run that a re-deal sums into rank 0 (the last two: the loader's left-out samples)
_SUMMED = ("oversize", "edge_oversize", "corrupt_skipped")


def redeal_states(states: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
    """The planner states of ``world_size`` ranks that continue the global stream where the ranks of a run
    (``states``, one per rank, in rank order) stopped. The same world size returns ``states`` unchanged (exact
    resume); another deals the positions no rank has taken yet again (:func:`~shards.stream.partition.redeal`).
    The step carries over; the seen, oversize and left-out counts are summed into rank 0."""
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if len(states) == world_size:
        return states
    old = len(states)
    for r, s in enumerate(states):
        if s["world_size"] != old or s["rank"] != r:
            raise ValueError(f"sampler state {r} of {old} says rank {s['rank']} of {s['world_size']}; "
                             "the states of every rank are needed, in rank order")
        for name in _SAME:
            if s.get(name) != states[0].get(name):
                raise ValueError(f"sampler states of ranks 0 and {r} differ in {name!r}: not one run's states")
    deals = [*states[0].get("deals", []), [int(s["pos"]) for s in states]]
    stream_of(deals)  # checks the new deal
    start = min(states, key=lambda s: int(s["block_no"]))
    seen = [sum(int(s["seen"][g]) for s in states) for g in range(len(states[0]["seen"]))]
    counts = {name: sum(int(s.get(name, 0)) for s in states) for name in _SUMMED}
    return [{**states[0], "deals": deals, "pos": r, "world_size": world_size, "rank": r,
             "block_no": start["block_no"], "block_cursors": start["block_cursors"],
             "seen": seen if r == 0 else [0] * len(seen), **{k: v if r == 0 else 0 for k, v in counts.items()}}
            for r in range(world_size)]
