"""Fine-tuning a pretrained backbone (or one from scratch): ``task: property`` or ``task: energy_forces``.

``property``: the objective's backbone run once, conditioned on the mask token (``objective.embed``),
plus a per-atom scalar MLP head with a sum or mean readout. Targets are standardised with the train
split's mean/std; early stopping watches the validation MAE; the test MAE of the best-validation weights
is written to ``out/result.json`` together with the exact split keys. The authors' fine-tuning protocol
is a set of options (off by default, see :class:`FinetuneConfig`): an auxiliary denoising loss through the
pretrained vector head, random rotations, a drop-path schedule, a step-based warmup + cosine schedule and
an EMA of the weights for evaluation; every random draw is keyed by (seed, sample key, step). ``energy_forces`` is
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
from scd_train.optim import EMA, OptimConfig, build_optimizer
from scd_train.splits import SplitConfig, labelled_graphs, make_splits
from scd_train.views import ViewConfig, make_views
from shards.config import ConfigError, load_yaml, to_dict
from shards.format.schema import AtomGraph
from shards.progress import Progress
from shards.stream.collate import collate

__all__ = ["TASKS", "TASK_DEFAULTS", "FinetuneConfig", "PropertyModel", "SplitConfig", "finetune", "finetune_optimizer",
           "labelled_graphs", "load_finetune_config", "make_splits", "model_config_from_checkpoint",
           "resolve_checkpoint", "resolve_model_config", "setting"]

_BACKBONE_FIELDS = ("backbone", "hidden", "layers", "heads", "num_rbf", "cutoff")


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run. ``checkpoint: null`` trains the same model from scratch.

    ``model`` (optional with a checkpoint: read from it, else checked against it) describes the backbone;
    ``split_file`` (JSON with train/val/test key lists) overrides the seeded split. ``drop_path`` and
    ``train_embeddings`` apply to fine-tuning. ``loss``, ``batch_size``, ``lr`` and ``grad_clip`` left
    null take the task's defaults (:data:`TASK_DEFAULTS`). ``energy_weight``/``force_weight`` weigh
    the ``energy_forces`` loss; ``eval_max_atoms`` is the atom budget of evaluation batches.

    The authors' protocol (``task: property`` only; the defaults keep the original behaviour):
    ``steps`` (total optimiser steps, replacing ``epochs``; validation still after every pass over the
    train split and at the last step) with ``warmup_steps`` of linear warmup (default: ``warmup_epochs``)
    then a cosine to 0; ``aux_denoise_weight`` > 0 adds ``weight * MSE`` of the pretrained vector head's
    prediction of the noise added to the training inputs (``aux_noise`` Å per atom and axis; target
    noise / ``aux_noise``); ``rotate`` draws a random rotation of every training input;
    ``drop_path_final`` moves the drop-path rate linearly from ``drop_path`` to it over training;
    ``ema_decay`` evaluates (and keeps) an exponential moving average of the weights. A lower learning
    rate for the pretrained body is ``lr`` (body) below ``head_lr`` (the new property head).
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
    steps: int | None = None
    warmup_steps: int | None = None
    aux_denoise_weight: float = 0.0
    aux_noise: float = 0.005
    rotate: bool = False
    drop_path_final: float | None = None
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.patience < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise ConfigError("epochs, patience and batch_size must be >= 1")
        if self.eval_max_atoms < 1 or self.energy_weight < 0 or self.force_weight < 0:
            raise ConfigError("eval_max_atoms must be >= 1 and the loss weights >= 0")
        if (self.steps is not None and self.steps < 1) or (self.warmup_steps is not None and self.warmup_steps < 0):
            raise ConfigError("steps must be >= 1 and warmup_steps >= 0")
        if self.aux_denoise_weight < 0 or not self.aux_noise > 0:
            raise ConfigError("aux_denoise_weight must be >= 0 and aux_noise > 0")
        if not all(0.0 <= p < 1.0 for p in (self.drop_path, self.drop_path_final or 0.0)):
            raise ConfigError("drop_path and drop_path_final must be in [0, 1)")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError("ema_decay must be in (0, 1)")
        changed = [k for k, v in PROTOCOL_DEFAULTS.items() if getattr(self, k) != v]
        if self.task != "property" and changed:
            raise ConfigError(f"{', '.join(changed)}: fine-tuning protocol options of task: property only")


# The protocol options' "off" values (task: energy_forces rejects any other).
PROTOCOL_DEFAULTS: dict[str, Any] = {"steps": None, "warmup_steps": None, "aux_denoise_weight": 0.0, "rotate": False,
                                     "drop_path_final": None, "ema_decay": None}


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

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> Tensor:
        return self.predict_with_noise(batch, generator, noise=False)[0]

    def predict_with_noise(self, batch: dict[str, Any], generator: torch.Generator | None = None,
                           noise: bool = True) -> tuple[Tensor, Tensor | None]:
        """``(property [G], noise [N, 3] or None)`` from one pass: the property head on the scalar features
        and (``noise``) the pretrained objective's vector head (:class:`scd_train.models.VectorHead`)."""
        _, s, v = self.objective.embed(batch, generator=generator)
        n_graphs = int(batch["n_atoms"].shape[0])
        out = scatter_sum(self.head(s).squeeze(-1), batch["batch"], n_graphs)
        out = out / batch["n_atoms"].to(out.dtype) if self.readout == "mean" else out
        return out, self.objective.head(s, v) if noise else None


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
    total, warmup = schedule_length(cfg, steps_per_epoch)
    ocfg = OptimConfig(lr=lr, weight_decay=cfg.weight_decay, warmup_steps=warmup)
    return build_optimizer(model, ocfg, total, {"head.": head_lr} if head_lr else None)


