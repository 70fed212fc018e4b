"""A real two-node Ray cluster on one machine (infra/ray/local_cluster.sh): `ray job submit --working-dir .
-- scd ingest run JOB.yaml` gives the same bytes as the embedded local Ray.

Subprocess-only: this test never touches the test session's Ray. The script stops exactly the process
groups it started (no global `ray stop`), so it is safe next to other Ray users of the machine.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest_ray import digest
from test_ingest_job import four_domain_sources, write_job

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "infra" / "ray" / "local_cluster.sh"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.mark.cluster
@pytest.mark.slow
def test_ray_job_submit_on_two_node_cluster_equals_embedded(tmp_path):
    bin_dir = str(Path(sys.executable).parent)  # the venv's ray and scd, also when it is not activated
    env = {**os.environ, "RAY_ADDRESS": "", "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    if shutil.which("ray", path=env["PATH"]) is None:
        pytest.skip("missing dependency: ray[default] (no ray CLI)")
    if shutil.which("setsid") is None:
        pytest.skip("needs setsid (util-linux)")
    job = write_job(tmp_path, "job", four_domain_sources(400))
    ref = subprocess.run(["scd", "ingest", "run", str(job), "--out", str(tmp_path / "embedded"), "--no-progress"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    state = tmp_path / "cluster"
    gcs, dashboard = _free_ports(2)
    env.pop("RAY_ADDRESS")
    try:
        up = subprocess.run([str(SCRIPT), "start", str(state), str(gcs), str(dashboard), "1"],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        sub = subprocess.run([str(SCRIPT), "submit", str(state), "--", "scd", "ingest", "run", str(job),
                              "--out", str(tmp_path / "cluster-out"), "--no-progress"],
                             capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
        assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
        assert "succeeded" in sub.stdout + sub.stderr
    finally:
        subprocess.run([str(SCRIPT), "stop", str(state)], env=env, cwd=REPO, timeout=120)
    for node in ("head", "worker"):
        assert not (state / f"{node}.pid").exists()
    assert digest(tmp_path / "embedded") == digest(tmp_path / "cluster-out")


def _tasks(dashboard: str) -> list:
    """The cluster's tasks as Ray's state API reports them (over HTTP: no driver joins the cluster)."""
    from ray.util.state import list_tasks

    return list_tasks(address=dashboard, detail=True, limit=10_000, raise_on_missing_output=False)


def _finished_units(dashboard: str, n: int, wait_s: float = 60) -> list:
    """The FINISHED ``run_unit`` tasks once all ``n`` report start and end times (Ray's task events arrive
    asynchronously: a task can read FINISHED before its timestamps do)."""
    deadline = time.time() + wait_s
    while True:
        tasks = [t for t in _tasks(dashboard) if t.func_or_class_name == "run_unit" and t.state == "FINISHED"]
        timed = all(t.start_time_ms is not None and t.end_time_ms is not None for t in tasks)
        if (len(tasks) >= n and timed) or time.time() > deadline:
            return tasks
        time.sleep(1)


def _peak_concurrency(tasks: list) -> int:
    edges = sorted([(t.start_time_ms, 1) for t in tasks] + [(t.end_time_ms, -1) for t in tasks],
                   key=lambda e: (e[0], e[1]))
    peak = cur = 0
    for _, d in edges:
        cur += d
        peak = max(peak, cur)
    return peak


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_autoscaling_rehearsal_node_joins_mid_job_and_receives_units(tmp_path):
    """A CPU-0 head alone (infra/ray/cluster.yaml before its autoscaler adds nodes): the job waits for a node with
    its tasks queued as demand, a worker raylet joins mid-job and runs the units side by side, every unit was
    queued before the first one finished (the demand an autoscaler sees, not one CPU's worth), and the result
    equals the embedded run byte for byte."""
    from ingest.job import load_job, plan_units

    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "RAY_ADDRESS": "", "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    if shutil.which("ray", path=env["PATH"]) is None or shutil.which("setsid") is None:
        pytest.skip("needs the ray CLI and setsid")
    job = write_job(tmp_path, "job", four_domain_sources(400))
    n_units = len(plan_units(load_job(job)))
    assert n_units >= 4
    ref = subprocess.run(["scd", "ingest", "run", str(job), "--out", str(tmp_path / "embedded"), "--no-progress"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    state = tmp_path / "cluster"
    gcs, dashboard = _free_ports(2)
    env.pop("RAY_ADDRESS")
    sub = None
    try:
        up = subprocess.run([str(SCRIPT), "head", str(state), str(gcs), str(dashboard), "0"],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        url = (state / "dashboard").read_text().strip()
        sub = subprocess.Popen([str(SCRIPT), "submit", str(state), "--", "scd", "ingest", "run", str(job),
                                "--out", str(tmp_path / "cluster-out"), "--no-progress"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
        deadline = time.time() + 600
        pending: list = []
        seen: list = []
        while not pending:  # the job has started; nothing runs on a CPU-0 head, so its tasks wait for a node
            assert sub.poll() is None, sub.communicate()[0][-3000:]
            assert time.time() < deadline, f"the job queued no task; tasks: {seen}"
            time.sleep(2)
            now = _tasks(url)
            seen = [(t.func_or_class_name, t.state) for t in now]
            pending = [t for t in now if t.state == "PENDING_NODE_ASSIGNMENT"]
        assert {t.required_resources.get("CPU") for t in pending} == {1.0}
        join = subprocess.run([str(SCRIPT), "join", str(state), "2"], capture_output=True, text=True, env=env,
                              cwd=REPO, timeout=300)
        assert join.returncode == 0, join.stdout[-2000:] + join.stderr[-2000:]
        out, _ = sub.communicate(timeout=600)
        assert sub.returncode == 0 and "succeeded" in out, out[-3000:]
        tasks = _finished_units(url, n_units)
    finally:
        if sub is not None and sub.poll() is None:
            sub.kill()
        subprocess.run([str(SCRIPT), "stop", str(state)], env=env, cwd=REPO, timeout=120)
    assert not list(state.glob("*.pid"))
    assert len(tasks) == n_units
    assert len({t.node_id for t in tasks}) == 1, "units ran on one node: the worker that joined"
    # under load Ray may drop some task events (their times stay None): judge the order on the timed ones
    timed = [t for t in tasks if t.start_time_ms is not None and t.end_time_ms is not None]
    assert len(timed) >= 2, f"only {len(timed)} of {len(tasks)} units report their times"
    assert max(t.creation_time_ms for t in tasks) <= min(t.end_time_ms for t in timed), \
        "every unit was submitted before the first finished (not just as many as the CPUs)"
    # Ray stamps a task's end after it frees the CPU, so a next unit can look 1 over the node's CPUs: only "side
    # by side" is a property of ours, the CPU cap is Ray's
    assert _peak_concurrency(timed) >= 2, "the joining node's 2 CPUs ran units side by side"
    assert digest(tmp_path / "embedded") == digest(tmp_path / "cluster-out")
