"""One embedded Ray for every in-process ingest test (``ray.init`` costs seconds on 2 cores).

Import the fixture in a test module: ``from conftest_ray import ray_session  # noqa: F401``.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def ray_session() -> Any:
    """A session-wide local Ray with 2 CPUs (never attaches to a cluster started on the machine)."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        from ingest.rayenv import embedded_ray_env

        embedded_ray_env()
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    if started:
        # Ray holds repeated worker messages back (log deduplication) and prints them at shutdown: shutting down
        # here keeps them (e.g. the traceback of a unit failed on purpose) in pytest's captured output
        ray.shutdown()


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path (index.zarr, manifest, _units included)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}
