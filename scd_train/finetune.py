"""Fine-tuning a pretrained backbone (or one from scratch): ``task: property`` or ``task: energy_forces``.

``property``: the objective's backbone run once, conditioned on the mask token (``objective.embed``),
plus a per-atom scalar MLP head with a sum or mean readout. Targets are standardised with the train
split's mean/std; early stopping watches the validation MAE; the test MAE of the best-validation weights
is written to ``out/result.json`` together with the exact split keys. ``energy_forces`` is
:mod:`scd_train.finetune_forces`. The backbone configuration is read from the checkpoint unless the
config names one (then it is checked against the checkpoint).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from scd_train.checkpoint import load_weights, model_config_from_checkpoint, resolve_checkpoint, saved_model_config
from scd_train.data import to_torch
from scd_train.dist import select_device
from scd_train.models import backbone_config
from scd_train.models.base import scatter_sum
from scd_train.objectives import ObjectiveConfig, build_objective
from scd_train.optim import OptimConfig, build_optimizer
from scd_train.views import ViewConfig, make_views
from shards.config import ConfigError, load_yaml, to_dict
from shards.format.reader import ShardDataset
from shards.format.schema import AtomGraph
from shards.stream.collate import collate

__all__ = ["TASKS", "TASK_DEFAULTS", "FinetuneConfig", "PropertyModel", "SplitConfig", "finetune", "finetune_optimizer",
           "labelled_graphs", "load_finetune_config", "make_splits", "model_config_from_checkpoint",
           "resolve_checkpoint", "resolve_model_config", "setting"]

_BACKBONE_FIELDS = ("backbone", "hidden", "layers", "heads", "num_rbf", "cutoff")


@dataclass(frozen=True)
class SplitConfig:
    """Sizes of the train/val/test splits, drawn by ``seed`` from the sorted labelled keys.

    ``by: trajectory`` keeps every trajectory (``trajectory_id``) in one split: whole trajectories, in a
    seeded order, fill train, then val, then test until each holds at least its size.
    """

    train: int = 2000
    val: int = 500
    test: int = 2000
    seed: int = 0
    by: Literal["frames", "trajectory"] = "frames"

    def __post_init__(self) -> None:
        if min(self.train, self.val, self.test) < 1:
            raise ConfigError("split: train, val and test must each be >= 1")


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run. ``checkpoint: null`` trains the same model from scratch.

    ``model`` (optional with a checkpoint: read from it, else checked against it) describes the backbone;
    ``split_file`` (JSON with train/val/test key lists) overrides the seeded split. ``drop_path`` and
    ``train_embeddings`` apply to fine-tuning. ``loss``, ``batch_size``, ``lr`` and ``grad_clip`` left
    null take the task's defaults (:data:`TASK_DEFAULTS`). ``energy_weight``/``force_weight`` weigh
    the ``energy_forces`` loss; ``eval_max_atoms`` is the atom budget of evaluation batches.
    """

    data: str = ""
    out: str = ""
    task: Literal["property", "energy_forces"] = "property"
    property: str = "homo"
    checkpoint: str | None = None
    model: ObjectiveConfig | None = None
    split: SplitConfig = field(default_factory=SplitConfig)
    split_file: str | None = None
    readout: Literal["sum", "mean"] = "sum"
    loss: Literal["l1", "mse"] | None = None
    energy_weight: float = 0.2
    force_weight: float = 0.8
    epochs: int = 100
    patience: int = 10
    batch_size: int | None = None
    eval_max_atoms: int = 4096
    lr: float | None = None
    head_lr: float | None = None
    weight_decay: float = 0.0
    warmup_epochs: int = 1
    grad_clip: float | None = None
    drop_path: float = 0.0
    train_embeddings: bool = True
    seed: int = 0
    device: str = "auto"
    save_model: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.patience < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise ConfigError("epochs, patience and batch_size must be >= 1")
        if self.eval_max_atoms < 1 or self.energy_weight < 0 or self.force_weight < 0:
            raise ConfigError("eval_max_atoms must be >= 1 and the loss weights >= 0")


# The authors' recipes: lr 5e-4 / clip 10 for properties; lr 1e-3, clip 40, MSE, batch 8 for energy + forces.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "property": {"loss": "l1", "batch_size": 32, "lr": 5e-4, "grad_clip": 10.0},
    "energy_forces": {"loss": "mse", "batch_size": 8, "lr": 1e-3, "grad_clip": 40.0},
}


