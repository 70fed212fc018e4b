"""``task: energy_forces``: fine-tune a backbone into a force field on MD frames with energies and forces.

The model is :class:`scd_train.forcefield.EnergyModel`; per-element reference energies are fitted on
the training split and the energy scale is the RMS of the training forces. The loss is
``energy_weight * err(E / scale) + force_weight * err(F / scale)`` (MSE by default) with forces from
autograd (``create_graph``), so the force loss trains the energy. Early stopping watches
``energy_weight * energy MAE + force_weight * force MAE`` on the validation split; the best weights are
saved as a force field (``model.safetensors`` + ``forcefield.json``, loadable by
:class:`scd_train.calculator.SCDCalculator`), metrics and learning curves go to ``result.json``.
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from scd_train.dist import select_device
from scd_train.finetune import (
    FinetuneConfig,
    build_objective_for,
    finetune_optimizer,
    load_splits,
    resolve_model_config,
    setting,
)
from scd_train.forcefield import (
    EnergyModel,
    atom_batches,
    fit_element_references,
    graph_item,
    save_forcefield,
    structure_batch,
)
from shards.config import to_dict
from shards.format.reader import ShardDataset
from shards.format.schema import AtomGraph
from shards.progress import Progress

__all__ = ["evaluate", "finetune_energy_forces", "force_graphs"]


def force_graphs(data: str | Path) -> dict[str, AtomGraph]:
    """All graphs of a shard dataset with a finite energy and forces, by key."""
    out: dict[str, AtomGraph] = {}
    n = 0
    for g in ShardDataset(str(data)):
        n += 1
        if g.energy is not None and g.forces is not None and math.isfinite(g.energy) and np.isfinite(g.forces).all():
            out[g.key] = g
    if not out:
        raise ValueError(f"{data}: none of its {n} samples has both an energy and forces (task energy_forces needs "
                         "MD frames with labels, e.g. from the ase_traj, xyz or zarr_traj converters)")
    return out


class _Split:
    """Graph items and float64 labels of one split."""

    def __init__(self, graphs: list[AtomGraph], cutoff: float) -> None:
        self.items = [graph_item(g.atomic_numbers, g.positions, g.cell, g.pbc, cutoff) for g in graphs]
        self.energy = np.array([float(g.energy) for g in graphs])  # type: ignore[arg-type]
        self.forces = [np.asarray(g.forces, dtype=np.float64) for g in graphs]
        self.n_atoms = np.array([len(g.atomic_numbers) for g in graphs])

    def labels(self, idx: list[int], device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        e = torch.as_tensor(self.energy[idx], dtype=torch.float64, device=device)
        f = torch.as_tensor(np.concatenate([self.forces[i] for i in idx]), dtype=dtype, device=device)
        return e, f


def evaluate(model: EnergyModel, split: _Split, max_atoms: int, device: torch.device) -> dict[str, float]:
    """Energy MAE (meV, meV/atom) and force MAE (meV/Å, over components) of ``split``."""
    model.eval()
    dtype = next(model.parameters()).dtype
    e_err, e_err_atom, f_abs, f_n = [], [], 0.0, 0
    for idx in atom_batches(split.n_atoms.tolist(), max_atoms):
        out = model(structure_batch([split.items[i] for i in idx], device, dtype), forces=True)
        e, f = split.labels(idx, device, dtype)
        de = (out["energy"].detach() - e).abs().cpu().numpy()
        e_err.append(de)
        e_err_atom.append(de / split.n_atoms[idx])
        f_abs += float((out["forces"].detach() - f).abs().double().sum())
        f_n += f.numel()
    return {"energy_mae_meV": 1000 * float(np.concatenate(e_err).mean()),
            "energy_mae_meV_per_atom": 1000 * float(np.concatenate(e_err_atom).mean()),
            "force_mae_meV_per_A": 1000 * f_abs / max(1, f_n)}


def _score(cfg: FinetuneConfig, m: dict[str, float]) -> float:
    return cfg.energy_weight * m["energy_mae_meV"] + cfg.force_weight * m["force_mae_meV_per_A"]


def plot_curve(curve: list[dict[str, Any]], path: Path) -> None:
    """Validation energy and force MAE vs epoch (two panels)."""
    from shards.tools.plot import pyplot

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    ep = [c["epoch"] for c in curve]
    for ax, key, label in ((axes[0], "energy_mae_meV", "val energy MAE (meV)"),
                           (axes[1], "force_mae_meV_per_A", "val force MAE (meV/Å)")):
        ax.plot(ep, [c["val"][key] for c in curve])
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finetune_energy_forces(cfg: FinetuneConfig, log: Any = print) -> dict[str, Any]:
    """Run one energy + forces fine-tuning; writes ``out/result.json`` and the force field."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    graphs = force_graphs(cfg.data)
    splits = load_splits(cfg, graphs, "energy and forces")
    batch_size, lr, clip = setting(cfg, "batch_size"), setting(cfg, "lr"), setting(cfg, "grad_clip")
    err = torch.abs if setting(cfg, "loss") == "l1" else torch.square
    device = select_device(cfg.device)
    model_cfg = resolve_model_config(cfg)
    train_graphs = [graphs[k] for k in splits["train"]]
    ref = fit_element_references([g.atomic_numbers for g in train_graphs],
                                 np.array([float(g.energy) for g in train_graphs]))  # type: ignore[arg-type]
    rms = float(np.sqrt(np.mean(np.concatenate([np.asarray(g.forces, np.float64).ravel() for g in train_graphs]) ** 2)))
    scale = rms if rms > 1e-6 else 1.0
    model = build_objective_for(cfg, model_cfg, lambda obj: EnergyModel(obj, ref, scale)).to(device)
    assert isinstance(model, EnergyModel)
    data = {k: _Split([graphs[key] for key in keys], model.cutoff) for k, keys in splits.items()}
    elements = sorted({int(z) for g in train_graphs for z in g.atomic_numbers})
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = finetune_optimizer(cfg, model, lr, math.ceil(len(splits["train"]) / batch_size))
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    val = evaluate(model, data["val"], cfg.eval_max_atoms, device)
    curve: list[dict[str, Any]] = [{"epoch": 0, "train_loss": None, "val": val, "lr": 0.0}]
    best, best_epoch, best_state, stale = _score(cfg, val), 0, copy.deepcopy(model.state_dict()), 0
    train = data["train"]
    bar = Progress(cfg.epochs, "finetune energy+forces", "epoch", enabled=cfg.progress)
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        losses = []
        order = rng.permutation(len(train.items))
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size].tolist()
            batch = structure_batch([train.items[j] for j in idx], device, torch.float32)
            pred = model(batch, forces=True, create_graph=True, generator=gen)
            e, f = train.labels(idx, device, torch.float32)
            loss = (cfg.energy_weight * err((pred["energy"] - e) / scale).mean().float()
                    + cfg.force_weight * err((pred["forces"] - f) / scale).mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
        val = evaluate(model, data["val"], cfg.eval_max_atoms, device)
        curve.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val": val,
                      "lr": float(sched.get_last_lr()[0])})
        bar.set_postfix(E_meV=f"{val['energy_mae_meV']:.1f}", F_meV_A=f"{val['force_mae_meV_per_A']:.1f}")
        bar.update()
        score = _score(cfg, val)
        if score < best:
            best, best_epoch, stale = score, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    bar.close()
    model.load_state_dict(best_state)
    metrics = {part: evaluate(model, data[part], cfg.eval_max_atoms, device) for part in ("val", "test")}
    result = {
        "task": "energy_forces", "units": {"energy": "meV", "energy_per_atom": "meV/atom", "forces": "meV/Å"},
        "val": metrics["val"], "test": metrics["test"], "best_epoch": best_epoch, "epochs_run": len(curve) - 1,
        "stopped_early": len(curve) - 1 < cfg.epochs, "scale_eV": scale, "elements": elements,
        "n": {k: len(v) for k, v in splits.items()}, "curve": curve,
        "seconds": round(time.perf_counter() - t0, 1), "config": to_dict(cfg), "model": to_dict(model_cfg),
        "splits": splits,
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / "result.json")
    if cfg.save_model:
        save_forcefield(model, model_cfg, out, elements=elements,
                        extra={"source_checkpoint": cfg.checkpoint, "data": cfg.data})
    plot_curve(curve, out / "learning_curve.png")
    t = metrics["test"]
    log(f"energy_forces: test energy MAE {t['energy_mae_meV']:.1f} meV ({t['energy_mae_meV_per_atom']:.2f} meV/atom), "
        f"force MAE {t['force_mae_meV_per_A']:.1f} meV/Å (best val at epoch {best_epoch}/{len(curve) - 1}) "
        f"-> {out / 'result.json'}")
    return result
