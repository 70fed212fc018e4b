"""scd_train.launch: the one place the orchestrating commands start other stages (``scd ingest run``,
torchrun) as child processes; failures are one line naming the stage, Ctrl-C in a child is Ctrl-C here."""
from __future__ import annotations

import sys

import pytest
import yaml

from scd_train.launch import StageFailed, ingest_available, run_ingest, run_stage, scd_command


def test_failed_ingest_is_one_line_with_the_childs_error(tmp_path) -> None:
    job = {"output": str(tmp_path / "out"), "sources": [{"source": "x", "paths": [str(tmp_path / "missing.sdf")]}]}
    with pytest.raises(StageFailed) as err:
        run_ingest(job, tmp_path / "job.yaml", who="scd study qm9", quiet=True)
    msg = str(err.value)
    assert msg.startswith("scd study qm9: the ingest step failed (exit status ")
    assert "missing.sdf" in msg and "\n" not in msg
    assert yaml.safe_load((tmp_path / "job.yaml").read_text()) == job  # the job the child ran, kept for a rerun


def test_child_interrupt_is_keyboard_interrupt_and_commands_run_this_interpreter() -> None:
    with pytest.raises(KeyboardInterrupt):
        run_stage("x", [sys.executable, "-c", "raise SystemExit(130)"])
    cmd = scd_command("ingest", "converters")
    assert cmd[:3] == [sys.executable, "-m", "shards"]
    assert ingest_available()
    run_stage("list converters", cmd, quiet=True)


def test_ingest_job_needs_an_output(tmp_path) -> None:
    with pytest.raises(ValueError, match="output"):
        run_ingest({"sources": []}, tmp_path / "job.yaml")
    assert not (tmp_path / "job.yaml").exists()
