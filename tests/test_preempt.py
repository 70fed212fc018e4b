"""Preemption-safe training: a SIGTERM/SIGUSR1 mid-run ends every rank after the same step with a checkpoint
and exit status 128 + signal; running the same command again ends bit-identical to a run never interrupted."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from shards.format.manifest import write_dataset
from shards.format.writer import WriterConfig

MODEL = {"kind": "scd", "backbone": "et", "preset": "small", "hidden": 32, "layers": 2, "heads": 4, "num_rbf": 8}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def dataset(real_graphs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("preempt") / "ds"
    write_dataset(real_graphs, root, config=WriterConfig(max_shard_samples=50))
    return root


def _config(tmp: Path, dataset: Path, name: str, steps: int) -> Path:
    cfg = {"run_dir": str(tmp / name), "steps": steps, "seed": 5, "log_every": 1, "checkpoint_every": 10_000,
           "tensorboard": False, "progress": False,
           "data": {"datasets": [str(dataset)], "max_atoms": 120, "seed": 5,
                    "mixture": {"crop_protein_atoms": 100}, "views": {"rotate": True}},
           "model": MODEL, "optim": {"lr": 1e-3, "warmup_steps": 2}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _checkpoints(run: Path) -> list[int]:
    return sorted(json.loads((p / "state.json").read_text())["step"] for p in run.glob("step-*"))


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(sorted(run.glob("step-*"))[-1] / "model.safetensors"))


def _assert_same_run(a: Path, b: Path, steps: int) -> None:
    wa, wb = _final_weights(a), _final_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ bitwise"
    la, lb = [r["loss"] for r in _rows(a)], [r["loss"] for r in _rows(b)]
    assert len(la) == steps and la == lb, "the logged losses differ"


def _signal_after_rows(proc: subprocess.Popen, run: Path, rows: int, send) -> None:
    """Send the signal once ``rows`` steps are logged (the run is then mid-way)."""
    deadline = time.time() + 300
    while len(_rows(run)) < rows:
        assert proc.poll() is None, "the run ended before the signal: " + proc.communicate()[1][-2000:]
        assert time.time() < deadline, "no progress"
        time.sleep(0.02)
    send()


def test_signal_stops_after_the_step_with_a_checkpoint_and_resume_is_bitwise(tmp_path, dataset):
    from scd_train.config import load_train_config
    from scd_train.trainer import Trainer

    steps = 6
    Trainer(load_train_config(_config(tmp_path, dataset, "ref", steps))).fit()
    cfg = _config(tmp_path, dataset, "cut", steps)
    cut = Trainer(load_train_config(cfg))
    log = cut.metrics.log

    def log_then_signal(step: int, row: dict) -> None:  # a real SIGUSR1 to this process, mid-run
        log(step, row)
        if step == 2:
            signal.raise_signal(signal.SIGUSR1)

    cut.metrics.log = log_then_signal  # type: ignore[method-assign]
    before = signal.getsignal(signal.SIGUSR1)
    cut.fit()
    assert cut.stopped_by == signal.SIGUSR1 and cut.exit_status == 128 + signal.SIGUSR1 and cut.step == 2
    assert signal.getsignal(signal.SIGUSR1) is before, "the handler outlived the run"
    assert _checkpoints(tmp_path / "cut") == [2] and len(_rows(tmp_path / "cut")) == 2
    resumed = Trainer(load_train_config(cfg))
    assert resumed.step == 2
    resumed.fit()
    assert resumed.exit_status == 0 and resumed.step == steps
    _assert_same_run(tmp_path / "ref", tmp_path / "cut", steps)


@pytest.mark.slow
def test_sigterm_mid_run_checkpoints_exits_143_and_resumes_bitwise(tmp_path, dataset):
    steps = 10
    ref = subprocess.run([sys.executable, "-m", "shards", "train", str(_config(tmp_path, dataset, "ref", steps))],
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    cfg = _config(tmp_path, dataset, "cut", steps)
    run = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "shards", "train", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    _signal_after_rows(proc, run, 2, lambda: proc.send_signal(signal.SIGTERM))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM received" in err
    (stopped,) = _checkpoints(run)  # checkpoint_every is larger than the run: this one is the signal's
    assert 2 <= stopped < steps and len(_rows(run)) == stopped
    assert not list(run.glob(".tmp-*")), "a temporary checkpoint folder was left behind"
    again = subprocess.run([sys.executable, "-m", "shards", "train", str(cfg)], capture_output=True, text=True,
                           env=ENV, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    _assert_same_run(tmp_path / "ref", run, steps)


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=rank among ``parent``'s children (Linux /proc)."""
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(child)
    return None


