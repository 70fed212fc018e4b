"""The launch configs in infra/ parse, name the example configs, and every ``scd ...`` / ``torchrun -m
scd_train ...`` command they run is accepted by the real argument parsers; infra/README.md is in step with the
files. Nothing is built or fetched."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.infrahelp import INFRA, commands_in, from_script, walk_yaml

YAMLS = sorted(p for p in INFRA.rglob("*.yaml"))
LAUNCHERS = ("ray/cluster.yaml", "k8s/rayjob-ingest.yaml", "k8s/rayjob-ingest-s3.yaml", "k8s/pytorchjob-pretrain.yaml",
             "slurm/pretrain.sbatch", "docker/Dockerfile", "README.md")


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
    got = [c.argv for c in from_script(script, "t")]
    assert got == [("torchrun", "--nnodes", "2", "-m", "scd_train", "train", "$CONFIG"),
                   ("scd", "shards", "verify", "/d")]
    pod = {"containers": [{"command": ["scd"], "args": ["ingest", "run", "/c.yaml"]}]}
    assert [c.argv for c in walk_yaml(pod, "p")] == [("scd", "ingest", "run", "/c.yaml")]


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
