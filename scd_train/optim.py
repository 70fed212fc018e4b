"""AdamW with the paper's decay exclusions, linear warmup + cosine schedule, and an EMA of weights: the
optimiser of pretraining (the trainer) and of fine-tuning alike."""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

NO_DECAY_MARKERS = ("bias", "norm", "embedding", "mask_token", "ln", "layernorm")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10_000
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float | None = None


def param_groups(model: nn.Module, weight_decay: float,
                 lr_by_prefix: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, embeddings and the mask token (and any 0/1-D tensor).

    Two groups (decay, no decay); each parameter whose name starts with a prefix of ``lr_by_prefix`` (the
    first that matches) goes into two more groups with that learning rate instead (fine-tuning's head).
    """
    prefixes = dict(lr_by_prefix or {})
    buckets: dict[str | None, tuple[list[nn.Parameter], list[nn.Parameter]]] = {None: ([], [])}
    buckets.update({p: ([], []) for p in prefixes})
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner = next((pre for pre in prefixes if name.startswith(pre)), None)
        decay, no_decay = buckets[owner]
        lname = name.lower()
        if p.ndim <= 1 or any(m in lname for m in NO_DECAY_MARKERS):
            no_decay.append(p)
        else:
            decay.append(p)
    groups: list[dict[str, Any]] = []
    for owner, (decay, no_decay) in buckets.items():
        extra = {} if owner is None else {"lr": prefixes[owner]}
        groups += [{"params": decay, "weight_decay": weight_decay, **extra},
                   {"params": no_decay, "weight_decay": 0.0, **extra}]
    return groups


def warmup_cosine(total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> Callable[[int], float]:
    """The learning-rate factor of a step: linear warmup over ``warmup_steps`` (at most ``total_steps - 1``),
    then a cosine from 1 down to ``min_lr_ratio`` at ``total_steps``."""
    warm = max(0, min(warmup_steps, total_steps - 1))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total_steps - warm)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return factor


def build_optimizer(model: nn.Module, cfg: OptimConfig, total_steps: int,
                    lr_by_prefix: Mapping[str, float] | None = None
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over :func:`param_groups` and the :func:`warmup_cosine` schedule over ``total_steps`` (pretraining
    and fine-tuning alike)."""
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay, lr_by_prefix), lr=cfg.lr, betas=cfg.betas)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total_steps, cfg.warmup_steps, cfg.min_lr_ratio))


class EMA(nn.Module):
    """Exponential moving average of a model's parameters and buffers."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval()
        for p in self.shadow.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for s, p in zip(self.shadow.parameters(), model.parameters(), strict=True):
            s.lerp_(p.detach(), 1 - self.decay)
        for sb, b in zip(self.shadow.buffers(), model.buffers(), strict=True):
            sb.copy_(b)
