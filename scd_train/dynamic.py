"""Shape hints for ``torch.compile``: atom, edge and graph counts vary from batch to batch."""
from __future__ import annotations

from typing import Any


def mark_dynamic(batch: dict[str, Any]) -> dict[str, Any]:
    """Mark the batch's leading (edge: second) dimensions dynamic so one graph serves every batch."""
    import torch._dynamo

    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.ndim:
            torch._dynamo.maybe_mark_dynamic(v, 1 if k.startswith("edge_index") else 0)
    return batch
