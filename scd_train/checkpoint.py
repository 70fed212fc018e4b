"""Checkpoints of stateful parts, without pickle: tensors in safetensors files, everything else in JSON.

The trainer gives a :class:`Checkpointer` a dict of named stateful parts (anything with ``state_dict()`` and
``load_state_dict()``: the objective with its noise statistics, the EMA weights, the optimizer, the LR
scheduler, the loader), and this module alone knows how they lie on disk. A checkpoint is a folder
``step-00000100/``:

=============================  ==========================================================================
part                           stored as
=============================  ==========================================================================
a module (``model``, ``ema``)  ``<name>.safetensors`` (weights and buffers)
the optimizer                  ``optim.safetensors`` (its tensors) + ``state.json[<name>]`` (the rest)
anything else                  ``state.json[<name>]`` (JSON: scheduler, loader with every rank's state)
=============================  ==========================================================================

``state.json`` also holds ``format`` (:data:`FORMAT`), ``step`` and the run's ``config``. A checkpoint is
written to a temporary folder and renamed, and only the newest ``keep`` are kept. Checkpoints of format 1
(no ``format`` key; the loader's rank states under ``sampler_states``) still load; a newer format is refused.

Reading checks every file before anything is applied: an unreadable or truncated ``*.safetensors`` or a
``state.json`` that is not the expected structure is one :class:`CheckpointError` line naming the file, and
:meth:`Checkpointer.load_latest` then falls back to the next older checkpoint (logged). Temporary folders
left by an interrupted save are removed by :func:`remove_stale_temp`.

Fine-tuning and embedding start from a checkpoint through :func:`resolve_checkpoint` (a checkpoint folder,
a run folder or a weights file), :func:`model_config_from_checkpoint` and :func:`load_weights`;
:func:`load_objective` also reads a ``scd finetune`` output folder.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scd_train.objectives import ObjectiveConfig, build_objective
from shards.config import from_dict
from shards.format import jsoncheck as jc

__all__ = ["FORMAT", "CheckpointError", "Checkpointer", "Stateful", "latest_checkpoint", "list_checkpoints",
           "load_objective", "load_weights", "model_config_from_checkpoint", "read_state", "read_tensors",
           "remove_stale_temp", "resolve_checkpoint", "saved_model_config"]

FORMAT = 2
PREFIX = "step-"
_TMP = re.compile(rf"\.tmp-{PREFIX}\d+-(\d+)")
_STATE = {"format": jc.count, "step": jc.count, "config": jc.mapping, "parts": jc.str_list}
_STATE_V1 = {"step": jc.count, "optimizer": jc.mapping, "scheduler": jc.mapping, "sampler_states": jc.array,
             "config": jc.mapping}
_OPTIM = {"param_groups": jc.array, "state": jc.mapping}
_FILES = {"optimizer": "optim"}  # part name -> file stem, where they differ
_FINETUNED_PREFIX = "objective."
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, truncated or malformed; the message names the file."""


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any, /) -> Any: ...


def _file(name: str) -> str:
    return f"{_FILES.get(name, name)}.safetensors"


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


