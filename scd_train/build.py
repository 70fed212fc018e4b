"""Build the objective (backbone + heads) of a training config."""
from __future__ import annotations

from typing import Any

from scd_train.objectives import build_objective as _build


def build_objective(cfg: Any) -> Any:
    """The objective module of a :class:`~scd_train.config.TrainConfig` (its ``model`` section)."""
    try:
        return _build(cfg.model)
    except (KeyError, TypeError) as exc:
        msg = exc.args[0] if exc.args else str(exc)
        raise ValueError(f"model: {msg}") from None
