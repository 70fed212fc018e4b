"""``scd study qm9-v2``: the QM9 study's second edition, with matched compute and the authors' fine-tuning.

Arms (:data:`ARM_SPECS`): ``scratch``, ``denoise``, ``denoise_2x`` (plain denoising for twice the steps:
an SCD step runs the backbone twice, so this is the matched-compute control) and ``scd``. Targets HOMO,
LUMO and gap; several seeds; several fine-tuning train sizes (``train_sizes``: nested subsets of one
seeded train split, the same validation and test molecules). Fine-tuning follows the authors' protocol
(:class:`scd_train.finetune.FinetuneConfig`: auxiliary denoising, rotations, sum readout, MSE, drop-path
schedule, step-based warmup + cosine, EMA). Pretraining logs the conditioning diagnostics
(:mod:`scd_train.diagnostics`) on validation molecules; their rows and plots are copied into
``diagnostics/``. Everything goes into one folder; a cut run resumes (finished runs are skipped).

``estimate: true`` runs nothing but a few timed steps of every stage and prints the expected wall time.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from scd_train.finetune import FinetuneConfig, finetune
from scd_train.objectives import ObjectiveConfig
from scd_train.splits import SplitConfig
from scd_train.study import (
    PretrainSpec,
    StudyConfig,
    ingest_qm9,
    load_config_with_defaults,
    prepare_data,
    pretrain_config,
    start_study,
)
from scd_train.study_v2_report import gap_opens_at, plot_curves, plot_gaps, summarise, write_markdown
from shards.config import ConfigError, from_dict, to_dict

__all__ = ["ARM_SPECS", "DiagnosticsSpec", "StudyV2Config", "estimate_study", "load_study_v2_config",
           "run_study_v2"]

# arm -> (pretraining objective or None for scratch, multiple of pretrain.steps)
ARM_SPECS: dict[str, tuple[str | None, int]] = {
    "scratch": (None, 0),
    "denoise": ("denoise", 1),
    "denoise_2x": ("denoise", 2),
    "scd": ("scd", 1),
}


@dataclass(frozen=True)
class DiagnosticsSpec:
    """Conditioning diagnostics during pretraining: every ``every`` steps on ``molecules`` validation molecules
    (probe of the first target). ``every: 0`` turns them off."""

    every: int = 250
    molecules: int = 200


@dataclass(frozen=True)
class StudyV2Config(StudyConfig):
    """The second edition; ``split.train`` is the largest ``train_sizes`` entry's pool, ``property`` the label
    that selects the split's molecules, ``finetune`` the template of every fine-tuning run."""

    targets: tuple[str, ...] = ("homo", "lumo", "gap")
    train_sizes: tuple[int, ...] = (2000, 1000)
    arms: tuple[str, ...] = tuple(ARM_SPECS)
    max_records: int = 12000
    split: SplitConfig = field(default_factory=lambda: SplitConfig(train=2000, val=300, test=1000, seed=0))
    model: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig(hidden=48, layers=3, heads=4, num_rbf=16))
    pretrain: PretrainSpec = field(default_factory=lambda: PretrainSpec(steps=2000, max_atoms=384, warmup_steps=100))
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(
        readout="sum", loss="mse", steps=320, warmup_steps=20, patience=1000, batch_size=32, lr=5e-4,
        aux_denoise_weight=0.1, aux_noise=0.005, rotate=True, drop_path=0.15, drop_path_final=0.05,
        ema_decay=0.99, progress=False))
    diagnostics: DiagnosticsSpec = field(default_factory=DiagnosticsSpec)
    threads: int | None = 1
    estimate: bool = False
    estimate_steps: int = 20
    parts: int = 1
    part: int = 0
    wait_poll_s: float = 10.0

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in ARM_SPECS]
        if unknown:
            raise ConfigError(f"arms: unknown {unknown}; known: {list(ARM_SPECS)}")
        if not self.targets or not self.train_sizes or not self.seeds:
            raise ConfigError("targets, train_sizes and seeds must each name at least one")
        if any(n < 1 or n > self.split.train for n in self.train_sizes):
            raise ConfigError(f"train_sizes must be in [1, split.train={self.split.train}]")
        if not 0 <= self.part < self.parts:
            raise ConfigError(f"part must be in [0, parts={self.parts})")
        if self.estimate_steps < 2:
            raise ConfigError("estimate_steps must be >= 2")


