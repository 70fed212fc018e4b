"""The trainer side: the SCD objective and backbones, the views it trains on, the torchrun DDP trainer with its
checkpointer, and what uses a pretrained model (fine-tuning, force fields and an ASE calculator, embeddings,
studies).

The names below are the package face; each is loaded from its module on first use, so importing one
module (for example ``scd_train.views`` in a loader worker) does not import the rest.
"""
from __future__ import annotations

import importlib
from typing import Any

_FACE = {
    "views": ("ViewConfig", "ViewTransform", "make_views", "noise_rng"),
    "objectives": ("ObjectiveConfig", "Objective", "SCD", "Denoise", "build_objective"),
    "config": ("DataConfig", "TrainConfig", "load_train_config"),
    "data": ("StatefulLoader", "make_stream"),
    "trainer": ("Trainer",),
    "checkpoint": ("Checkpointer", "CheckpointError", "Stateful", "latest_checkpoint", "resolve_checkpoint",
                   "load_objective"),
    "optim": ("OptimConfig", "build_optimizer", "warmup_cosine", "EMA"),
    "diagnostics": ("DiagnosticsConfig", "Diagnostics"),
    "finetune": ("FinetuneConfig", "SplitConfig", "finetune", "load_finetune_config"),
    "forcefield": ("EnergyModel", "save_forcefield", "load_forcefield"),
    "calculator": ("SCDCalculator",),
    "embed": ("embed_graphs", "ridge_cv"),
    "launch": ("run_ingest", "run_stage", "StageFailed"),
}
_WHERE = {name: module for module, names in _FACE.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'scd_train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"scd_train.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
