"""Checkpoints without pickle: tensors in safetensors files, everything else in JSON.

A checkpoint is a folder ``step-00000100/`` with ``model.safetensors`` (weights and buffers, including
the noise statistics), ``ema.safetensors`` (optional), ``optim.safetensors`` + ``state.json`` (optimizer
and scheduler state, step, sampler states of every rank, config). It is written to a temporary folder
and renamed, and only the newest ``keep`` checkpoints are kept.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def _flatten_optim(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for pid, st in state["state"].items():
        entry = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
                entry[k] = "__tensor__"
            else:
                entry[k] = v
        meta["state"][str(pid)] = entry
    return tensors, meta


def _unflatten_optim(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state = {int(pid): {k: tensors[f"{pid}.{k}"] if v == "__tensor__" else v for k, v in st.items()}
             for pid, st in meta["state"].items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: Path, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, ema: torch.nn.Module | None, sampler_states: list[Any],
                    config: dict[str, Any], extra: dict[str, Any] | None = None, keep: int = 3) -> Path:
    """Write a checkpoint atomically; prune to the newest ``keep``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"{PREFIX}{step:08d}"
    tmp = run_dir / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    if ema is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
    tensors, optim_meta = _flatten_optim(optimizer.state_dict())
    save_file(tensors, str(tmp / "optim.safetensors"))
    state = {"step": step, "optimizer": optim_meta, "scheduler": scheduler.state_dict(),
             "sampler_states": sampler_states, "config": config, **(extra or {})}
    (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True, default=float))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in Path(run_dir).glob(f"{PREFIX}*") if p.is_dir() and (p / "state.json").is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_weights(path: Path, model: torch.nn.Module, *, strict: bool = True, ema: bool = False) -> list[str]:
    """Load weights (no pickle); a shape or name mismatch is a one-line error naming the checkpoint."""
    name = "ema.safetensors" if ema and (path / "ema.safetensors").is_file() else "model.safetensors"
    f = path / name if path.is_dir() else path
    if not f.is_file():
        raise FileNotFoundError(f"{f}: checkpoint weights not found")
    tensors = load_file(str(f))
    own = model.state_dict()
    bad = [k for k, v in tensors.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in tensors]
    if bad or (strict and missing):
        what = f"shape mismatch for {bad[:3]}" if bad else f"missing {missing[:3]}"
        raise ValueError(f"{f}: checkpoint does not match this model config ({what}); "
                         "use the config the checkpoint was trained with")
    result = model.load_state_dict(tensors, strict=strict)
    return list(result.missing_keys)


def load_training_state(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: Any, ema: torch.nn.Module | None) -> dict[str, Any]:
    """Restore model, EMA, optimizer and scheduler; returns state.json (step, sampler states, config)."""
    load_weights(path, model)
    if ema is not None and (path / "ema.safetensors").is_file():
        ema.load_state_dict(load_file(str(path / "ema.safetensors")))
    state = json.loads((path / "state.json").read_text())
    optimizer.load_state_dict(_unflatten_optim(load_file(str(path / "optim.safetensors")), state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    return state
