"""Helpers shared by the model tests."""
from __future__ import annotations

import torch


def saved_bytes(obj: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for the backward of one forward (the step's activation memory)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        obj(batch, generator=torch.Generator().manual_seed(11))
    return total