def _torchrun(cfg: Path, **kw) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "-m", "scd_train", "train", str(cfg)]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc")
def test_sigusr1_to_one_rank_stops_both_ranks_after_the_same_step(tmp_path, dataset):
    steps = 10
    ref = subprocess.run(_torchrun(_config(tmp_path, dataset, "ref", steps)), capture_output=True, text=True,
                         env=ENV, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    cfg = _config(tmp_path, dataset, "cut", steps)
    run = tmp_path / "cut"
    proc = subprocess.Popen(_torchrun(cfg), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)

    def to_rank_1() -> None:  # rank 0 never sees a signal: it must still stop with rank 1
        pid = _rank_pid(proc.pid, 1)
        assert pid is not None, "rank 1 not found"
        os.kill(pid, signal.SIGUSR1)

    _signal_after_rows(proc, run, 2, to_rank_1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, "torchrun must report the early stop"
    assert "SIGUSR1 received" in err and f"exitcode  : {128 + signal.SIGUSR1}" in err, err[-3000:]
    (stopped,) = _checkpoints(run)
    assert 2 <= stopped < steps
    state = json.loads((run / f"step-{stopped:08d}" / "state.json").read_text())
    ranks = state["loader"]["ranks"]
    assert len(ranks) == 2 and all(s["step"] == stopped for s in ranks)
    again = subprocess.run(_torchrun(cfg), capture_output=True, text=True, env=ENV, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    _assert_same_run(tmp_path / "ref", run, steps)


FAKE_SRUN = """#!/bin/bash
# stands in for srun on one node: drops srun's options and runs the task (signals reach it directly)
while [ "${1:-}" != "${1#-}" ]; do shift; done
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
# stands in for scontrol: the node list is this machine; a requeue is recorded, not performed
case "$1" in
show) echo 127.0.0.1 ;;
requeue) echo "requeue $2" >> "$FAKE_SLURM_LOG" ;;
*) exit 2 ;;
esac
"""


def _sbatch_env(tmp: Path, cfg: Path) -> dict[str, str]:
    """The environment Slurm gives the batch script: one node, 2 "GPUs" (CPU ranks), a job id whose derived
    rendezvous port is free here."""
    bin_dir = tmp / "fake-slurm"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    import socket

    with socket.socket() as s:
        for port in range(20000 + os.getpid() % 19000, 40000):
            try:
                s.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
    return {**ENV, "PATH": f"{bin_dir}{os.pathsep}{ENV.get('PATH', '')}", "FAKE_SLURM_LOG": str(tmp / "slurm.log"),
            "SLURM_JOB_ID": str(port - 20000), "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1",
            "SLURM_GPUS_ON_NODE": "2", "SLURM_CPUS_PER_TASK": "2", "CONFIG": str(cfg),
            "VENV": str(Path(sys.executable).parent.parent)}


@pytest.mark.slow
def test_sbatch_script_forwards_usr1_checkpoints_and_requeues(tmp_path, dataset):
    """infra/slurm/pretrain.sbatch run as Slurm would on one node (srun and scontrol stand-ins): SIGUSR1 to the
    batch shell (--signal=B:USR1) reaches both ranks through torchrun; they checkpoint, the script requeues
    the job, and the requeued run ends equal to an uninterrupted one."""
    script = Path(__file__).resolve().parents[1] / "infra" / "slurm" / "pretrain.sbatch"
    steps = 10
    ref_cfg = _config(tmp_path, dataset, "ref", steps)
    ref = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=_sbatch_env(tmp_path, ref_cfg),
                         timeout=600)
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-3000:]
    cfg = _config(tmp_path, dataset, "cut", steps)
    run = tmp_path / "cut"
    env = _sbatch_env(tmp_path, cfg)
    proc = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _signal_after_rows(proc, run, 2, lambda: proc.send_signal(signal.SIGUSR1))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert (tmp_path / "slurm.log").read_text().split() == ["requeue", env["SLURM_JOB_ID"]]
    assert "SIGUSR1 received" in err and "requeueing" in out
    (stopped,) = _checkpoints(run)
    assert 2 <= stopped < steps
    again = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "slurm.log").read_text().split() == ["requeue", env["SLURM_JOB_ID"]], "requeued twice"
    _assert_same_run(tmp_path / "ref", run, steps)
