"""Launch the stages of the orchestrating commands (``scd demo``, ``scd study``) through their documented
commands: the one place that knows how to run an ingest job or a ``torchrun`` pretraining.

``scd_train`` never imports ``ingest`` (Ray and the converters stay out of the trainer), so an ingest job
runs as ``scd ingest run JOB`` in a child process; ``python -m shards`` is the ``scd`` console script
without the PATH lookup, so the child uses this interpreter and its installed entry points.
"""
from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import yaml

__all__ = ["StageFailed", "ingest_available", "run_ingest", "run_stage", "scd_command", "torchrun_command"]

COMMAND_GROUP = "scd.commands"


class StageFailed(RuntimeError):
    """A stage's child process exited non-zero; the message names the stage and its exit status."""


def scd_command(*args: str) -> list[str]:
    """The argv of ``scd ARGS...`` run by this interpreter."""
    return [sys.executable, "-m", "shards", *args]


def torchrun_command(nproc: int, *args: str) -> list[str]:
    """The argv of ``torchrun --standalone --nproc-per-node NPROC -m scd_train ARGS...``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "scd_train", *args]


def ingest_available() -> bool:
    """Whether the ``scd ingest`` command group is installed (read from its entry point; nothing is imported)."""
    return any(ep.name == "ingest" for ep in entry_points(group=COMMAND_GROUP))


def run_stage(what: str, cmd: Sequence[str], *, who: str = "scd", env: Mapping[str, str] | None = None,
              quiet: bool = False) -> None:
    """Run one stage as a child process. Ctrl-C in the child is :class:`KeyboardInterrupt` here; a failure is
    :class:`StageFailed` in one line (``quiet`` captures the child's output and quotes its last error line,
    otherwise the child's messages are already on the terminal above it)."""
    res = subprocess.run(list(cmd), env=None if env is None else dict(env), capture_output=quiet, text=True)
    if res.returncode in (130, -signal.SIGINT):
        raise KeyboardInterrupt
    if res.returncode:
        if quiet:
            last = [ln for ln in (res.stderr or res.stdout or "").strip().splitlines() if ln.strip()][-1:]
            detail = f"last message: {last[0] if last else '(none)'}"
        else:
            detail = "its messages are above"
        raise StageFailed(f"{who}: the {what} step failed (exit status {res.returncode}); {detail}")


def run_ingest(job: Mapping[str, Any], job_file: Path, *, who: str = "scd", quiet: bool = False) -> Path:
    """Write the ingest ``job`` (the job file's keys: docs/ingest.md) to ``job_file`` and run it with
    ``scd ingest run``; returns the job's output folder. Re-running skips the units already finished."""
    if "output" not in job:
        raise ValueError("an ingest job needs an output folder (key 'output')")
    job_file = Path(job_file)
    job_file.parent.mkdir(parents=True, exist_ok=True)
    job_file.write_text(yaml.safe_dump(dict(job), sort_keys=False))
    args = ["ingest", "run", str(job_file)] + (["--no-progress"] if quiet else [])
    run_stage("ingest", scd_command(*args), who=who, quiet=quiet)
    return Path(job["output"])
