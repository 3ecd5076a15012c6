"""rl.pipeline.RolloutPipeline's schedule with stand-ins for the data, rollout group and reward pool (no Ray):
the staleness bound under a slow learner, step order, skipped steps, errors. The real actors run the same
pipeline in tests/test_trainer.py."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest

from core.records import Scores, WeightUpdate
from rl.pipeline import PipelineConfig, RolloutPipeline


@dataclass(frozen=True)
class _Sample:
    prompt_id: int


@dataclass(frozen=True)
class _Chain:
    prompt_id: int
    version: int  # the weights the (stand-in) actor sampled it with


class _Data:
    def batch(self, cursor: int, n: int) -> list[_Sample]:
        return [_Sample(cursor + i) for i in range(n)]


class _Rollouts:
    """Samples with the weights the call carries (``latest``), as RolloutWorker.generate does."""

    def __init__(self, seconds: float = 0.0):
        self.latest: WeightUpdate | None = None
        self.loaded: list[int] = []
        self.seconds = seconds
        self.seeds: list[int] = []

    def submit_generate(self, samples, group_size, seed, explore=True):
        self.seeds.append(seed)
        time.sleep(self.seconds)
        version = self.latest.version if self.latest else 0
        chains = [_Chain(s.prompt_id, version) for s in samples for _ in range(group_size)]
        return chains, chains

    def offer(self, update: WeightUpdate) -> None:
        self.latest = update

    def load_weights(self, update: WeightUpdate) -> None:
        self.latest = update
        self.loaded.append(update.version)


class _Rewards:
    def __init__(self, fail_at_prompt: int | None = None):
        self.fail_at_prompt = fail_at_prompt
        self.lock = threading.Lock()

    def score(self, views, samples, timings):
        timings["inputs_ready_s"] = 0.0
        if self.fail_at_prompt is not None and any(s.prompt_id == self.fail_at_prompt for s in samples):
            raise RuntimeError(f"reward actor failed at prompt {self.fail_at_prompt}")
        return [Scores(v.prompt_id, 0, {}, float(v.version)) for v in views]


def _run(k: int, steps: int = 8, learner_s: float = 0.03, rollout_s: float = 0.0, update=lambda s: True,
         rewards=None):
    """A learner that takes ``learner_s`` a step; returns (batches, staleness per step, rollouts)."""
    rollouts = _Rollouts(rollout_s)
    config = PipelineConfig(prompts_per_step=2, group_size=3, max_staleness=k, total_steps=steps,
                            seed_of=lambda s: 1000 + s)
    p = RolloutPipeline(_Data(), rollouts, rewards or _Rewards(), config, first_step=0, cursor=0)
    version, batches, staleness = 0, [], []
    try:
        for step in range(steps):
            batch = p.next()
            batches.append(batch)
            # what the learner checks: the oldest chain of the batch against its own version
            staleness.append(version - min(c.version for c in batch.chains))
            time.sleep(learner_s)
            if update(step):
                version += 1
                p.publish(WeightUpdate(version=version))
            p.step_done()
    finally:
        p.close()
    return batches, staleness, rollouts


@pytest.mark.parametrize("k", [1, 2, 3])
def test_staleness_never_exceeds_k_and_reaches_it_with_a_slow_learner(k):
    batches, staleness, rollouts = _run(k, steps=8, learner_s=0.05)
    assert max(staleness) == k  # the producer runs k steps ahead of a slow learner ...
    assert all(0 <= s <= k for s in staleness)  # ... and never further
    assert staleness[k:] == [k] * (8 - k)
    assert rollouts.loaded == []  # asynchronous: weights travel with the next rollout call, no blocking load
    assert [b.step for b in batches] == list(range(8))
    assert [b.cursor for b in batches] == [2 * s for s in range(8)]
    assert rollouts.seeds == [1000 + s for s in range(8)]  # the step's seed, whatever order the threads ran in


def test_k0_is_the_synchronous_loop_inline():
    batches, staleness, rollouts = _run(0, steps=5)
    assert staleness == [0] * 5
    assert rollouts.loaded == [1, 2, 3, 4, 5]  # every update loaded before the next rollout
    assert all(b.version == b.step for b in batches)


def test_a_fast_learner_waits_for_rollouts_and_trains_fresher_chains():
    # rollout slower than the learner: the producer cannot get ahead, so the chains are at most k old but
    # often fresher
    _, staleness, _ = _run(2, steps=6, learner_s=0.0, rollout_s=0.03)
    assert all(0 <= s <= 2 for s in staleness)


def test_steps_without_an_update_do_not_stall_the_producer():
    # every other step has all its groups filtered (no learner update, no new version): the gate counts steps
    _, staleness, _ = _run(1, steps=6, update=lambda s: s % 2 == 0)
    assert len(staleness) == 6 and max(staleness) <= 1


def test_a_producer_error_reaches_the_learner_side():
    with pytest.raises(RuntimeError, match="reward actor failed at prompt 4"):
        _run(1, steps=6, rewards=_Rewards(fail_at_prompt=4))


def test_negative_staleness_is_rejected():
    with pytest.raises(ValueError, match="max_staleness must be >= 0"):
        RolloutPipeline(_Data(), _Rollouts(), _Rewards(), PipelineConfig(1, 2, -1, 3, lambda s: s))


def test_a_producer_that_delivers_nothing_in_time_is_a_lost_actor():
    """A rollout call that the actors' own deadlines did not end: the learner side gives up after the pipeline's
    deadline with ActorLost (the driver heals it) instead of waiting forever."""
    from core.faults import ActorLost

    config = PipelineConfig(prompts_per_step=2, group_size=3, max_staleness=1, total_steps=4,
                            seed_of=lambda s: s, wait_timeout_s=0.5)
    p = RolloutPipeline(_Data(), _Rollouts(seconds=3.0), _Rewards(), config)
    try:
        start = time.monotonic()
        with pytest.raises(ActorLost, match="delivered no batch for step 1 in 0.5 s"):
            p.next()
        assert time.monotonic() - start < 2.5
    finally:
        p.close()


def test_the_producers_deadline_is_twice_a_rollout_and_a_scoring_call():
    from core.config import load_config
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/grpo_random_local.yaml", ["rollout.call_timeout_s=300", "reward.call_timeout_s=100"])
    assert PipelineConfig.from_config(cfg, lambda s: s).wait_timeout_s == 800.0
    cfg = load_config(root / "configs/grpo_random_local.yaml", ["rollout.call_timeout_s=0"])
    assert PipelineConfig.from_config(cfg, lambda s: s).wait_timeout_s == 0.0