def schedule_length(cfg: FinetuneConfig, steps_per_epoch: int) -> tuple[int, int]:
    """``(total, warmup)`` optimiser steps: ``cfg.steps`` / ``cfg.warmup_steps`` when given, else whole epochs."""
    total = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else cfg.warmup_epochs * steps_per_epoch
    return total, warmup


def augment_view_config(cfg: FinetuneConfig, cutoff: float) -> ViewConfig | None:
    """The per-step training views (rotation and/or the auxiliary loss's noise), or None when neither is on."""
    if not cfg.rotate and cfg.aux_denoise_weight <= 0:
        return None
    return ViewConfig(noise=cfg.aux_denoise_weight > 0, clean_sigma=0.0, noisy_sigma=cfg.aux_noise, rotate=cfg.rotate,
                      crystal_repeat_p=0.0, cutoff=cutoff)


def augmented_view(g: AtomGraph, vc: ViewConfig, seed: int, step: int) -> dict[str, Any]:
    """One training view of ``g`` at optimiser step ``step``, keyed by (seed, key, step): rotated when
    ``vc.rotate``; with ``vc.noise`` its positions (and graph) are the noisy ones and ``noise`` the target."""
    view = make_views(g, vc, seed, step)
    if not vc.noise:
        return view
    out = {k: v for k, v in view.items() if not k.endswith("_clean")}
    for name in ("pos", "edge_index", "edge_shift"):
        out[name] = out.pop(name + "_noisy")
    return out


