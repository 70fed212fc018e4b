"""Which global stream positions each rank takes, and how to deal them again on another world size.

Ranks read the global stream (:mod:`shards.stream.plan`) through a *virtual stream* V: an explicit, strictly
increasing list E of positions, then every position from ``base`` on (every E[i] < base)::

    V(v) = E[v]                  for v < len(E)
    V(v) = base + (v - len(E))   for v >= len(E)

Rank r of W takes the virtual indices r, r + W, r + 2W, ...; its state is its next virtual index. A fresh run
has E empty and base 0, so V is the identity and rank r takes the positions i with i % W == r.

A run saved on W ranks that resumes on W' != W calls :func:`redeal` with the W next indices: the positions no
rank has taken yet (those below the furthest rank's index, then the rest of E) become the new E', in order,
followed by everything from the new base on. Every position is taken exactly once across the switch, and V'
is again increasing, so re-dealing composes over any number of resumes.

V is a pure function of its deals (:func:`stream_of`: the next indices of the ranks at each switch), so a
resume state stays a few numbers per switch however long the list E is.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["VirtualStream", "redeal", "stream_of"]


@dataclass(frozen=True)
class VirtualStream:
    """The virtual stream V (see the module docstring); the default is the identity."""

    explicit: tuple[int, ...] = ()
    base: int = 0

    def __post_init__(self) -> None:
        e = np.asarray(self.explicit, dtype=np.int64)
        if self.base < 0 or (e.size and (e[0] < 0 or e[-1] >= self.base or (np.diff(e) <= 0).any())):
            raise ValueError("virtual stream: explicit positions must be strictly increasing, >= 0 and "
                             f"below base {self.base}")

    def position(self, v: int) -> int:
        """The global stream position of virtual index ``v``."""
        n = len(self.explicit)
        return self.explicit[v] if v < n else self.base + (v - n)

    def positions(self, v: np.ndarray) -> np.ndarray:
        """:meth:`position` of every entry of ``v`` (int64)."""
        v = np.asarray(v, dtype=np.int64)
        e = np.asarray(self.explicit, dtype=np.int64)
        inside = v < e.size
        return np.where(inside, e[np.where(inside, v, 0)] if e.size else 0, self.base + v - e.size)


def redeal(stream: VirtualStream, next_index: Sequence[int]) -> VirtualStream:
    """The stream that continues ``stream`` after W ranks stopped at the given next virtual indices
    (``next_index[r]`` of rank r, so ``next_index[r] % W == r``): every position not yet taken, once, in order."""
    world = len(next_index)
    nxt = np.asarray(next_index, dtype=np.int64)
    if world == 0 or (nxt < 0).any() or (nxt % world != np.arange(world)).any():
        raise ValueError(f"next virtual indices {list(next_index)} are not those of ranks 0..{world - 1} "
                         f"(rank r's index must be r modulo {world})")
    vmax = int(nxt.max())
    v = np.arange(int(nxt.min()), vmax, dtype=np.int64)
    left = v[v >= nxt[v % world]]
    rest = np.arange(vmax, max(vmax, len(stream.explicit)), dtype=np.int64)
    explicit = stream.positions(np.concatenate([left, rest]))
    base = stream.base + max(0, vmax - len(stream.explicit))
    return VirtualStream(tuple(int(x) for x in explicit), base)


def stream_of(deals: Sequence[Sequence[int]]) -> VirtualStream:
    """The virtual stream after the given deals, in order (each: the next virtual indices of the ranks that
    stopped, as given to :func:`redeal`), starting from the identity."""
    stream = VirtualStream()
    for next_index in deals:
        stream = redeal(stream, next_index)
    return stream
