"""Rehearsal of multi-node pretraining on one machine (loopback only): two torchrun "nodes" with a c10d
rendezvous at 127.0.0.1 stream shards over HTTP from a local server; their losses equal a single-node
run with the same world size, budget and seed; a node killed mid-run, then both restarted from the
last checkpoint, ends with the same weights as an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import socket
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

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
STEPS = 20
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "SCD_DIST_TIMEOUT_S": "60"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(real_graphs, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    write_dataset(real_graphs, root / "ds", config=WriterConfig(max_shard_samples=40))
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/ds"
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.1)
    yield url
    server.terminate()
    server.wait(10)


def _config(tmp: Path, url: str, name: str) -> Path:
    cfg = {"run_dir": str(tmp / name), "steps": STEPS, "seed": 5, "log_every": 1, "checkpoint_every": 5,
           "tensorboard": False, "progress": False,
           "data": {"datasets": [url], "max_atoms": 100, "seed": 5, "cache_dir": str(tmp / name / "cache"),
                    "mixture": {"crop_protein_atoms": 90}},
           "model": {"kind": "scd", "backbone": "painn", "preset": "small", "hidden": 32, "layers": 2,
                     "num_rbf": 8},
           "optim": {"lr": 1e-3, "warmup_steps": 2}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _node(cfg: Path, port: int, rdzv_id: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={rdzv_id}",
           "-m", "scd_train", "train", str(cfg)]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _two_nodes(cfg: Path, rdzv_id: str) -> None:
    port = _free_port()
    nodes = [_node(cfg, port, rdzv_id), _node(cfg, port, rdzv_id)]
    for n in nodes:
        out, _ = n.communicate(timeout=600)
        assert n.returncode == 0, out.decode()[-3000:]


def _single_node(cfg: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "scd_train", "train", str(cfg)]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / f"step-{STEPS:08d}" / "model.safetensors"))


def test_two_nodes_over_http_equal_one_node(served, tmp_path):
    _single_node(_config(tmp_path, served, "single"))
    _two_nodes(_config(tmp_path, served, "multi"), "equal")
    single, multi = _losses(tmp_path / "single"), _losses(tmp_path / "multi")
    assert len(single) == STEPS and single == multi
    a, b = _final_weights(tmp_path / "single"), _final_weights(tmp_path / "multi")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_node_then_restart_matches_uninterrupted(served, tmp_path):
    _two_nodes(_config(tmp_path, served, "clean"), "clean")
    cfg = _config(tmp_path, served, "killed")
    port = _free_port()
    nodes = [_node(cfg, port, "killed"), _node(cfg, port, "killed")]
    run = tmp_path / "killed"
    deadline = time.time() + 600
    while not (run / f"step-{10:08d}" / "state.json").exists():
        assert time.time() < deadline, "the run never reached step 10"
        assert all(n.poll() is None for n in nodes), "a node ended before it was killed"
        time.sleep(0.2)
    os.killpg(nodes[1].pid, signal.SIGKILL)
    nodes[1].wait()
    os.killpg(nodes[0].pid, signal.SIGKILL)
    nodes[0].wait()
    assert not (run / f"step-{STEPS:08d}").exists(), "the kill came too late to test anything"
    _two_nodes(cfg, "restart")
    assert _losses(run) == _losses(tmp_path / "clean")
    a, b = _final_weights(tmp_path / "clean"), _final_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
