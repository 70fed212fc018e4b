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
    if shutil.which("ray", path=env["PATH"]) is None or shutil.which("setsid") is None:
        pytest.skip("needs the ray CLI and setsid")
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
