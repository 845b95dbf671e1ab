"""The cluster definitions in cluster/ and the GPU job configs that target them, checked offline.

- every `ray up` YAML validates against the JSON schema shipped in the ray package;
- the KubeRay manifests carry the fields the operator requires;
- each definition has a CPU head that offers no work resources, an autoscaling inference group and an
  autoscaling training group, and at full scale can host every jobs/configs/gpu_*.yaml (checked with the
  same placement code the jobs run, on the node list the definition would produce), while its head alone
  can host nothing;
- secure defaults: token auth on every node, the token never in the repository, the dashboard not
  exposed (bound to 127.0.0.1 / ClusterIP service, no 0.0.0.0 anywhere);
- every jobs/configs/*.yaml loads with load_config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from tailkd_ray.config import load_config
from tailkd_ray.placement import PlacementError, require_teacher_placement, require_train_placement

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_YAMLS = [ROOT / "cluster" / "aws.yaml", ROOT / "cluster" / "gcp.yaml"]
RAYCLUSTER = ROOT / "cluster" / "kuberay-raycluster.yaml"
RAYJOB = ROOT / "cluster" / "kuberay-rayjob.yaml"
JOB_CONFIGS = sorted((ROOT / "jobs" / "configs").glob("*.yaml"))
GPU_JOB_CONFIGS = sorted((ROOT / "jobs" / "configs").glob("gpu_*.yaml"))
INFERENCE, TRAINING = "inference", "training"
ROLE_RESOURCE = {INFERENCE: "tailkd_inference", TRAINING: "tailkd_training"}


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def strings_in(value) -> list[str]:
    """Every string (keys included) anywhere in parsed YAML."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in strings_in(k) + strings_in(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    return [value] if isinstance(value, str) else []


def launcher_groups(config: dict) -> dict[str, tuple[dict, int]]:
    """{node type ("head" for the head): (Ray resources of one node, max nodes)} of a `ray up` config."""
    head = config["head_node_type"]
    return {("head" if name == head else name): (spec["resources"], 1 if name == head else spec["max_workers"])
            for name, spec in config["available_node_types"].items()}


def kuberay_rayclusters() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(RAYCLUSTER.read_text()) if doc and doc["kind"] == "RayCluster"]


def pod_resources(group: dict) -> dict:
    """The Ray resources a KubeRay pod advertises: num-cpus or its CPU limit, its GPU limit, custom resources."""
    params = group["rayStartParams"]
    (container,) = [c for c in group["template"]["spec"]["containers"] if c["name"].startswith("ray-")]
    limits = container["resources"]["limits"]
    resources = {"CPU": float(params.get("num-cpus", limits["cpu"])),
                 "GPU": float(limits.get("nvidia.com/gpu", 0))}
    if "resources" in params:  # KubeRay's form: a JSON string holding the JSON object
        resources.update(json.loads(json.loads(params["resources"])))
    return resources


def kuberay_groups(cluster: dict) -> dict[str, tuple[dict, int]]:
    groups = {"head": (pod_resources(cluster["spec"]["headGroupSpec"]), 1)}
    for group in cluster["spec"]["workerGroupSpecs"]:
        groups[group["groupName"]] = (pod_resources(group), group["maxReplicas"])
    return groups


def all_cluster_groups() -> dict[str, dict[str, tuple[dict, int]]]:
    groups = {path.name: launcher_groups(load_yaml(path)) for path in LAUNCHER_YAMLS}
    groups.update({f"{RAYCLUSTER.name}:{c['metadata']['name']}": kuberay_groups(c) for c in kuberay_rayclusters()})
    return groups


def nodes_at_full_scale(groups: dict[str, tuple[dict, int]], only: str | None = None) -> list[dict]:
    """The ``ray.nodes()`` list the cluster would show with every group at its maximum size."""
    return [{"NodeID": f"{name}-{i}", "Alive": True, "Resources": {k: float(v) for k, v in resources.items()}}
            for name, (resources, count) in groups.items() if only in (None, name) for i in range(count)]


# ---- ray up configs ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_matches_the_ray_schema(path, ray_schema):
    import jsonschema

    jsonschema.validate(load_yaml(path), ray_schema)