def regime(n: int) -> str:
    """The folder/table name of the fine-tuning regime with ``n`` labelled training molecules."""
    return f"n{n}"


def write_regime_splits(out: Path, splits: dict[str, list[str]], sizes: tuple[int, ...]) -> dict[int, Path]:
    """``splits_n<N>.json`` per train size: the first N of the seeded train split, the same val and test."""
    files = {}
    for n in sizes:
        path = out / f"splits_{regime(n)}.json"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"train": splits["train"][:n], "val": splits["val"], "test": splits["test"]},
                                  indent=1))
        os.replace(tmp, path)  # atomic: another part may be reading it
        files[n] = path
    return files


def write_subset(dataset: Path, keys: list[str], dest: Path) -> Path:
    """A shard dataset of the molecules ``keys`` of ``dataset`` (in that order), written once."""
    from shards.format.manifest import write_dataset
    from shards.format.reader import ShardDataset
    from shards.format.writer import WriterConfig

    if not (dest / "manifest.json").is_file():
        wanted = set(keys)
        by_key = {g.key: g for g in ShardDataset(str(dataset)) if g.key in wanted}
        write_dataset([by_key[k] for k in keys], dest, config=WriterConfig(max_shard_samples=5000))
    return dest


def arm_pretrain_config(cfg: StudyV2Config, arm: str, data: Path, run_dir: Path, held_out: Path | None
                        ) -> dict[str, Any]:
    """The TrainConfig mapping of a pretrained arm: the study's shared mapping with the arm's objective and steps,
    checkpoints four times per run (a cut study resumes) and the diagnostics section."""
    kind, mult = ARM_SPECS[arm]
    assert kind is not None
    mapping = pretrain_config(cfg, kind, data, run_dir)
    steps = cfg.pretrain.steps * mult
    mapping.update(steps=steps, log_every=max(1, steps // 50), checkpoint_every=max(1, steps // 4), progress=False)
    if held_out is not None and cfg.diagnostics.every > 0:
        mapping["diagnostics"] = {"held_out": str(held_out), "eval_every": cfg.diagnostics.every,
                                  "n_molecules": cfg.diagnostics.molecules, "probe_property": cfg.targets[0],
                                  "seed": cfg.pretrain.seed}
    return mapping


def pretrain_arm(cfg: StudyV2Config, arm: str, data: Path, out: Path, held_out: Path | None) -> Path:
    """Pretrain one arm (skipped when ``done.json`` exists; an interrupted one resumes from its checkpoint);
    copies its diagnostics rows and plot to ``out/diagnostics/``."""
    from scd_train.config import TrainConfig
    from scd_train.trainer import Trainer

    run_dir = out / "pretrain" / arm
    if not (run_dir / "done.json").is_file():
        mapping = arm_pretrain_config(cfg, arm, data, run_dir, held_out)
        run_dir.mkdir(parents=True, exist_ok=True)
        (out / "configs" / f"pretrain_{arm}.yaml").write_text(yaml.safe_dump(mapping, sort_keys=False))
        t = time.perf_counter()
        Trainer(from_dict(TrainConfig, mapping)).fit()
        (run_dir / "done.json").write_text(json.dumps({"steps": mapping["steps"],
                                                       "seconds": time.perf_counter() - t}))
    copy_diagnostics(run_dir, out / "diagnostics", arm)
    return run_dir


def copy_diagnostics(run_dir: Path, dest: Path, arm: str) -> list[dict[str, Any]]:
    """The diagnostics rows of ``run_dir/metrics.jsonl`` into ``dest/<arm>.jsonl`` (and the plot); returns them."""
    dest.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    rows = [r for r in map(json.loads, metrics.read_text().splitlines()) if "diag_loss_own_c" in r] \
        if metrics.is_file() else []
    (dest / f"{arm}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if (run_dir / "diagnostics.png").is_file():
        shutil.copyfile(run_dir / "diagnostics.png", dest / f"{arm}.png")
    return rows


def _finetune_cfg(cfg: StudyV2Config, dataset: Path, run: Path, target: str, ckpt: Path | None, split_file: Path,
                  seed: int) -> FinetuneConfig:
    return dataclasses.replace(cfg.finetune, data=str(dataset), out=str(run), property=target,
                               checkpoint=str(ckpt) if ckpt else None, model=cfg.model, split_file=str(split_file),
                               seed=seed, device=cfg.device, save_model=False)


def prepare(cfg: StudyV2Config, out: Path, log: Any) -> dict[str, Any]:
    """Ingest, the split files, the fine-tuning subset and the diagnostics' held-out set (each written once)."""
    t = time.perf_counter()
    dataset, mode = ingest_qm9(cfg, out)
    _, pre_data, splits = prepare_data(cfg, dataset, out)
    files = write_regime_splits(out, splits, cfg.train_sizes)
    held = splits["train"] + splits["val"] + splits["test"]
    ft_data = write_subset(dataset, held, out / "finetune_data")
    diag_data = write_subset(dataset, splits["val"][:cfg.diagnostics.molecules], out / "diag_data") \
        if cfg.diagnostics.every > 0 else None
    from shards.format.reader import ShardDataset

    n_pre = len(ShardDataset(str(pre_data)))
    log(f"data ({mode}): {len(held)} fine-tuning molecules, {n_pre} pretraining molecules")
    return {"pre_data": pre_data, "ft_data": ft_data, "diag_data": diag_data, "split_files": files,
            "n_pretrain": n_pre, "seconds": time.perf_counter() - t}


def _runs(cfg: StudyV2Config) -> list[tuple[int, str, str, int]]:
    """Every fine-tuning run as (train size, target, arm, seed), the runs without a checkpoint first (a part
    starts on them while the pretraining arms of the other parts still run)."""
    runs = [(n, t, a, s) for n in cfg.train_sizes for t in cfg.targets for a in cfg.arms for s in cfg.seeds]
    return sorted(runs, key=lambda r: ARM_SPECS[r[2]][0] is not None)


def _mine(cfg: StudyV2Config, items: list[Any]) -> list[Any]:
    """The items of this part: dealt round-robin over ``parts``."""
    return items[cfg.part::cfg.parts]


def _run_dir(out: Path, run: tuple[int, str, str, int]) -> Path:
    n, target, arm, seed = run
    return out / "runs" / regime(n) / target / f"{arm}-seed{seed}"


def _wait_for(done: Path, what: str, log: Any, poll_s: float) -> None:
    """Block until another part has written ``done`` (its pretraining finished)."""
    if not done.is_file():
        log(f"waiting for {what} (another part pretrains it: {done})")
    while not done.is_file():
        time.sleep(poll_s)


def _finetune_run(cfg: StudyV2Config, out: Path, data: dict[str, Any], run: tuple[int, str, str, int], log: Any
                  ) -> dict[str, Any]:
    n, target, arm, seed = run
    path = _run_dir(out, run)
    if (path / "result.json").is_file():
        return json.loads((path / "result.json").read_text())
    ckpt = None
    if ARM_SPECS[arm][0] is not None:
        ckpt = out / "pretrain" / arm
        _wait_for(ckpt / "done.json", f"pretraining arm {arm}", log, cfg.wait_poll_s)
    log(f"fine-tune {regime(n)} {target} {arm} seed {seed}")
    ft = _finetune_cfg(cfg, data["ft_data"], path, target, ckpt, data["split_files"][n], seed)
    (out / "configs" / f"finetune_{regime(n)}_{target}_{arm}_seed{seed}.yaml").write_text(
        yaml.safe_dump(to_dict(ft), sort_keys=False))
    return finetune(ft, log=log)


def run_study_v2(cfg: StudyV2Config, out: Path, *, command: str = "scd study qm9-v2",
                 log: Any = print) -> dict[str, Any]:
    """Run the study into ``out`` (finished parts reused), or only :func:`estimate_study` when ``cfg.estimate``.

    With ``parts: N`` and ``part: i`` this process runs every N-th pretraining arm and fine-tuning run from the
    i-th (N processes on one folder share the work; a run that needs another part's checkpoint waits for it);
    the part that finishes last, or a later run without ``parts``, writes the tables. Returns the summary, or
    ``{}`` when other parts' runs are still missing."""
    t0 = time.perf_counter()
    out = start_study(cfg, out)
    with _lock(out / ".prepare.lock"):
        data = prepare(cfg, out, log)
    if cfg.estimate:
        return estimate_study(cfg, out, data, log)
    timings: dict[str, float] = {"prepare": data["seconds"]}
    for arm in _mine(cfg, [a for a in cfg.arms if ARM_SPECS[a][0] is not None]):
        t = time.perf_counter()
        log(f"pretrain {arm}: {cfg.pretrain.steps * ARM_SPECS[arm][1]} steps")
        pretrain_arm(cfg, arm, data["pre_data"], out, data["diag_data"])
        timings[f"pretrain_{arm}"] = time.perf_counter() - t
    for run in _mine(cfg, _runs(cfg)):
        t = time.perf_counter()
        _finetune_run(cfg, out, data, run, log)
        key = f"finetune_{regime(run[0])}_{run[2]}"
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t
    missing = [r for r in _runs(cfg) if not (_run_dir(out, r) / "result.json").is_file()]
    if missing:
        log(f"part {cfg.part}/{cfg.parts} finished; {len(missing)} runs of the other parts are still missing: the "
            "part that finishes last writes the tables (or rerun without parts)")
        return {}
    results: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    for n in cfg.train_sizes:
        for target in cfg.targets:
            for arm in cfg.arms:
                for seed in cfg.seeds:
                    r = json.loads((_run_dir(out, (n, target, arm, seed)) / "result.json").read_text())
                    results.setdefault(regime(n), {}).setdefault(target, {}).setdefault(arm, []).append(r)
    diag = {arm: rows for arm in cfg.arms if ARM_SPECS[arm][0] is not None
            for rows in [copy_diagnostics(out / "pretrain" / arm, out / "diagnostics", arm)] if rows}
    seconds = time.perf_counter() - t0
    summary = summarise(results)
    plot_curves(results, out / "learning_curves.png")
    if diag:
        plot_gaps(diag, out / "diagnostics.png")
    write_markdown(cfg, summary, diag, out / "results.md", seconds=seconds, n_pretrain=data["n_pretrain"],
                   command=command)
    (out / "results.json").write_text(json.dumps(
        {"summary": summary, "seconds": seconds, "timings": timings, "n_pretrain": data["n_pretrain"],
         "part": [cfg.part, cfg.parts], "diagnostics_final": {arm: rows[-1] for arm, rows in diag.items()},
         "gap_opens_at_step": {arm: gap_opens_at(rows) for arm, rows in diag.items()}}, indent=1))
    log((out / "results.md").read_text())
    return summary


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (parts of one study prepare its data one after the other)."""
    import fcntl

    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _clock() -> np.ndarray:
    """(wall, CPU time of this process) in seconds."""
    return np.array([time.perf_counter(), time.process_time()])


def _timed_pretrain(cfg: StudyV2Config, kind: str, data: Path, root: Path, steps: int) -> np.ndarray:
    from scd_train.config import TrainConfig
    from scd_train.trainer import Trainer

    run_dir = root / f"{kind}-{steps}"
    shutil.rmtree(run_dir, ignore_errors=True)
    mapping = pretrain_config(cfg, kind, data, run_dir)
    mapping.update(steps=steps, log_every=steps, checkpoint_every=steps, progress=False)
    t = _clock()
    Trainer(from_dict(TrainConfig, mapping)).fit()
    return _clock() - t


def _time_diagnostics(cfg: StudyV2Config, held_out: Path) -> np.ndarray:
    import torch

    from scd_train.diagnostics import Diagnostics, DiagnosticsConfig
    from scd_train.objectives import build_objective
    from scd_train.views import ViewConfig

    diag = Diagnostics(DiagnosticsConfig(held_out=str(held_out), n_molecules=cfg.diagnostics.molecules,
                                         probe_property=cfg.targets[0]), ViewConfig(rotate=True), "cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        objective = build_objective(dataclasses.replace(cfg.model, kind="scd"))
    t = _clock()
    diag.evaluate(objective)
    return _clock() - t


def estimate_study(cfg: StudyV2Config, out: Path, data: dict[str, Any], log: Any = print) -> dict[str, Any]:
    """Time a few steps of every stage (pretraining per objective, one diagnostics evaluation, fine-tuning steps
    and evaluations) and print the study's expected wall time; writes ``out/estimate.json``.

    Two figures: from wall-clock times (what this machine gives at its current load) and from this process's
    CPU time (what it would give alone; with one torch thread, CPU time is the wall time of an idle core).
    """
    k = cfg.estimate_steps
    root = out / "estimate"
    clocks = ("wall", "cpu")
    per_step: dict[str, np.ndarray] = {}
    startup: dict[str, np.ndarray] = {}
    kinds = sorted({kd for a in cfg.arms if (kd := ARM_SPECS[a][0]) is not None})
    if kinds:  # a first, untimed run pays the one-off costs (imports, allocator, caches)
        _timed_pretrain(cfg, kinds[0], data["pre_data"], root, 1)
    for kind in kinds:
        short = _timed_pretrain(cfg, kind, data["pre_data"], root, 2)
        long = _timed_pretrain(cfg, kind, data["pre_data"], root, 2 + k)
        per_step[kind] = np.maximum(1e-6, (long - short) / k)
        startup[kind] = np.maximum(0.0, short - 2 * per_step[kind])
    t_diag = _time_diagnostics(cfg, data["diag_data"]) if data["diag_data"] is not None else np.zeros(2)
    n = max(cfg.train_sizes)
    ft = dataclasses.replace(_finetune_cfg(cfg, data["ft_data"], root / "finetune", cfg.targets[0], None,
                                           data["split_files"][n], cfg.seeds[0]), steps=k)
    t = _clock()
    r = finetune(ft, log=lambda *_: None)
    spent = _clock() - t
    tm = r["timing"]
    scale = np.array([1.0, spent[1] / max(1e-9, spent[0])])  # the run's CPU/wall ratio splits its parts
    t_setup = tm["setup_s"] * scale
    t_step = tm["train_s"] / max(1, r["steps_run"]) * scale
    t_eval = tm["eval_s"] / tm["evaluations"] * scale
    t_test = t_eval * cfg.split.test / cfg.split.val
    bs = cfg.finetune.batch_size or 32
    parts: dict[str, np.ndarray] = {"prepare (measured, wall)": np.full(2, data["seconds"])}
    for arm in cfg.arms:
        obj, mult = ARM_SPECS[arm]
        if obj is None:
            continue
        steps = cfg.pretrain.steps * mult
        evals = steps // cfg.diagnostics.every if cfg.diagnostics.every > 0 else 0
        parts[f"pretrain {arm} ({steps} steps)"] = startup[obj] + steps * per_step[obj] + evals * t_diag
    runs = len(cfg.targets) * len(cfg.arms) * len(cfg.seeds)
    for size in cfg.train_sizes:
        ft_steps = cfg.finetune.steps or cfg.finetune.epochs * math.ceil(size / bs)
        evals = math.ceil(ft_steps / math.ceil(size / bs)) + 1
        parts[f"fine-tune {regime(size)} ({runs} runs)"] = runs * (t_setup + ft_steps * t_step + evals * t_eval
                                                                    + t_test)
    total = np.sum(list(parts.values()), axis=0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    def by_clock(x: np.ndarray) -> dict[str, float]:
        return {c: float(v) for c, v in zip(clocks, x, strict=True)}

    est = {"total_s": by_clock(total), "parts_s": {name: by_clock(v) for name, v in parts.items()},
           "pretrain_step_s": {kd: by_clock(v) for kd, v in per_step.items()},
           "pretrain_startup_s": {kd: by_clock(v) for kd, v in startup.items()},
           "diagnostics_eval_s": by_clock(t_diag), "finetune_step_s": by_clock(t_step),
           "finetune_eval_s": by_clock(t_eval), "finetune_setup_s": by_clock(t_setup), "threads": cfg.threads,
           "cpu_count": os.cpu_count(), "load_average_1min": load, "device": cfg.device}
    (out / "estimate.json").write_text(json.dumps(est, indent=1))
    lines = [f"estimated wall time: {total[0] / 3600:.2f} h at this machine's current load (1-min load average "
             f"{load:.1f} on {os.cpu_count()} cores: the machine is shared), {total[1] / 3600:.2f} h from CPU time "
             f"(the process alone, {cfg.threads} torch thread(s))",
             *(f"  {name}: {v[0] / 60:.1f} min wall, {v[1] / 60:.1f} min CPU" for name, v in parts.items()),
             "  measured per step (wall / CPU): pretrain " + ", ".join(
                 f"{kd} {v[0] * 1000:.0f} / {v[1] * 1000:.0f} ms" for kd, v in per_step.items())
             + f"; fine-tune {t_step[0] * 1000:.0f} / {t_step[1] * 1000:.0f} ms; diagnostics evaluation "
             f"{t_diag[0]:.1f} / {t_diag[1]:.1f} s; fine-tune evaluation {t_eval[0]:.2f} / {t_eval[1]:.2f} s"]
    log("\n".join(lines))
    return est


def load_study_v2_config(path: str | Path | None, overrides: list[str] | None = None) -> StudyV2Config:
    """The second edition's defaults, updated from a YAML and ``--set`` overrides (unknown keys are errors)."""
    return load_config_with_defaults(StudyV2Config, path, overrides)
