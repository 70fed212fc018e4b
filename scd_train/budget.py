"""Batches packed by an atom and an edge budget (for inference outside the trainer's loader).

A structure count says nothing about memory: 64 QM9 molecules are ~1,100 atoms, 64 proteins are
~200,000 atoms and ~10 million edges. Packing by atoms *and* edges bounds the activations of a
message-passing model whatever the mix of sizes.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["Budget", "budget_batches", "n_edges"]


@dataclass(frozen=True)
class Budget:
    """At most ``max_atoms`` atoms, ``max_edges`` edges and (if set) ``max_graphs`` structures per batch.

    A structure larger than the budget on its own forms a batch by itself (it is never dropped).
    """

    max_atoms: int = 4000
    max_edges: int = 120_000
    max_graphs: int | None = None

    def __post_init__(self) -> None:
        if self.max_atoms < 1 or self.max_edges < 1 or (self.max_graphs is not None and self.max_graphs < 1):
            raise ValueError(f"batch budget must be positive, got {self}")


def n_edges(item: dict[str, Any]) -> int:
    """Edges of one view dict (``edge_index`` [2, E]); 0 when it has none."""
    ei = item.get("edge_index")
    return 0 if ei is None else int(ei.shape[1])


def budget_batches(items: Iterable[dict[str, Any]], budget: Budget) -> Iterator[list[dict[str, Any]]]:
    """Group view dicts in order into lists that stay within ``budget`` (an oversize item goes alone)."""
    batch: list[dict[str, Any]] = []
    atoms = edges = 0
    for item in items:
        a, e = int(item["n_atoms"]), n_edges(item)
        full = budget.max_graphs is not None and len(batch) >= budget.max_graphs
        if batch and (full or atoms + a > budget.max_atoms or edges + e > budget.max_edges):
            yield batch
            batch, atoms, edges = [], 0, 0
        batch.append(item)
        atoms += a
        edges += e
    if batch:
        yield batch