def test_schema_check_can_fail(ray_schema):
    import jsonschema

    config = load_yaml(LAUNCHER_YAMLS[0])
    config["available_node_types"]["inference"]["resources"]["tailkd_inference"] = 0.5  # must be an integer
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_schema)


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_has_idle_head_and_autoscaling_gpu_groups(path):
    config = load_yaml(path)
    types = config["available_node_types"]
    assert set(types) == {config["head_node_type"], INFERENCE, TRAINING}
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert config["idle_timeout_minutes"] > 0
    for role in (INFERENCE, TRAINING):
        spec = types[role]
        assert 0 == spec["min_workers"] < spec["max_workers"] <= config["max_workers"]
        assert spec["resources"][ROLE_RESOURCE[role]] == spec["resources"]["GPU"] > 0
        assert set(spec["resources"]) == {"CPU", "GPU", ROLE_RESOURCE[role]}
    assert sum(types[r]["max_workers"] for r in (INFERENCE, TRAINING)) == config["max_workers"]


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_turns_token_auth_on_for_every_ray_start(path):
    config = load_yaml(path)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [cmd for cmd in config[key] if "ray start" in cmd]
        assert starts, key
        assert all("RAY_AUTH_MODE=token ray start" in cmd for cmd in starts), key
    # The token is a file of the machine running `ray up`, outside the repository, checked on every node.
    token_source = config["file_mounts"]["~/.ray/auth_token"]
    assert token_source.startswith("~/") and not Path(os.path.expanduser(token_source)).is_relative_to(ROOT)
    assert any(cmd.startswith("test -s ~/.ray/auth_token ||") for cmd in config["setup_commands"])
    assert any("pip install" in cmd and "~/tailkd-ray" in cmd for cmd in config["setup_commands"])


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_keeps_dashboard_and_ports_private(path):
    config = load_yaml(path)
    (head_start,) = [cmd for cmd in config["head_start_ray_commands"] if "ray start" in cmd]
    assert "--dashboard-host=127.0.0.1" in head_start.split()
    assert not [s for s in strings_in(config) if "0.0.0.0" in s]
    # No extra inbound rules: Ray's default group admits only SSH and traffic between cluster nodes.
    assert "IpPermissions" not in config["provider"].get("security_group", {})


# ---- KubeRay ---------------------------------------------------------------------------------------------


def test_kuberay_raycluster_has_required_fields():
    (cluster,) = kuberay_rayclusters()
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["spec"]["containers"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {INFERENCE, TRAINING}
    for role, group in groups.items():
        assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        resources = pod_resources(group)
        assert resources[ROLE_RESOURCE[role]] == resources["GPU"] > 0
        (container,) = group["template"]["spec"]["containers"]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"]


def test_kuberay_token_from_secret_and_head_service_private():
    (cluster,) = kuberay_rayclusters()
    spec = cluster["spec"]
    assert spec["authOptions"] == {"mode": "token", "secretName": "tailkd-ray-auth"}
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert not spec["headGroupSpec"].get("enableIngress", False)
    for path in (RAYCLUSTER, RAYJOB):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert not [d for d in docs if d["kind"] in ("Secret", "Ingress", "Service")], path  # referenced only
        text = strings_in(docs)
        assert not [s for s in text if "0.0.0.0" in s or "RAY_AUTH_TOKEN" in s or "LoadBalancer" in s
                    or "NodePort" in s], path


def test_kuberay_rayjob_runs_distill_on_the_raycluster():
    (job,) = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    (cluster,) = kuberay_rayclusters()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    entrypoint = job["spec"]["entrypoint"]
    assert "python jobs/distill.py --config jobs/configs/gpu_qwen2.5-1.5b_to_0.5b.yaml" in entrypoint
    assert (ROOT / "jobs" / "configs" / "gpu_qwen2.5-1.5b_to_0.5b.yaml").is_file()


# ---- clusters x job configs ------------------------------------------------------------------------------


def test_there_are_gpu_job_configs_and_cluster_definitions():
    assert {"gpu_llama3-8b_to_1b.yaml", "gpu_qwen2.5-1.5b_to_0.5b.yaml"} <= {p.name for p in GPU_JOB_CONFIGS}
    assert len(all_cluster_groups()) == 3


@pytest.mark.parametrize("job", GPU_JOB_CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("cluster", sorted(all_cluster_groups()))
def test_cluster_groups_host_the_job_config(cluster, job):
    groups = all_cluster_groups()[cluster]
    cfg = load_config(job)
    assert cfg.autoscaling and cfg.train.use_gpu and cfg.teacher.num_gpus == 1
    # The custom resources the job asks for are the ones its groups advertise, and only those groups.
    assert set(cfg.teacher.resources) <= set(groups[INFERENCE][0])
    assert set(cfg.train.resources_per_worker) <= set(groups[TRAINING][0])
    assert not set(cfg.teacher.resources) & set(groups[TRAINING][0])
    assert not set(cfg.train.resources_per_worker) & set(groups[INFERENCE][0])
    # At full scale the cluster hosts the minimal teacher pool and every trainer worker; its head hosts none.
    full = nodes_at_full_scale(groups)
    require_teacher_placement(cfg.teacher, allow_autoscale=False, nodes=full)
    require_train_placement(cfg.train, allow_autoscale=False, nodes=full)
    head_only = nodes_at_full_scale(groups, only="head")
    with pytest.raises(PlacementError):
        require_teacher_placement(cfg.teacher, allow_autoscale=False, nodes=head_only)
    with pytest.raises(PlacementError):
        require_train_placement(cfg.train, allow_autoscale=False, nodes=head_only)
    # The teacher pool may grow to max_actors: there are that many inference GPUs at full scale.
    inference_gpus = sum(groups[INFERENCE][0]["GPU"] for _ in range(groups[INFERENCE][1]))
    assert cfg.teacher.max_actors * cfg.teacher.num_gpus <= inference_gpus


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_every_job_config_loads(path):
    load_config(path)
