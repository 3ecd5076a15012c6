"""The asynchronous pipeline and the collective weight sync end to end, on a real local Ray cluster.

Two runs of the embedded default's tiny models (B prompts x G chains a step, two HF-engine rollout actors):
- synchronous (trainer.max_staleness = 0, object store sync), STEPS steps;
- the cluster's pipeline in small, with faults (asynchronous, k = 1, learner.sync_backend: collective, run by
  ``fit`` from the same seed): step 1 is sampled by version 0 in both, so its scalars must equal the synchronous
  run's; later steps train chains one version old, which the off-policy correction weighs (TIS) and never more
  than k versions old. After the first STEPS steps a rollout actor is killed mid-step and a reward actor killed
  while scoring; every batch holds its B x G chains exactly once, staleness stays within k, the sync forms its
  groups again, the run completes; afterwards every rollout actor holds the learner's weights tensor by tensor,
  and a sync with a dead actor fails within learner.sync_timeout_s naming it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from core.config import load_config
from core.weight_broadcast import SyncGroupError
from rl.monitor import read_scalars

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
B, G = 2, 4
STEPS = 2  # the synchronous run's steps, and the fault-free head of the asynchronous one
FAULT_STEPS = 5
KILL_ROLLOUT, KILL_REWARD = 3, 4  # the 1-based steps of the asynchronous run they hit, both after STEPS
# both runs: two HF-engine rollout actors (the collective sync's groups span both)
ROLLOUTS = ("rollout.engine=hf", "rollout.num_actors=2", "rollout.max_restarts=4", "reward.max_restarts=4")
# scalars that measure the machine (seconds, rates) or the pipeline's own state, not the run's numbers
NOT_NUMBERS = ("timing/", "throughput/", "async/", "weight_sync/", "learner/seconds", "learner/staleness",
               "learner/off_policy", "learner/tis_", "reward/reissued")


def _config(tmp: Path, models: dict, name: str, *extra: str):
    return load_config(ROOT / "configs/grpo_random_local.yaml", [
        f"output_dir={tmp}/{name}", f"policy.path={models['policy']}", f"diffusion.path={models['diffusion']}",
        "policy.bootstrap=false", "diffusion.bootstrap=false", f"grpo.prompts_per_step={B}",
        f"grpo.group_size={G}", "trainer.total_steps=6", "trainer.image_every=0", "trainer.progress_bar=false",
        "trainer.eval_every=0", "chain.max_stage_tokens=16", "diffusion.num_steps=4", "grpo.filter_zero_variance=false",
        *extra,
    ])


def _steps(trainer, n: int) -> list[dict[str, float]]:
    return [trainer.step() for _ in range(n)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models, ray_local):
    """The synchronous run's STEPS steps (its roles then shut down, to free the CPUs), then the asynchronous,
    collective run with faults: rollout actor 0 killed in step KILL_ROLLOUT (Ray restarts it; the next sync fails
    on it, forms the groups again and retries) and reward actor 0 as it scores in step KILL_REWARD (its chains are
    re-issued). Returns both runs' per-step scalars, the asynchronous trainer, the keys of every batch it scored,
    its TensorBoard scalars and the faults the driver healed."""
    from rl.trainer import GRPOTrainer

    tmp = tmp_path_factory.mktemp("async")
    sync = GRPOTrainer(_config(tmp, tiny_models, "sync", *ROLLOUTS))
    sync_metrics = _steps(sync, STEPS)
    sync.pipeline.close()
    for group in (sync.rollouts, sync.learner, sync.rewards):
        group.shutdown()
    trainer = GRPOTrainer(_config(tmp, tiny_models, "collective", *ROLLOUTS, "learner.sync_backend=collective",
                                  "trainer.max_staleness=1", "learner.sync_timeout_s=15",
                                  f"trainer.total_steps={FAULT_STEPS}"))
    scored: list[list] = []
    async_metrics: list[dict[str, float]] = []
    score, step = trainer.rewards.score, trainer.step

    def spy(refs, samples, timings=None):
        out = score(refs, samples, timings)
        scored.append([(s.prompt_id, s.sample_index) for s in out])
        return out

    def faulty_step():
        kill = {KILL_ROLLOUT: lambda: ray.kill(trainer.rollouts.actors[0], no_restart=False),
                KILL_REWARD: lambda: ray.kill(trainer.rewards.actors[0], no_restart=False)}.get(trainer.step_id + 1)
        timer = threading.Timer(0.5, kill) if kill else None
        if timer:
            timer.start()
        try:
            metrics = step()
            async_metrics.append(metrics)
            return metrics
        finally:
            if timer:
                timer.join()

    trainer.rewards.score, trainer.step = spy, faulty_step
    trainer.fit()
    yield {"sync": sync_metrics, "async": async_metrics[:STEPS], "trainer": trainer, "scored": scored,
           "faults": trainer.faults, "scalars": read_scalars(trainer.cfg.trainer.log_dir)}
    trainer.pipeline.close()


def test_the_first_step_is_the_synchronous_one(runs):
    sync, run = runs["sync"][0], runs["async"][0]
    numbers = sorted(k for k in sync if not k.startswith(NOT_NUMBERS))
    assert len(numbers) > 20 and "learner/text_loss" in numbers and "reward/generation/mean" in numbers
    assert {k: run[k] for k in numbers} == {k: sync[k] for k in numbers}
    assert run["async/staleness"] == 0 and run["learner/off_policy_chains"] == 0


def test_later_steps_train_chains_one_version_old_with_importance_weights(runs):
    for step, m in enumerate(runs["async"][1:], start=2):
        assert m["async/staleness"] == 1, step  # sampled while the learner trained the step before
        assert m["learner/staleness_max"] == 1 and m["learner/off_policy_chains"] == B * G, step
        assert m["learner/dropped_stale_chains"] == 0, step
        for kind in ("text", "image"):  # stale chains are taken against the proximal policy: ratio 1 before the update
            assert m[f"learner/{kind}_first_epoch_ratio_mean"] == pytest.approx(1.0, abs=1e-3), (step, kind)
        for kind in ("text", "image"):  # min(pi_prox / pi_behaviour, cap): near 1 after one small update
            assert 0.5 < m[f"learner/tis_{kind}_ratio_mean"] <= runs["trainer"].cfg.grpo.tis_cap, (step, kind)
            assert 0.0 <= m[f"learner/tis_{kind}_truncated_fraction"] < 0.5, (step, kind)
    assert runs["async"][-1]["async/staleness_max"] == 1
    for m in runs["sync"]:  # the synchronous run is on-policy throughout
        assert m["async/staleness"] == 0 and m["learner/off_policy_chains"] == 0
        assert "learner/tis_image_ratio_mean" not in m and m["learner/engine_ratio_mean"] == pytest.approx(1, abs=1e-3)


def test_killed_rollout_and_reward_actors_lose_no_group_and_duplicate_none(runs):
    """Every batch scored holds each of its B x G chains exactly once, every step trains chains at most one version
    old, the killed rollout actor made the sync form its groups again, and the run completed without a rebuild."""
    s = runs["scalars"]
    assert runs["trainer"].step_id == FAULT_STEPS and runs["faults"] == []
    assert len(runs["scored"]) >= FAULT_STEPS
    for keys in runs["scored"]:
        assert len(keys) == B * G and len(set(keys)) == B * G
    for tag in ("grpo/kept_chains", "async/staleness", "learner/staleness_max"):
        assert [step for step, _ in s[tag]] == list(range(1, FAULT_STEPS + 1)), tag  # one point a step
    assert all(v <= 1 for _, v in s["async/staleness"] + s["learner/staleness_max"])
    assert all(v == B * G for _, v in s["grpo/kept_chains"])  # every chain reached the learner: none lost
    # chains the restarted actor sampled before it rejoined the sync group may be too stale to train (counted)
    print({"dropped stale chains": s["learner/dropped_stale_chains"], "regroups": s["weight_sync/regroups"][-1]})
    assert s["weight_sync/regroups"][-1][1] >= 1
    assert sum(v for _, v in s["reward/reissued_chains"]) > 0


@pytest.fixture(scope="module")
def collective_synced(runs) -> dict:
    """The asynchronous run with nothing in flight and one rollout call made (it loads the weights staged in each
    actor): the driver's version, the actors' versions, and the learner's and every actor's weights."""
    trainer = runs["trainer"]
    trainer.pipeline.close()  # nothing in flight: the actors hold (or have staged) the last published weights
    # the asynchronous sync is staged in each actor and loaded by the first rollout call that carries it
    samples = trainer.data.batch(0, 1)
    ray.get(trainer.rollouts.submit_generate(samples, 1, seed=0)[0])
    models = ("policy", "diffusion")
    return {"version": trainer.version, "versions": trainer.rollouts.versions(),
            "learner": {model: trainer.learner.gather_full_state(model) for model in models},
            "held": {model: [ray.get(actor.named_weights.remote(model)) for actor in trainer.rollouts.actors]
                     for model in models}}


def test_collective_sync_gives_every_rollout_actor_the_learners_weights(runs, collective_synced):
    assert all(v >= 1 for _, v in runs["scalars"]["weight_sync/policy_buckets"])
    assert all(v > 0 for _, v in runs["scalars"]["weight_sync/policy_mb"])
    version = collective_synced["version"]
    assert set(collective_synced["versions"]) == {(version, version)}
    for model in ("policy", "diffusion"):
        learner = collective_synced["learner"][model]
        assert learner
        for i, held in enumerate(collective_synced["held"][model]):
            assert set(learner) <= set(held), (model, i, sorted(set(learner) - set(held))[:3])
            unequal = [n for n, t in learner.items() if not torch.equal(held[n], t)]
            assert not unequal, (model, i, unequal[:5])


def test_a_sync_with_a_dead_actor_fails_within_its_timeout_naming_it(runs, collective_synced):
    """Kills a rollout actor of the asynchronous run: it requests ``collective_synced``, so the other test's
    reads of the live actors are done before, whatever order the tests run in."""
    trainer = runs["trainer"]
    ray.kill(trainer.rollouts.actors[1], no_restart=True)
    start = time.perf_counter()
    with pytest.raises(SyncGroupError, match="rollout actor 1"):
        trainer.weights.publish(trainer.version + 1)
    timeout = trainer.cfg.learner.sync_timeout_s
    # the sync fails, the group is formed again once (the dead actor cannot join) and that fails as well
    assert time.perf_counter() - start < 2 * (timeout + 10) + 10
