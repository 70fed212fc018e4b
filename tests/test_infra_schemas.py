"""The infra files validate against the schemas of their target systems (KubeRay, training operator, Ray, EC2)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.infrahelp import INFRA, Command, commands_in, from_script

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
    (entry,) = from_script(job["spec"]["entrypoint"], "rayjob")
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
