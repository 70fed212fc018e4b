"""``scd study md``: energy + forces on one molecular trajectory, fine-tuned from SCD vs denoising vs scratch.

Steps, all into one folder: run GFN2-xTB (tblite) Langevin MD of one molecule (aspirin by default,
``md.traj``), write its frames as a shard dataset (``md/``, ``ingest: pipeline`` runs ``scd ingest run``
instead), draw the train/val/test frame split by seed (``splits.json``),
pretrain the same backbone with SCD and with plain denoising on QM9 molecules from the data kit (the
same steps, batches and optimiser), then fine-tune every arm and a from-scratch model with
``task: energy_forces`` for each seed and write ``results.md``, ``results.json``, ``learning_curves.png``
and every config used. Completed parts are reused when the command is run again.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from scd_train.finetune import FinetuneConfig, finetune
from scd_train.launch import run_ingest
from scd_train.objectives import ObjectiveConfig
from scd_train.splits import SplitConfig
from scd_train.study import ARMS, PretrainSpec, StudyConfig, load_config_with_defaults, pretrain, start_study
from shards.config import to_dict

__all__ = ["MDSpec", "MDStudyConfig", "load_md_study_config", "run_md_study"]


@dataclass(frozen=True)
class MDSpec:
    """The labelled trajectory: GFN2-xTB Langevin MD, one frame every ``stride`` steps."""

    smiles: str = "CC(=O)Oc1ccccc1C(=O)O"
    name: str = "aspirin"
    frames: int = 1100
    stride: int = 1
    temperature_K: float = 500.0
    timestep_fs: float = 0.5
    seed: int = 0


@dataclass(frozen=True)
class MDStudyConfig:
    """The whole study; ``finetune`` is the template of every fine-tuning run."""

    md: MDSpec = field(default_factory=MDSpec)
    ingest: Literal["builtin", "pipeline"] = "builtin"
    split: SplitConfig = field(default_factory=lambda: SplitConfig(train=950, val=50, test=100, seed=0))
    pretrain_records: int = 3000
    model: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig(
        preset="small", hidden=48, layers=2, heads=4, num_rbf=16, cutoff=4.0))
    pretrain: PretrainSpec = field(default_factory=lambda: PretrainSpec(steps=150, max_atoms=256, warmup_steps=15))
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(
        task="energy_forces", epochs=2, patience=2, batch_size=8, progress=False))
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = ARMS
    device: str = "cpu"
    threads: int | None = 1


def make_trajectory(cfg: MDStudyConfig, out: Path, log: Any = print) -> Path:
    """``out/md.traj`` (reused when present)."""
    from scd_train.mdgen import langevin_frames, molecule_from_smiles, write_traj, xtb_calculator

    path = out / "md.traj"
    if path.is_file():
        return path
    m = cfg.md
    log(f"  GFN2-xTB Langevin MD of {m.name}: {m.frames} frames x {m.stride} steps of {m.timestep_fs} fs "
        f"at {m.temperature_K} K")
    frames = langevin_frames(molecule_from_smiles(m.smiles, m.seed), xtb_calculator(), frames=m.frames,
                             stride=m.stride, temperature_K=m.temperature_K, timestep_fs=m.timestep_fs, seed=m.seed)
    return write_traj(frames, path)


def ingest_trajectory(cfg: MDStudyConfig, traj: Path, out: Path) -> Path:
    """The trajectory as a shard dataset ``out/md`` (``scd ingest run`` when ``ingest: pipeline``; the registry
    picks the converter of ``.traj`` files)."""
    dest = out / "md"
    if (dest / "manifest.json").is_file():
        return dest
    if cfg.ingest == "pipeline":
        job = {"output": str(dest), "sources": [{"source": cfg.md.name, "converter": "auto", "paths": [str(traj)]}]}
        return run_ingest(job, out / "ingest_job.yaml", who="scd study md", quiet=True)
    from ase.io.trajectory import Trajectory

    from shards.format.manifest import write_dataset
    from shards.format.schema import AtomGraph, make_key

    with Trajectory(str(traj)) as frames:
        graphs = [AtomGraph.from_ase(a, key=make_key(cfg.md.name, traj.name, i), domain="md", source=cfg.md.name,
                                     source_file=traj.name, index=i, trajectory_id=cfg.md.name,
                                     frame_time=float(a.info.get("time", 0.0)))
                  for i, a in enumerate(frames)]
    write_dataset(graphs, dest)
    return dest


def pretraining_data(cfg: MDStudyConfig, out: Path) -> Path:
    """The first ``pretrain_records`` QM9 molecules of the data kit (``out/pretrain_data``)."""
    from scd_train.datakit import qm9_csv
    from shards.format.manifest import write_dataset
    from shards.format.qm9 import iter_qm9_csv
    from shards.format.writer import WriterConfig

    dest = out / "pretrain_data"
    if not (dest / "manifest.json").is_file():
        write_dataset(iter_qm9_csv(qm9_csv(1), cfg.pretrain_records), dest, config=WriterConfig(max_shard_samples=5000))
    return dest


def _summary(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for arm, runs in results.items():
        row: dict[str, Any] = {"runs": len(runs)}
        for part in ("val", "test"):
            for key in ("energy_mae_meV", "energy_mae_meV_per_atom", "force_mae_meV_per_A"):
                vals = np.array([r[part][key] for r in runs])
                row[f"{part}_{key}"] = [float(v) for v in vals]
                row[f"{part}_{key}_mean"] = float(vals.mean())
                row[f"{part}_{key}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        out[arm] = row
    return out


def plot_curves(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Validation force MAE vs epoch, one colour per arm, one line per seed."""
    from shards.tools.plot import pyplot

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for i, (arm, runs) in enumerate(results.items()):
        for j, r in enumerate(runs):
            ep = [c["epoch"] for c in r["curve"]]
            for ax, key in zip(axes, ("energy_mae_meV", "force_mae_meV_per_A"), strict=True):
                ax.plot(ep, [c["val"][key] for c in r["curve"]], color=f"C{i}", alpha=0.8,
                        label=arm if j == 0 else None)
    for ax, label in zip(axes, ("val energy MAE (meV)", "val force MAE (meV/Å)"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_markdown(cfg: MDStudyConfig, summary: dict[str, dict[str, Any]], path: Path, *, seconds: float,
                   command: str, n_atoms: int) -> None:
    m, s, p, f = cfg.md, cfg.split, cfg.pretrain, cfg.finetune
    mc = cfg.model
    lines = [f"# {m.name} MD (GFN2-xTB): energy + forces fine-tuned from scratch vs denoising vs SCD", "",
             f"Command: `{command}`  ", f"Wall time: {seconds / 60:.1f} min on {cfg.threads or os.cpu_count()} "
             f"CPU thread(s) ({cfg.device})", "",
             f"Data: {m.frames} frames ({n_atoms} atoms) of tblite GFN2-xTB Langevin MD at {m.temperature_K} K, one "
             f"frame every {m.stride} x {m.timestep_fs} fs; frames split train/val/test = {s.train}/{s.val}/{s.test} "
             f"(seed {s.seed}). Pretraining: {p.steps} steps of <= {p.max_atoms} atoms on the first "
             f"{cfg.pretrain_records} QM9 molecules, lr {p.lr}. Backbone: {mc.backbone} hidden {mc.hidden}, "
             f"{mc.layers} layers, {mc.heads} heads, {mc.num_rbf} RBF, cutoff {mc.cutoff} Å. Fine-tuning: "
             f"{f.epochs} epochs, batch {f.batch_size}, energy/force loss weights {f.energy_weight}/{f.force_weight}, "
             f"seeds {list(cfg.seeds)}; metrics of the best-validation epoch.", "",
             "| pretraining | test energy MAE (meV) | test energy MAE (meV/atom) | test force MAE (meV/Å) | "
             "force MAE per seed | val force MAE (meV/Å) |",
             "|---|---|---|---|---|---|"]
    for arm, r in summary.items():
        per = ", ".join(f"{x:.1f}" for x in r["test_force_mae_meV_per_A"])
        lines.append(f"| {arm} | {r['test_energy_mae_meV_mean']:.1f} ± {r['test_energy_mae_meV_std']:.1f} | "
                     f"{r['test_energy_mae_meV_per_atom_mean']:.2f} ± {r['test_energy_mae_meV_per_atom_std']:.2f} | "
                     f"{r['test_force_mae_meV_per_A_mean']:.1f} ± {r['test_force_mae_meV_per_A_std']:.1f} | {per} | "
                     f"{r['val_force_mae_meV_per_A_mean']:.1f} |")
    lines += ["", "Paper (rMD17 aspirin, full-size ET, PCQM4Mv2 pretraining, thousands of epochs): forces "
              "~5-10 meV/Å; this is a budget-sized run and its numbers are not comparable.", ""]
    path.write_text("\n".join(lines))


def run_md_study(cfg: MDStudyConfig, out: Path, *, command: str = "scd study md", log: Any = print) -> dict[str, Any]:
    """Run the whole study into ``out``; returns the summary."""
    t0 = time.perf_counter()
    out = start_study(cfg, out)
    log(f"[1/4] trajectory -> {out / 'md.traj'}")
    timings: dict[str, float] = {}
    traj = make_trajectory(cfg, out, log)
    dataset = ingest_trajectory(cfg, traj, out)
    timings["trajectory"] = time.perf_counter() - t0
    from shards.format.reader import ShardDataset

    keys = sorted(g.key for g in ShardDataset(str(dataset)))
    n_atoms = len(next(iter(ShardDataset(str(dataset)))).atomic_numbers)
    from scd_train.splits import make_splits

    splits = make_splits(keys, cfg.split)
    split_file = out / "splits.json"
    split_file.write_text(json.dumps({**splits, "seed": cfg.split.seed}, indent=1))
    log(f"[2/4] {len(keys)} frames, split {[len(v) for v in splits.values()]} -> {split_file}")
    ckpts: dict[str, Path | None] = {"scratch": None}
    pre_arms = [k for k in ("denoise", "scd") if k in cfg.arms]
    if pre_arms:
        pre_data = pretraining_data(cfg, out)
        base = StudyConfig(model=cfg.model, pretrain=cfg.pretrain, device=cfg.device, threads=cfg.threads)
        for kind in pre_arms:
            t = time.perf_counter()
            log(f"[3/4] pretrain {kind}: {cfg.pretrain.steps} steps on {cfg.pretrain_records} QM9 molecules")
            ckpts[kind] = pretrain(base, kind, pre_data, out)
            timings[f"pretrain_{kind}"] = time.perf_counter() - t
    results: dict[str, list[dict[str, Any]]] = {}
    for arm in cfg.arms:
        t = time.perf_counter()
        for seed in cfg.seeds:
            run = out / "runs" / f"{arm}-seed{seed}"
            if (run / "result.json").is_file():
                results.setdefault(arm, []).append(json.loads((run / "result.json").read_text()))
                continue
            log(f"[4/4] fine-tune {arm} seed {seed}")
            ft = dataclasses.replace(cfg.finetune, data=str(dataset), out=str(run), task="energy_forces",
                                     checkpoint=str(ckpts[arm]) if ckpts[arm] else None, model=cfg.model,
                                     split_file=str(split_file), seed=seed, device=cfg.device, save_model=arm == "scd")
            cfg_path = out / "configs" / f"finetune_{arm}_seed{seed}.yaml"
            cfg_path.write_text(yaml.safe_dump(to_dict(ft), sort_keys=False))
            results.setdefault(arm, []).append(finetune(ft, log=log))
        timings[f"finetune_{arm}"] = time.perf_counter() - t
    seconds = time.perf_counter() - t0
    summary = _summary(results)
    plot_curves(results, out / "learning_curves.png")
    write_markdown(cfg, summary, out / "results.md", seconds=seconds, command=command, n_atoms=n_atoms)
    (out / "results.json").write_text(json.dumps({"summary": summary, "seconds": seconds, "timings": timings},
                                                 indent=1))
    log((out / "results.md").read_text())
    return summary


def load_md_study_config(path: str | Path | None, overrides: list[str] | None = None) -> MDStudyConfig:
    """The defaults, updated key by key from a YAML (unknown keys are errors) and ``--set`` overrides."""
    return load_config_with_defaults(MDStudyConfig, path, overrides)
