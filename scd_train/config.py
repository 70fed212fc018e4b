"""The training config: nested frozen dataclasses loaded from YAML (unknown keys are errors)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from scd_train.diagnostics import DiagnosticsConfig
from scd_train.objectives import ObjectiveConfig
from scd_train.optim import OptimConfig
from scd_train.views import ViewConfig
from shards.config import ConfigError, load_yaml
from shards.stream.loader import LoaderConfig


@dataclass(frozen=True)
class DataConfig(LoaderConfig):
    """``data:`` of a training config: the loader's settings plus ``views`` (how SCD views are made)."""

    views: ViewConfig = field(default_factory=ViewConfig)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs. ``scd train CONFIG.yaml --set optim.lr=1e-4`` overrides single keys.

    ``steps`` sets the schedule's length; ``stop_after`` ends this invocation early (with a checkpoint),
    as a preempted job would, and a later run with ``resume: true`` continues exactly.
    """

    run_dir: str
    data: DataConfig
    model: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 1000
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    num_workers: int = 0
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    tf32: bool = True
    compile: bool = False
    resume: bool = True
    stop_after: int | None = None
    tensorboard: bool = True
    progress: bool = True
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.log_every < 1 or self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ConfigError("steps, log_every, checkpoint_every and keep_checkpoints must be >= 1")


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Load a training YAML; dataset paths must exist (local) when given as paths."""
    cfg = load_yaml(TrainConfig, path, overrides)
    for d in cfg.data.datasets:
        if "://" not in d and not (Path(d) / "manifest.json").is_file():
            raise ConfigError(f"{path}: data.datasets: {d} is not a shard dataset (no manifest.json)")
    held = cfg.diagnostics.held_out
    if held is not None and "://" not in held and not (Path(held) / "manifest.json").is_file():
        raise ConfigError(f"{path}: diagnostics.held_out: {held} is not a shard dataset (no manifest.json)")
    return cfg
