"""Checkpoints without pickle: tensors in safetensors files, everything else in JSON.

A checkpoint is a folder ``step-00000100/`` with ``model.safetensors`` (weights and buffers, including
the noise statistics), ``ema.safetensors`` (optional), ``optim.safetensors`` + ``state.json`` (optimizer
and scheduler state, step, sampler states of every rank, config). It is written to a temporary folder
and renamed, and only the newest ``keep`` checkpoints are kept.

Reading checks every file before anything is applied: an unreadable or truncated ``*.safetensors`` or a
``state.json`` that is not the expected structure is one :class:`CheckpointError` line naming the file, and
:func:`resume_latest` then falls back to the next older checkpoint (logged). Temporary folders left by an
interrupted save are removed by :func:`remove_stale_temp`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from shards.format import jsoncheck as jc

PREFIX = "step-"
_TMP = re.compile(rf"\.tmp-{PREFIX}\d+-(\d+)")
_STATE = {"step": jc.count, "optimizer": jc.mapping, "scheduler": jc.mapping, "sampler_states": jc.array,
          "config": jc.mapping}
_OPTIM = {"param_groups": jc.array, "state": jc.mapping}
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, truncated or malformed; the message names the file."""


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


def read_tensors(f: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a missing, truncated or corrupt file is a :class:`CheckpointError`."""
    if not f.is_file():
        raise CheckpointError(f"{f}: checkpoint file not found")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{f}: unreadable safetensors file ({' '.join(str(exc).split())[:200]})") from None


def read_state(path: Path) -> dict[str, Any]:
    """``state.json`` of a checkpoint folder, checked structurally."""
    f = path / "state.json"
    try:
        raw = f.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{f}: unreadable ({exc.strerror or exc})") from None
    try:
        state = jc.check_fields(jc.load_json(raw, str(f)), str(f), _STATE, what="checkpoint state")
        jc.check_fields(state["optimizer"], f"{f}: optimizer", _OPTIM, what="optimizer state")
    except jc.DocumentError as exc:
        raise CheckpointError(str(exc)) from None
    return state


def saved_model_config(ckpt: Path) -> dict[str, Any] | None:
    """``config.model`` of the ``state.json`` beside a checkpoint folder or weights file (checked
    structurally); None when there is no state.json or it records no model."""
    f = (ckpt if ckpt.is_dir() else ckpt.parent) / "state.json"
    if not f.is_file():
        return None
    try:
        doc = jc.check_fields(jc.load_json(f.read_bytes(), str(f)), str(f), {}, {"config": jc.mapping},
                              what="checkpoint state")
        config = jc.check_fields(doc.get("config", {}), f"{f}: config", {}, {"model": jc.mapping}, what="config")
    except jc.DocumentError as exc:
        raise CheckpointError(str(exc)) from None
    except OSError as exc:
        raise CheckpointError(f"{f}: unreadable ({exc.strerror or exc})") from None
    model = config.get("model")
    return model if model else None


def load_weights(path: Path, model: torch.nn.Module, *, strict: bool = True, ema: bool = False) -> list[str]:
    """Load weights (no pickle); a shape or name mismatch is a one-line error naming the checkpoint."""
    name = "ema.safetensors" if ema and (path / "ema.safetensors").is_file() else "model.safetensors"
    f = path / name if path.is_dir() else path
    if not f.is_file():
        raise FileNotFoundError(f"{f}: checkpoint weights not found")
    return _apply_weights(f, read_tensors(f), model, strict)


def _apply_weights(f: Path, tensors: dict[str, torch.Tensor], model: torch.nn.Module, strict: bool) -> list[str]:
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
    """Restore model, EMA, optimizer and scheduler; returns state.json (step, sampler states, config).

    Every file is read and checked before anything is applied, so a damaged checkpoint leaves the
    objects untouched (:class:`CheckpointError`)."""
    weights = read_tensors(path / "model.safetensors")
    ema_tensors = read_tensors(path / "ema.safetensors") if ema is not None and (path / "ema.safetensors").is_file() \
        else None
    optim_tensors = read_tensors(path / "optim.safetensors")
    state = read_state(path)
    try:
        optim_state = _unflatten_optim(optim_tensors, state["optimizer"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path / 'state.json'}: optimizer state does not match optim.safetensors "
                              f"({type(exc).__name__}: {exc})") from None
    _apply_weights(path / "model.safetensors", weights, model, True)
    if ema is not None and ema_tensors is not None:
        ema.load_state_dict(ema_tensors)
    optimizer.load_state_dict(optim_state)
    scheduler.load_state_dict(state["scheduler"])
    return state


def resume_latest(run_dir: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                  ema: torch.nn.Module | None) -> tuple[Path | None, dict[str, Any] | None]:
    """Load the newest checkpoint that reads back whole; each damaged newer one is logged (one line naming
    the file) and skipped. Returns ``(None, None)`` when there is none."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            return ckpt, load_training_state(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema)
        except CheckpointError as exc:
            log.warning("checkpoint %s is damaged, falling back to an older one: %s", ckpt.name, exc)
    return None, None


def remove_stale_temp(run_dir: Path) -> list[Path]:
    """Remove ``.tmp-step-*`` folders of interrupted saves (their writing process is gone); returns them."""
    removed = []
    for p in sorted(Path(run_dir).glob(f".tmp-{PREFIX}*")) if Path(run_dir).is_dir() else []:
        m = _TMP.fullmatch(p.name)
        if m is None or not p.is_dir() or (int(m.group(1)) != os.getpid() and _alive(int(m.group(1)))):
            continue
        shutil.rmtree(p, ignore_errors=True)
        log.info("removed %s left by an interrupted save", p)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
