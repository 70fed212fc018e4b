"""Backbones and heads: the registry (config type -> backbone class, name -> config type, size presets)
and the heads objectives compose with a backbone (:mod:`scd_train.models.heads`).

The tables are plain dicts written here (no registration by import side effect); a new backbone
adds one entry to ``BACKBONES`` and one to ``BACKBONE_CONFIGS``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from scd_train.models.base import Backbone, BackboneConfig
from scd_train.models.et import EquivariantTransformer, ETConfig
from scd_train.models.heads import GatedEquivariantBlock, GraphPool, VectorHead
from scd_train.models.painn import PaiNN, PaiNNConfig

__all__ = ["BACKBONES", "BACKBONE_CONFIGS", "PRESETS", "Backbone", "BackboneConfig", "ETConfig",
           "EquivariantTransformer", "GatedEquivariantBlock", "GraphPool", "PaiNN", "PaiNNConfig", "VectorHead",
           "backbone_config", "build_backbone"]

BACKBONES: dict[type[BackboneConfig], type[Backbone]] = {
    ETConfig: EquivariantTransformer,
    PaiNNConfig: PaiNN,
}
BACKBONE_CONFIGS: dict[str, type[BackboneConfig]] = {"et": ETConfig, "painn": PaiNNConfig}
PRESETS: dict[str, dict[str, Any]] = {
    "small": {"hidden": 128, "layers": 6, "num_rbf": 32},
    "paper": {"hidden": 256, "layers": 8, "num_rbf": 64},
}


def backbone_config(name: str, preset: str = "small", **overrides: Any) -> BackboneConfig:
    """The config of backbone ``name`` at size ``preset``, with ``overrides`` (None values ignored)."""
    if name not in BACKBONE_CONFIGS:
        raise KeyError(f"unknown backbone {name!r}; known: {sorted(BACKBONE_CONFIGS)}")
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    cls = BACKBONE_CONFIGS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - fields
    if unknown:
        raise TypeError(f"backbone {name!r} has no fields {sorted(unknown)}")
    return cls(**{**PRESETS[preset], **given})


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """Instantiate the backbone registered for ``type(cfg)``."""
    try:
        cls = BACKBONES[type(cfg)]
    except KeyError:
        raise KeyError(f"no backbone registered for {type(cfg).__name__}") from None
    return cls(cfg)
