"""Metrics sinks of rank 0: JSON lines, TensorBoard, and a PNG loss curve at the end."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append one JSON object per logged step to ``metrics.jsonl`` and mirror scalars to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True, resume_step: int = 0) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(f"{line}\n" for line in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **values}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row, sort_keys=True, default=float) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss(metrics_path: Path, out: Path, key: str = "loss", title: str = "SCD pretraining loss") -> Path:
    """A PNG of ``key`` against step (raw and smoothed)."""
    from shards.tools.plot import pyplot

    plt = pyplot()
    import numpy as np

    rows = [r for r in read_metrics(metrics_path) if key in r]
    steps = np.array([r["step"] for r in rows])
    vals = np.array([r[key] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, vals, alpha=0.35, label=key)
    if len(vals) >= 10:
        w = max(3, len(vals) // 20)
        smooth = np.convolve(vals, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, label=f"{key} (moving average, {w})")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