def drop_path_at(cfg: FinetuneConfig, step: int, total: int) -> float:
    """The drop-path rate of optimiser step ``step``: ``drop_path`` moving linearly to ``drop_path_final``."""
    if cfg.drop_path_final is None:
        return cfg.drop_path
    return cfg.drop_path + (cfg.drop_path_final - cfg.drop_path) * min(1.0, step / max(1, total - 1))


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
    steps_per_epoch = math.ceil(len(splits["train"]) / batch_size)
    total, _ = schedule_length(cfg, steps_per_epoch)
    epochs = math.ceil(total / steps_per_epoch) if cfg.steps is not None else cfg.epochs
    aug = augment_view_config(cfg, cutoff)
    train_graphs = [graphs[key] for key in splits["train"]]
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay is not None else None

    def evaluate(part: str) -> np.ndarray:
        net = model if ema is None else ema.shadow
        assert isinstance(net, PropertyModel)
        return predict(net, views[part], cfg.eval_max_atoms, device) * std + mean

    def weights() -> dict[str, Tensor]:
        return copy.deepcopy((ema.shadow if ema is not None else model).state_dict())

    t_setup = time.perf_counter() - t0
    t_eval = time.perf_counter()
    val_mae = float(np.abs(evaluate("val") - y_ev["val"]).mean())
    t_eval, t_train = time.perf_counter() - t_eval, 0.0
    curve = [{"epoch": 0, "step": 0, "train_loss": None, "val_mae_eV": val_mae, "lr": 0.0}]
    best, best_epoch, best_state, stale = val_mae, 0, weights(), 0
    step = 0
    bar = Progress(epochs, f"finetune {cfg.property}", "epoch", enabled=cfg.progress)
    for epoch in range(1, epochs + 1):
        t = time.perf_counter()
        model.train()
        losses, aux_losses = [], []
        order = rng.permutation(len(train_graphs))
        for i in range(0, len(train_graphs), batch_size):
            if step >= total:
                break
            idx = order[i:i + batch_size]
            items = [augmented_view(train_graphs[j], aug, cfg.seed, step) for j in idx] if aug is not None \
                else [views["train"][j] for j in idx]
            b = to_torch(collate(items), device)
            model.objective.backbone.cfg = dataclasses.replace(model.objective.backbone.cfg,
                                                               drop_path=drop_path_at(cfg, step, total))
            pred, eps = model.predict_with_noise(b, gen, noise=cfg.aux_denoise_weight > 0)
            loss = loss_fn(pred.float(), torch.as_tensor(y["train"][idx], dtype=torch.float32, device=device))
            total_loss = loss
            if eps is not None:
                aux = ((eps.float() - model.objective.noise_target(b).float() / cfg.aux_noise) ** 2).mean()
                total_loss = loss + cfg.aux_denoise_weight * aux
                aux_losses.append(aux.item())
            opt.zero_grad(set_to_none=True)
            total_loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(model)
            losses.append(loss.item())
            step += 1
        t_train += time.perf_counter() - t
        t = time.perf_counter()
        val_mae = float(np.abs(evaluate("val") - y_ev["val"]).mean())
        t_eval += time.perf_counter() - t
        curve.append({"epoch": epoch, "step": step, "train_loss": float(np.mean(losses)), "val_mae_eV": val_mae,
                      "lr": float(sched.get_last_lr()[0]),
                      **({"aux_loss": float(np.mean(aux_losses))} if aux_losses else {}),
                      **({"drop_path": drop_path_at(cfg, step - 1, total)} if cfg.drop_path_final is not None else {})})
        bar.set_postfix(val_meV=f"{val_mae * 1000:.1f}")
        bar.update()
        if val_mae < best:
            best, best_epoch, stale = val_mae, epoch, 0
            best_state = weights()
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    bar.close()
    model.load_state_dict(best_state)
    test_pred = predict(model, views["test"], cfg.eval_max_atoms, device) * std + mean
    test_mae = float(np.abs(test_pred - y_ev["test"]).mean())
    result = {
        "property": cfg.property, "unit": "eV", "test_mae_eV": test_mae, "test_mae_meV": test_mae * 1000,
        "best_val_mae_eV": best, "best_val_mae_meV": best * 1000, "best_epoch": best_epoch,
        "epochs_run": len(curve) - 1, "stopped_early": len(curve) - 1 < epochs, "steps_run": step,
        "target_mean_eV": mean, "target_std_eV": std,
        "n": {k: len(v) for k, v in splits.items()}, "curve": curve,
        "seconds": round(time.perf_counter() - t0, 1), "config": to_dict(cfg), "model": to_dict(model_cfg),
        "timing": {"setup_s": t_setup, "train_s": t_train, "eval_s": t_eval, "evaluations": len(curve)},
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
