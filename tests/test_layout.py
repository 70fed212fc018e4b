"""Module boundaries: ingest -> shards <- scd_train, checked by parsing every import."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
FORBIDDEN = {
    "shards": {"ingest", "scd_train", "torch", "ray"},
    "ingest": {"scd_train", "torch"},
    "scd_train": {"ingest", "ray"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependency_direction(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        hits = _imports(path) & FORBIDDEN[package]
        if hits:
            bad.append(f"{path.relative_to(ROOT)} imports {sorted(hits)}")
    assert not bad, "\n".join(bad)


def test_cli_help_for_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "shards", "--help"], capture_output=True, text=True, check=True)
    assert "shards" in out.stdout
    for cmd in (["shards"], ["shards", "verify"], ["shards", "inspect"], ["shards", "export"]):
        res = subprocess.run([sys.executable, "-m", "shards", *cmd, "--help"], capture_output=True, text=True)
        assert res.returncode == 0 and len(res.stdout) > 100, cmd