class Checkpointer:
    """Saves and restores the named ``parts`` of a run in ``run_dir`` (see the module docstring).

    Every rank calls :meth:`save` (a part's ``state_dict()`` may gather from all ranks, as the loader's
    does); only ``is_main`` writes. Every rank calls :meth:`load_latest` and restores its own objects."""

    def __init__(self, run_dir: Path, parts: Mapping[str, Stateful], *, keep: int = 3, is_main: bool = True) -> None:
        reserved = sorted(set(parts) & set(_STATE))
        if reserved:
            raise ValueError(f"checkpoint part names {reserved} are reserved for state.json's own keys")
        self.run_dir, self.parts, self.keep, self.is_main = Path(run_dir), dict(parts), keep, is_main

    def save(self, step: int, config: dict[str, Any]) -> Path | None:
        """Write a checkpoint atomically and prune to the newest ``keep``; returns its folder (main rank)."""
        states = {name: part.state_dict() for name, part in self.parts.items()}
        if not self.is_main:
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        final = self.run_dir / f"{PREFIX}{step:08d}"
        tmp = self.run_dir / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        doc: dict[str, Any] = {"format": FORMAT, "step": step, "config": config, "parts": sorted(self.parts)}
        for name, part in self.parts.items():
            if isinstance(part, torch.nn.Module):
                save_file({k: v.detach().cpu().contiguous() for k, v in states[name].items()}, str(tmp / _file(name)))
            elif isinstance(part, torch.optim.Optimizer):
                tensors, doc[name] = _flatten_optim(states[name])
                save_file(tensors, str(tmp / _file(name)))
            else:
                doc[name] = states[name]
        (tmp / "state.json").write_text(json.dumps(doc, indent=1, sort_keys=True, default=float))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(self.run_dir)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, path: Path) -> dict[str, Any]:
        """Restore every part from the checkpoint folder ``path``; returns its ``state.json`` (step, config).

        Every file is read and checked before anything is applied, so a damaged checkpoint leaves the parts
        untouched (:class:`CheckpointError`). A part the checkpoint lacks, or a model that does not match, is
        a ``ValueError`` (not damage: no fallback)."""
        state = read_state(path)
        absent = sorted(set(self.parts) - set(state["parts"]))
        if absent:
            raise ValueError(f"{path}: the checkpoint has no {absent} part(s) (saved: {state['parts']}); "
                             "it was written by a run without them")
        decoded: dict[str, Any] = {}
        for name, part in self.parts.items():
            if isinstance(part, torch.nn.Module):
                decoded[name] = read_tensors(path / _file(name))
            elif isinstance(part, torch.optim.Optimizer):
                decoded[name] = self._optimizer_state(path, name, read_tensors(path / _file(name)), state)
            elif name in state:
                decoded[name] = state[name]
            else:
                raise CheckpointError(f"{path / 'state.json'}: lacks the {name!r} part it lists")
        for name, part in self.parts.items():
            if isinstance(part, torch.nn.Module):
                _apply_weights(path / _file(name), decoded[name], part, True)
            else:
                part.load_state_dict(decoded[name])
        return state

    @staticmethod
    def _optimizer_state(path: Path, name: str, tensors: dict[str, torch.Tensor], state: dict[str, Any]
                         ) -> dict[str, Any]:
        where = f"{path / 'state.json'}: {name}"
        try:
            meta = jc.check_fields(state.get(name), where, _OPTIM, what="optimizer state")
            return _unflatten_optim(tensors, meta)
        except jc.DocumentError as exc:
            raise CheckpointError(str(exc)) from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{where} does not match {_file(name)} ({type(exc).__name__}: {exc})") from None

    def load_latest(self) -> tuple[Path | None, dict[str, Any] | None]:
        """Load the newest checkpoint that reads back whole; each damaged newer one is logged (one line naming
        the file) and skipped. Returns ``(None, None)`` when there is none."""
        for ckpt in reversed(list_checkpoints(self.run_dir)):
            try:
                return ckpt, self.load(ckpt)
            except CheckpointError as exc:
                log.warning("checkpoint %s is damaged, falling back to an older one: %s", ckpt.name, exc)
        return None, None


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
    """``state.json`` of a checkpoint folder, checked structurally; format 1 is read as format 2 (the
    loader's rank states under ``loader``)."""
    f = path / "state.json"
    try:
        raw = f.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{f}: unreadable ({exc.strerror or exc})") from None
    try:
        doc = jc.load_json(raw, str(f))
        if isinstance(doc, dict) and "format" not in doc:
            state = jc.check_fields(doc, str(f), _STATE_V1, what="checkpoint state")
            parts = ["loader", "model", "optimizer", "scheduler", *(["ema"] if (path / "ema.safetensors").is_file()
                                                                   else [])]
            state = {**state, "format": 1, "parts": parts, "loader": {"ranks": state.pop("sampler_states")}}
        else:
            state = jc.check_fields(doc, str(f), _STATE, what="checkpoint state")
    except jc.DocumentError as exc:
        raise CheckpointError(str(exc)) from None
    if state["format"] > FORMAT:
        raise ValueError(f"{f}: checkpoint format {state['format']} is newer than this version reads "
                         f"(formats 1-{FORMAT}); resume it with the version that wrote it")
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


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder (``step-*``), a run folder (its newest checkpoint) or a ``.safetensors`` file."""
    p = Path(path)
    if p.is_dir() and not (p / "model.safetensors").is_file():
        found = latest_checkpoint(p)
        if found is None:
            raise FileNotFoundError(f"{p}: no checkpoint (step-*/ or model.safetensors) found")
        return found
    if not p.exists():
        raise FileNotFoundError(f"{p}: checkpoint not found")
    return p


def model_config_from_checkpoint(ckpt: Path) -> ObjectiveConfig | None:
    """The model config recorded in the checkpoint's ``state.json`` (None when it has none)."""
    saved = saved_model_config(ckpt)
    if saved is None:
        return None
    names = {f.name for f in fields(ObjectiveConfig)}
    return from_dict(ObjectiveConfig, {k: v for k, v in saved.items() if k in names}, f"{ckpt}/state.json:model")


def load_weights(path: Path, model: torch.nn.Module, *, strict: bool = True, ema: bool = False) -> list[str]:
    """Load weights (no pickle); a shape or name mismatch is a one-line error naming the checkpoint."""
    name = "ema.safetensors" if ema and (path / "ema.safetensors").is_file() else "model.safetensors"
    f = path / name if path.is_dir() else path
    if not f.is_file():
        raise FileNotFoundError(f"{f}: checkpoint weights not found")
    return _apply_weights(f, read_tensors(f), model, strict)


def load_objective(checkpoint: str | Path) -> tuple[torch.nn.Module, ObjectiveConfig]:
    """The objective (eval mode) of a pretraining checkpoint/run folder or a ``scd finetune`` output folder
    (``result.json`` + ``model.safetensors`` whose objective weights are prefixed ``objective.``)."""
    p = Path(checkpoint)
    if (p / "result.json").is_file() and (p / "model.safetensors").is_file():
        model = json.loads((p / "result.json").read_text())["config"]["model"]
        tensors = {k[len(_FINETUNED_PREFIX):]: v for k, v in read_tensors(p / "model.safetensors").items()
                   if k.startswith(_FINETUNED_PREFIX)}
        cfg = from_dict(ObjectiveConfig, model, "model")
        objective = build_objective(cfg)
        objective.load_state_dict(tensors)
        return objective.eval(), cfg
    ckpt = resolve_checkpoint(p)
    saved = saved_model_config(ckpt)
    if saved is None:
        raise ValueError(f"{ckpt}: no state.json with a model config next to the weights, so the model is unknown")
    cfg = from_dict(ObjectiveConfig, saved, "model")
    objective = build_objective(cfg)
    load_weights(ckpt, objective)
    return objective.eval(), cfg


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