def setting(cfg: FinetuneConfig, name: str) -> Any:
    """``cfg.<name>``, or the task's default when it is null."""
    value = getattr(cfg, name)
    return TASK_DEFAULTS[cfg.task][name] if value is None else value


def load_finetune_config(path: str | Path, overrides: list[str] | None = None) -> FinetuneConfig:
    """Load a fine-tuning YAML (unknown keys are errors); ``data`` and ``out`` are required."""
    cfg = load_yaml(FinetuneConfig, path, overrides)
    if not cfg.data or not cfg.out:
        raise ConfigError(f"{path}: data and out are required")
    return cfg


def make_splits(keys: list[str], split: SplitConfig, groups: dict[str, str] | None = None) -> dict[str, list[str]]:
    """A seeded permutation of the sorted keys cut into train/val/test (disjoint, deterministic).

    With ``split.by == "trajectory"``, ``groups`` maps each key to its trajectory id and whole
    trajectories are dealt instead of frames.
    """
    if split.by == "trajectory":
        return _split_by_group(keys, split, groups or {})
    need = split.train + split.val + split.test
    if len(keys) < need:
        raise ValueError(f"too few labelled samples: {len(keys)} available, the split needs {need} "
                         f"(train {split.train} + val {split.val} + test {split.test})")
    ordered = sorted(keys)
    perm = np.random.default_rng(split.seed).permutation(len(ordered))
    picked = [ordered[i] for i in perm[:need]]
    a, b = split.train, split.train + split.val
    return {"train": picked[:a], "val": picked[a:b], "test": picked[b:]}


def _split_by_group(keys: list[str], split: SplitConfig, groups: dict[str, str]) -> dict[str, list[str]]:
    missing = [k for k in keys if not groups.get(k)]
    if missing:
        raise ValueError(f"split by trajectory: {len(missing)} samples have no trajectory_id (first: {missing[0]})")
    members: dict[str, list[str]] = {}
    for k in sorted(keys):
        members.setdefault(groups[k], []).append(k)
    names = sorted(members)
    order = [names[i] for i in np.random.default_rng(split.seed).permutation(len(names))]
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    sizes = {"train": split.train, "val": split.val, "test": split.test}
    parts = iter(out)
    part = next(parts)
    for name in order:
        while len(out[part]) >= sizes[part]:
            part = next(parts, "")
            if not part:
                break
        if not part:
            break
        out[part].extend(members[name])
    short = [p for p in out if len(out[p]) < sizes[p]]
    if short:
        raise ValueError(f"split by trajectory: {len(names)} trajectories ({len(keys)} frames) cannot fill "
                         f"{short[0]} ({len(out[short[0]])} of {sizes[short[0]]} frames)")
    return out


def labelled_graphs(data: str | Path, prop: str) -> dict[str, AtomGraph]:
    """All graphs of a shard dataset that carry property ``prop``, by key."""
    out: dict[str, AtomGraph] = {}
    seen: set[str] = set()
    for g in ShardDataset(str(data)):
        props = g.properties or {}
        seen.update(props)
        if prop in props and math.isfinite(float(props[prop])):
            out[g.key] = g
    if not out:
        raise ValueError(f"property {prop!r} is not in {data}; available: {sorted(seen) or 'none'}")
    return out


def resolve_model_config(cfg: FinetuneConfig) -> ObjectiveConfig:
    """``cfg.model`` checked against the checkpoint, or the checkpoint's own config when ``model`` is null."""
    if not cfg.checkpoint:
        return cfg.model or ObjectiveConfig()
    ckpt = resolve_checkpoint(cfg.checkpoint)
    if cfg.model is not None:
        check_backbone_matches(ckpt, cfg.model)
        return cfg.model
    found = model_config_from_checkpoint(ckpt)
    if found is None:
        raise ValueError(f"{ckpt}: the checkpoint records no model config (no state.json); give `model:` in the config")
    return found


def check_backbone_matches(ckpt: Path, model: ObjectiveConfig) -> None:
    """Compare the backbone recorded next to a checkpoint with ``model``; one-line error on mismatch."""
    saved = saved_model_config(ckpt)
    if saved is None:
        return
    mine = backbone_config(model.backbone, model.preset, **{k: getattr(model, k) for k in _BACKBONE_FIELDS[1:]})
    theirs = backbone_config(saved.get("backbone", "et"), saved.get("preset", "small"),
                             **{k: saved.get(k) for k in _BACKBONE_FIELDS[1:]})
    diff = [f"{k}: config {getattr(mine, k, model.backbone)} vs checkpoint {getattr(theirs, k, saved.get(k))}"
            for k in ("hidden", "layers", "heads", "num_rbf", "cutoff")
            if getattr(mine, k, None) != getattr(theirs, k, None)]
    if type(mine) is not type(theirs):
        diff.insert(0, f"backbone: config {model.backbone} vs checkpoint {saved.get('backbone')}")
    if diff:
        raise ValueError(f"{ckpt}: checkpoint backbone does not match the config ({'; '.join(diff)})")


