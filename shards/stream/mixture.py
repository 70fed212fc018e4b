"""Mixture specs: how much of each domain (or source) the stream draws.

``strategy``:
- ``natural``: p_g proportional to n_g (the data as it is);
- ``weights``: p_g proportional to w_g * n_g (up- or down-weight a group relative to its size);
- ``temperature``: p_g proportional to n_g ** (1 / T) (T = 1 natural, large T -> uniform);
- ``proportions``: p_g = w_g / sum(w) (fixed shares whatever the sizes).
n_g counts sampling units, i.e. after the per-trajectory frame cap for MD.
Samples above the atom budget from ``crop_domains`` (proteins, MD frames) are cropped to
``crop_protein_atoms`` atoms around a random centre, keeping whole residues.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from shards.config import ConfigError, load_yaml


@dataclass(frozen=True)
class MixtureConfig:
    """A mixture spec (YAML). Groups absent from ``weights`` get weight ``default_weight``."""

    strategy: Literal["natural", "weights", "temperature", "proportions"] = "natural"
    group_by: Literal["domain", "source"] = "domain"
    weights: dict[str, float] = field(default_factory=dict)
    default_weight: float = 1.0
    temperature: float = 1.0
    max_frames_per_trajectory: int | None = None
    crop_protein_atoms: int | None = None
    crop_domains: tuple[str, ...] = ("protein", "md")

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"mixture.temperature must be > 0, got {self.temperature}")
        if any(w < 0 for w in self.weights.values()) or self.default_weight < 0:
            raise ConfigError("mixture weights must be >= 0")
        if self.max_frames_per_trajectory is not None and self.max_frames_per_trajectory < 1:
            raise ConfigError("mixture.max_frames_per_trajectory must be >= 1")


def load_mixture(path: str | Path | None, overrides: list[str] | None = None) -> MixtureConfig:
    """Load a mixture YAML (top-level keys are MixtureConfig fields); ``None`` gives the natural mix."""
    return MixtureConfig() if path is None else load_yaml(MixtureConfig, path, overrides)


STRATEGIES: dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
    "natural": lambda n, w, t: n,
    "weights": lambda n, w, t: w * n,
    "temperature": lambda n, w, t: n ** (1.0 / t),
    "proportions": lambda n, w, t: w,
}
"""Unnormalised group weights by strategy name, from (group sizes n, weights w, temperature t)."""


def group_probabilities(cfg: MixtureConfig, sizes: dict[str, int]) -> dict[str, float]:
    """Target probability of each non-empty group."""
    names = [g for g in sorted(sizes) if sizes[g] > 0]
    if not names:
        raise ValueError("the datasets hold no samples")
    unknown = sorted(set(cfg.weights) - set(sizes))
    if unknown:
        raise ConfigError(f"mixture.weights names {unknown}, which no dataset has "
                          f"(groups by {cfg.group_by}: {sorted(sizes)})")
    n = np.array([sizes[g] for g in names], dtype=np.float64)
    w = np.array([cfg.weights.get(g, cfg.default_weight) for g in names], dtype=np.float64)
    raw = STRATEGIES[cfg.strategy](n, w, cfg.temperature)
    if raw.sum() <= 0:
        raise ConfigError("mixture weights are all zero")
    p = raw / raw.sum()
    return {g: float(x) for g, x in zip(names, p, strict=True)}
