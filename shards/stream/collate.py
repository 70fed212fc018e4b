"""Flat numpy batches from per-structure view dicts (the trainer converts them to torch)."""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["collate", "GRAPH_ARRAYS"]

GRAPH_ARRAYS = ("cell", "pbc")  # stacked per graph; any other array with n_atoms rows is per atom


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate atoms and edges of ``items`` into one batch.

    ``edge_index*`` arrays are offset by the atoms before each graph; for each ``edge_index<sfx>``
    the batch also carries ``n_edges<sfx>`` [G]. Per-atom arrays are concatenated, ``cell`` /
    ``pbc`` and other per-graph arrays stacked, ``batch`` [N] holds each atom's graph index,
    ``n_atoms`` [G], ``domain`` [G] (from ``domain_id``, -1 if absent) and ``keys`` (from ``key``).
    Other scalars become [G] arrays; other strings lists.
    """
    if not items:
        raise ValueError("collate needs at least one item")
    names = list(items[0])
    for it in items[1:]:
        if list(it) != names:
            raise ValueError(f"items have different keys: {sorted(names)} vs {sorted(it)}")
    n_atoms = np.array([int(it["n_atoms"]) for it in items], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(n_atoms)[:-1]])
    out: dict[str, Any] = {
        "n_atoms": n_atoms,
        "batch": np.repeat(np.arange(len(items), dtype=np.int64), n_atoms),
        "domain": np.array([int(it.get("domain_id", -1)) for it in items], dtype=np.int64),
    }
    for name in names:
        if name in ("n_atoms", "domain_id"):
            continue
        vals = [it[name] for it in items]
        if name == "key":
            out["keys"] = [str(v) for v in vals]
        elif name.startswith("edge_index"):
            counts = np.array([v.shape[1] for v in vals], dtype=np.int64)
            out[name] = np.concatenate(vals, axis=1) + np.repeat(offsets, counts)[None, :]
            out["n_edges" + name[len("edge_index"):]] = counts
        elif name.startswith("edge_"):
            out[name] = np.concatenate(vals, axis=0)
        elif isinstance(vals[0], np.ndarray) and vals[0].ndim > 0:
            per_atom = name not in GRAPH_ARRAYS and all(
                v.shape[0] == n for v, n in zip(vals, n_atoms.tolist(), strict=True))
            out[name] = np.concatenate(vals, axis=0) if per_atom else np.stack(vals)
        elif isinstance(vals[0], str):
            out[name] = vals
        else:
            out[name] = np.asarray(vals)
    return out
