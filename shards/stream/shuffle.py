"""Per-group sample order: pass after pass over a group's samples, each pass a permutation chosen by name.

A strategy maps positions within pass p to the pass's members; every member appears exactly once per
pass, and the order is a pure function of (seed, group, pass). :data:`SHUFFLES` is the table of strategies
(``LoaderConfig.shuffle`` names one):

- ``windowed`` (default): shuffled blocks of ``UNIT_BLOCK`` samples, then a full shuffle inside windows of
  ``WINDOW`` blocks; reads stay local to a few shards and memory is one window, whatever the group size.
- ``global``: one full permutation per pass (the best mixing; memory and time O(group size) per pass).
- ``none``: storage order (evaluation, debugging).

For MD, each pass first keeps at most ``max_frames_per_trajectory`` random frames of every trajectory.
"""
from __future__ import annotations

import hashlib
from typing import Any, Protocol

import numpy as np

UNIT_BLOCK = 1024
WINDOW = 8


def keyed_rng(*parts: Any) -> np.random.Generator:
    """A generator keyed by the given values (no global state; identical in every process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(digest, "little")))


class Shuffle(Protocol):
    """Orders the members of one pass: ``take(p, members, within)`` -> members at those positions."""

    def take(self, p: int, members: np.ndarray, within: np.ndarray) -> np.ndarray: ...


class NoShuffle:
    """Storage order."""

    def __init__(self, seed: int, gid: int) -> None:
        del seed, gid

    def take(self, p: int, members: np.ndarray, within: np.ndarray) -> np.ndarray:
        return members[within]


class GlobalShuffle:
    """A full permutation of the members per pass (the last pass's permutation is cached)."""

    def __init__(self, seed: int, gid: int) -> None:
        self.seed, self.gid = seed, gid
        self._perm: tuple[int, np.ndarray] | None = None

    def take(self, p: int, members: np.ndarray, within: np.ndarray) -> np.ndarray:
        if self._perm is None or self._perm[0] != p:
            self._perm = (p, members[keyed_rng(self.seed, "global", self.gid, p).permutation(members.size)])
        return self._perm[1][within]


class WindowedShuffle:
    """Shuffled blocks of ``UNIT_BLOCK`` members, then a full shuffle inside windows of ``WINDOW`` blocks."""

    def __init__(self, seed: int, gid: int) -> None:
        self.seed, self.gid = seed, gid
        self._layout: tuple[int, np.ndarray, np.ndarray] | None = None
        self._window: tuple[int, int, np.ndarray] | None = None

    def _pass_layout(self, p: int, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shuffled block order, window start positions) of pass p."""
        if self._layout is None or self._layout[0] != p:
            nb = -(-members.size // UNIT_BLOCK)
            order = keyed_rng(self.seed, "blocks", self.gid, p).permutation(nb)
            sizes = np.minimum(UNIT_BLOCK, members.size - order * UNIT_BLOCK)
            win_sizes = np.add.reduceat(sizes, np.arange(0, nb, WINDOW))
            self._layout = (p, order, np.r_[0, np.cumsum(win_sizes)])
        return self._layout[1], self._layout[2]

    def _window_units(self, p: int, w: int, members: np.ndarray) -> np.ndarray:
        if self._window is None or self._window[:2] != (p, w):
            order, _ = self._pass_layout(p, members)
            blocks = order[w * WINDOW:(w + 1) * WINDOW]
            ids = np.concatenate([members[b * UNIT_BLOCK:(b + 1) * UNIT_BLOCK] for b in blocks])
            self._window = (p, w, ids[keyed_rng(self.seed, "window", self.gid, p, w).permutation(ids.size)])
        return self._window[2]

    def take(self, p: int, members: np.ndarray, within: np.ndarray) -> np.ndarray:
        _, starts = self._pass_layout(p, members)
        wins = np.searchsorted(starts, within, side="right") - 1
        out = np.empty(within.size, dtype=np.int64)
        for w in np.unique(wins):
            m = wins == w
            out[m] = self._window_units(p, int(w), members)[within[m] - starts[w]]
        return out


SHUFFLES: dict[str, type[NoShuffle] | type[GlobalShuffle] | type[WindowedShuffle]] = {
    "windowed": WindowedShuffle, "global": GlobalShuffle, "none": NoShuffle}


class UnitSequence:
    """The sample sequence of one group: pass after pass, each ordered by a :data:`SHUFFLES` strategy."""

    def __init__(self, gid: int, units: np.ndarray, traj: np.ndarray, cap: int | None, seed: int,
                 shuffle: str = "windowed") -> None:
        if shuffle not in SHUFFLES:
            raise ValueError(f"unknown shuffle {shuffle!r}; choose one of {sorted(SHUFFLES)}")
        self.gid, self.units, self.traj, self.cap, self.seed = gid, units, traj, cap, seed
        self.order = SHUFFLES[shuffle](seed, gid)
        self.n = self._count()
        self._members: tuple[int, np.ndarray] | None = None

    def _count(self) -> int:
        if self.cap is None or not self.traj.any():
            return int(self.units.size)
        plain = int((self.traj == 0).sum())
        _, counts = np.unique(self.traj[self.traj != 0], return_counts=True)
        return plain + int(np.minimum(counts, self.cap).sum())

    def members(self, p: int) -> np.ndarray:
        """The units of pass p (after the per-trajectory frame cap), in storage order."""
        if self.cap is None or not self.traj.any():
            return self.units
        if self._members is not None and self._members[0] == p:
            return self._members[1]
        rnd = keyed_rng(self.seed, "cap", self.gid, p).random(self.units.size)
        order = np.lexsort((rnd, self.traj))
        t_sorted = self.traj[order]
        starts = np.flatnonzero(np.r_[True, t_sorted[1:] != t_sorted[:-1]])
        rank = np.arange(order.size) - np.repeat(starts, np.diff(np.r_[starts, order.size]))
        keep = np.zeros(self.units.size, dtype=bool)
        keep[order[(rank < self.cap) | (t_sorted == 0)]] = True
        self._members = (p, self.units[keep])
        return self._members[1]

    def units_at(self, cursors: np.ndarray) -> np.ndarray:
        """Table rows for the given (increasing) positions of this group's unit sequence."""
        out = np.empty(cursors.size, dtype=np.int64)
        passes, within = np.divmod(cursors, self.n)
        for p in np.unique(passes):
            sel = passes == p
            out[sel] = self.order.take(int(p), self.members(int(p)), within[sel])
        return out