class PropertyModel(nn.Module):
    """Objective backbone (one pass, mask-token conditioned) -> per-atom MLP -> sum/mean readout."""

    def __init__(self, objective: Any, readout: str = "sum") -> None:
        super().__init__()
        hidden = objective.backbone.hidden
        self.objective, self.readout = objective, readout
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden // 2), nn.SiLU(),
                                  nn.Linear(hidden // 2, 1))

    def forward(self, batch: dict[str, Any]) -> Tensor:
        _, s, _ = self.objective.embed(batch)
        n_graphs = int(batch["n_atoms"].shape[0])
        out = scatter_sum(self.head(s).squeeze(-1), batch["batch"], n_graphs)
        return out / batch["n_atoms"].to(out.dtype) if self.readout == "mean" else out


def build_objective_for(cfg: FinetuneConfig, model_cfg: ObjectiveConfig,
                        head: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """``head(objective)`` initialised from ``cfg.seed`` (global RNG untouched), backbone from the checkpoint."""
    full = dataclasses.replace(model_cfg, drop_path=cfg.drop_path, freeze_embeddings=not cfg.train_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        objective = build_objective(full)
        model = head(objective)
    if cfg.checkpoint:
        load_weights(resolve_checkpoint(cfg.checkpoint), objective)
    return model


def build_model(cfg: FinetuneConfig, model_cfg: ObjectiveConfig | None = None) -> PropertyModel:
    """The downstream property model (see :func:`build_objective_for`)."""
    model_cfg = model_cfg or resolve_model_config(cfg)
    model = build_objective_for(cfg, model_cfg, lambda obj: PropertyModel(obj, cfg.readout))
    assert isinstance(model, PropertyModel)
    return model


def _views(graphs: list[AtomGraph], cutoff: float) -> list[dict[str, Any]]:
    vc = ViewConfig(noise=False, rotate=False, cutoff=cutoff)
    return [make_views(g, vc, 0, 0) for g in graphs]


def _batches(views: list[dict[str, Any]], y: np.ndarray, order: np.ndarray, size: int):
    for i in range(0, len(order), size):
        idx = order[i:i + size]
        yield collate([views[j] for j in idx]), y[idx]


@torch.no_grad()
def predict(model: PropertyModel, views: list[dict[str, Any]], max_atoms: int, device: torch.device) -> np.ndarray:
    """Model outputs (standardised units) for ``views`` in order, in batches of at most ``max_atoms`` atoms."""
    from scd_train.forcefield import atom_batches

    model.eval()
    outs = [model(to_torch(collate([views[i] for i in idx]), device)).double().cpu().numpy()
            for idx in atom_batches([int(v["n_atoms"]) for v in views], max_atoms)]
    return np.concatenate(outs) if outs else np.zeros(0)


def finetune_optimizer(cfg: FinetuneConfig, model: nn.Module, lr: float, steps_per_epoch: int, *,
                       head_lr: float | None = None
                       ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The trainer's optimiser (:func:`scd_train.optim.build_optimizer`: AdamW with its decay exclusions,
    linear warmup over ``warmup_epochs`` then cosine) over all ``cfg.epochs``; ``model.head`` at ``head_lr``
    when given."""
    ocfg = OptimConfig(lr=lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_epochs * steps_per_epoch)
    return build_optimizer(model, ocfg, cfg.epochs * steps_per_epoch, {"head.": head_lr} if head_lr else None)


def load_splits(cfg: FinetuneConfig, graphs: dict[str, AtomGraph], what: str) -> dict[str, list[str]]:
    """``cfg.split_file`` (every key must be in ``graphs``) or the seeded split of ``graphs``."""
    if cfg.split_file:
        splits = {k: list(v) for k, v in json.loads(Path(cfg.split_file).read_text()).items()
                  if k in ("train", "val", "test")}
        missing = [k for part in splits.values() for k in part if k not in graphs]
        if missing:
            raise ValueError(f"{cfg.split_file}: {len(missing)} split keys have no {what} "
                             f"in {cfg.data} (first: {missing[0]})")
        return splits
    groups = {k: g.trajectory_id or "" for k, g in graphs.items()} if cfg.split.by == "trajectory" else None
    return make_splits(list(graphs), cfg.split, groups)


def finetune(cfg: FinetuneConfig, log: Any = print) -> dict[str, Any]:
    """Run one fine-tuning of ``cfg.task``; writes ``out/result.json`` (and the model) and returns the result."""
    return TASKS[cfg.task](cfg, log)


def _energy_forces(cfg: FinetuneConfig, log: Any) -> dict[str, Any]:
    from scd_train.finetune_forces import finetune_energy_forces

    return finetune_energy_forces(cfg, log)


def _property(cfg: FinetuneConfig, log: Any = print) -> dict[str, Any]:
    from tqdm import tqdm

    t0 = time.perf_counter()
    out = Path(cfg.out)
    graphs = labelled_graphs(cfg.data, cfg.property)
    splits = load_splits(cfg, graphs, f"{cfg.property!r} label")
    batch_size, lr, clip = setting(cfg, "batch_size"), setting(cfg, "lr"), setting(cfg, "grad_clip")
    device = select_device(cfg.device)
    model_cfg = resolve_model_config(cfg)
    model = build_model(cfg, model_cfg).to(device)
    cutoff = model.objective.backbone.cfg.cutoff
    views = {k: _views([graphs[key] for key in keys], cutoff) for k, keys in splits.items()}
    y_ev = {k: np.array([(graphs[key].properties or {})[cfg.property] for key in keys]) for k, keys in splits.items()}
    mean, std = float(y_ev["train"].mean()), float(y_ev["train"].std() or 1.0)
    y = {k: (v - mean) / std for k, v in y_ev.items()}
    opt, sched = finetune_optimizer(cfg, model, lr, math.ceil(len(splits["train"]) / batch_size),
                                    head_lr=cfg.head_lr)
    loss_fn = nn.L1Loss() if setting(cfg, "loss") == "l1" else nn.MSELoss()
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    val_mae = float(np.abs(predict(model, views["val"], cfg.eval_max_atoms, device) * std + mean - y_ev["val"]).mean())
    curve = [{"epoch": 0, "train_loss": None, "val_mae_eV": val_mae, "lr": 0.0}]
    best, best_epoch, best_state, stale = val_mae, 0, copy.deepcopy(model.state_dict()), 0
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"finetune {cfg.property}", unit="epoch", disable=not cfg.progress)
    for epoch in bar:
        model.train()
        losses = []
        for b, yb in _batches(views["train"], y["train"], rng.permutation(len(views["train"])), batch_size):
            pred = model(to_torch(b, device))
            loss = loss_fn(pred.float(), torch.as_tensor(yb, dtype=torch.float32, device=device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
        val_mae = float(np.abs(predict(model, views["val"], cfg.eval_max_atoms, device) * std + mean
                               - y_ev["val"]).mean())
        curve.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_mae_eV": val_mae,
                      "lr": float(sched.get_last_lr()[0])})
        bar.set_postfix(val_meV=f"{val_mae * 1000:.1f}")
        if val_mae < best:
            best, best_epoch, stale = val_mae, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    model.load_state_dict(best_state)
    test_pred = predict(model, views["test"], cfg.eval_max_atoms, device) * std + mean
    test_mae = float(np.abs(test_pred - y_ev["test"]).mean())
    result = {
        "property": cfg.property, "unit": "eV", "test_mae_eV": test_mae, "test_mae_meV": test_mae * 1000,
        "best_val_mae_eV": best, "best_val_mae_meV": best * 1000, "best_epoch": best_epoch,
        "epochs_run": len(curve) - 1, "stopped_early": len(curve) - 1 < cfg.epochs,
        "target_mean_eV": mean, "target_std_eV": std,
        "n": {k: len(v) for k, v in splits.items()}, "curve": curve,
        "seconds": round(time.perf_counter() - t0, 1), "config": to_dict(cfg), "model": to_dict(model_cfg),
        "splits": splits,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    if cfg.save_model:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(out / "model.safetensors"))
    log(f"{cfg.property}: test MAE {test_mae * 1000:.1f} meV (best val {best * 1000:.1f} meV at epoch "
        f"{best_epoch}/{len(curve) - 1}) -> {out / 'result.json'}")
    return result


TASKS: dict[str, Callable[[FinetuneConfig, Any], dict[str, Any]]] = {
    "property": _property,
    "energy_forces": _energy_forces,
}
