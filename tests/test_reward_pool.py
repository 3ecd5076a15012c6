"""The reward pool: in-process RewardWorker, and K=2 real Ray actors (order, exactly-once, actor death)."""

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from reward_fixtures import make_sample

from core.chain import render_chain
from core.config import QualityMetricConfig, RewardConfig
from core.records import Rollout, Sample
from rewards.pool import RewardPool
from rewards.total import score_rollouts
from rewards.worker import RewardWorker

PIQE = QualityMetricConfig(name="piqe", weight=1.0, scale=100.0, lower_better=True)
LOG_ENV = "REWARD_POOL_TEST_LOG_DIR"


def make_rollout(prompt_id: int, sample_index: int, rough: str = "a cat", seed: int = 0) -> Rollout:
    rng = np.random.default_rng(seed)
    final = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    text = render_chain("medium blur, light downsample, heavy noise", {"rough": rough}, separator="\n")
    return Rollout.for_scoring(prompt_id, sample_index, text, {"final": final})


def batch(n_prompts: int, group: int, crash_at: tuple = ()) -> tuple[list[Rollout], list[Sample]]:
    rollouts, samples = [], []
    for p in range(n_prompts):
        for g in range(group):
            rough = (
                "CRASH a cat"
                if (p, g) in crash_at
                else ["a cat", "a sofa", "a cat on a sofa", "a dog"][g % 4]
            )
            rollouts.append(make_rollout(p, g, rough, seed=p * 100 + g))
            samples.append(make_sample(p))
    return rollouts, samples


class LoggingWorker(RewardWorker):
    """Appends 'pid prompt sample' per chain it returns, so a test can count who scored what."""

    def score(self, pairs):
        out = super().score(pairs)
        with open(Path(os.environ[LOG_ENV]) / "scored.log", "a") as f:
            f.writelines(f"{os.getpid()} {s.prompt_id} {s.sample_index}\n" for s in out)
        return out


class CrashingWorker(LoggingWorker):
    """Its process dies while scoring a chain whose text says CRASH: once per chain, or always if POISON."""

    def score(self, pairs):
        log_dir = Path(os.environ[LOG_ENV])
        import ray

        for rollout, _ in pairs:
            r = rollout if isinstance(rollout, Rollout) else ray.get(rollout)
            if "CRASH" in r.text:
                marker = log_dir / f"crashed_{r.prompt_id}_{r.sample_index}"
                if not marker.exists() or "POISON" in r.text:
                    marker.touch()
                    os._exit(1)  # the actor process dies mid-task
        return super().score(pairs)


class HangingWorker(LoggingWorker):
    """Its process hangs (sleeps for an hour) the first time it is given a chain whose text says HANG."""

    def score(self, pairs):
        import ray

        log_dir = Path(os.environ[LOG_ENV])
        for rollout, _ in pairs:
            r = rollout if isinstance(rollout, Rollout) else ray.get(rollout)
            marker = log_dir / f"hung_{r.prompt_id}_{r.sample_index}"
            if "HANG" in r.text and not marker.exists():
                marker.touch()
                time.sleep(3600)
        return super().score(pairs)


def read_log(log_dir: Path) -> list[tuple[int, int, int]]:
    path = log_dir / "scored.log"
    if not path.exists():
        return []
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------ no Ray at all
def test_worker_in_process_matches_score_rollouts():
    cfg = RewardConfig(metrics=[PIQE])
    rollouts, samples = batch(2, 3)
    worker = RewardWorker(cfg)
    got = worker.score(list(zip(rollouts, samples)))
    want = score_rollouts(rollouts, samples, cfg, worker.scorer)
    assert got == want
    assert [(s.prompt_id, s.sample_index) for s in got] == [(r.prompt_id, r.sample_index) for r in rollouts]
    assert all("quality/piqe" in s.parts and not s.errors for s in got)


def test_the_reward_worker_imports_without_ray():
    code = "import sys, rewards.worker; print('ray' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


# ------------------------------------------------------------------------------------------ real actors
@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    ray = pytest.importorskip("ray")

    log_root = tmp_path_factory.mktemp("reward_pool")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors need the test worker classes
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
        runtime_env={"env_vars": {LOG_ENV: str(log_root)}},
    )
    yield ray, log_root
    ray.shutdown()


def _fresh_log(log_root: Path) -> Path:
    for p in log_root.iterdir():
        p.unlink()
    return log_root


@pytest.mark.slow
def test_pool_scores_refs_and_objects_in_input_order_once_each(ray_cluster):
    ray, log_root = ray_cluster
    log_dir = _fresh_log(log_root)
    cfg = RewardConfig(num_actors=2, num_cpus=0.5, metrics=[PIQE])
    pool = RewardPool(cfg, worker_cls=LoggingWorker, max_batch=2)
    rollouts, samples = batch(4, 4)  # 16 chains

    @ray.remote(num_cpus=0)
    def late(rollout, delay):  # a rollout that arrives later, like a RolloutActor's output
        time.sleep(delay)
        return rollout

    inputs = []
    for i, r in enumerate(rollouts):  # a mix: plain objects, refs in the store, refs that resolve later
        inputs.append(r if i % 3 == 0 else ray.put(r) if i % 3 == 1 else late.remote(r, 0.5 * (i % 2)))
    try:
        scores = pool.score(inputs, samples)
    finally:
        pool.shutdown()
    assert [(s.prompt_id, s.sample_index) for s in scores] == [
        (r.prompt_id, r.sample_index) for r in rollouts
    ]
    local = RewardWorker(cfg).score(list(zip(rollouts, samples)))
    assert [s.total for s in scores] == pytest.approx([s.total for s in local])
    assert [s.parts for s in scores] == [s.parts for s in local]
    log = read_log(log_dir)
    assert Counter((p, g) for _, p, g in log) == Counter((r.prompt_id, r.sample_index) for r in rollouts)
    assert max(Counter((p, g) for _, p, g in log).values()) == 1  # each chain scored exactly once
    assert len({pid for pid, _, _ in log}) == 2  # both actors worked


@pytest.mark.slow
def test_pool_reissues_the_work_of_an_actor_that_dies(ray_cluster):
    ray, log_root = ray_cluster
    log_dir = _fresh_log(log_root)
    cfg = RewardConfig(num_actors=2, num_cpus=0.5, metrics=[], max_restarts=2)  # no metrics: fast restarts
    pool = RewardPool(cfg, worker_cls=CrashingWorker, max_batch=3)
    rollouts, samples = batch(3, 4, crash_at=((0, 1), (2, 2)))  # 12 chains, two kill their actor once
    try:
        scores = pool.score([ray.put(r) for r in rollouts], samples)
        assert (log_dir / "crashed_0_1").exists() and (log_dir / "crashed_2_2").exists()
        log = read_log(log_dir)
        # every chain scored; a crashed batch's chains scored before the crash are scored again when it is re-issued
        # (which chains share the crashing chain's batch depends on timing), at most max_batch - 1 per crash
        assert {(p, g) for _, p, g in log} == {(r.prompt_id, r.sample_index) for r in rollouts}
        assert len(rollouts) <= len(log) <= len(rollouts) + 2 * (3 - 1)
        assert [(s.prompt_id, s.sample_index) for s in scores] == [
            (r.prompt_id, r.sample_index) for r in rollouts
        ]
        assert scores[1].parts["understanding"] == 0.5  # "CRASH a cat": the re-issued chain was really scored
        again = pool.score(rollouts[:4], samples[:4])  # restarted actors keep serving
        assert [s.total for s in again] == [s.total for s in scores[:4]]
    finally:
        pool.shutdown()


@pytest.mark.slow
def test_pool_gives_up_on_a_chain_that_always_kills_its_actor(ray_cluster):
    _, log_root = ray_cluster
    _fresh_log(log_root)
    cfg = RewardConfig(num_actors=2, num_cpus=0.5, metrics=[], max_restarts=3)
    pool = RewardPool(cfg, worker_cls=CrashingWorker, max_attempts=2)
    rollouts, samples = batch(1, 2)
    rollouts[1] = make_rollout(0, 1, rough="CRASH POISON")
    try:
        with pytest.raises(RuntimeError, match=r"prompt 0, sample 1\) lost its reward actor 2 times"):
            pool.score(rollouts, samples)
    finally:
        pool.shutdown()


@pytest.mark.slow
def test_a_chain_whose_maker_died_for_good_and_every_reward_actor_gone_are_actor_lost(ray_cluster):
    """What the driver heals (``core.actor_group.ActorLost``): a chain whose maker died for good (not re-issued as
    if the reward actor had died), and every reward actor killed with no restarts left."""
    from core.faults import ActorLost

    ray, _ = ray_cluster
    cfg = RewardConfig(num_actors=2, num_cpus=0.5, metrics=[], max_restarts=0)
    rollouts, samples = batch(1, 2)

    @ray.remote(num_cpus=0, max_restarts=0)
    class Maker:
        def make(self, rollout, delay):
            time.sleep(delay)
            return rollout

    pool = RewardPool(cfg, worker_cls=LoggingWorker)
    try:
        maker = Maker.remote()
        refs = [maker.make.remote(r, 30.0) for r in rollouts]
        time.sleep(1.0)
        ray.kill(maker, no_restart=True)
        with pytest.raises(ActorLost, match=r"chains \[\(0, .*a rollout ref failed: ActorDiedError"):
            pool.score(refs, samples)
        assert pool.reissued == 0  # not taken for a reward actor's death
        assert [s.prompt_id for s in pool.score(rollouts, samples)] == [0, 0]  # the pool itself is fine
        for actor in pool.actors:
            ray.kill(actor, no_restart=True)
        with pytest.raises(ActorLost, match="all 2 reward actors are dead"):
            pool.score(rollouts, samples)
    finally:
        pool.shutdown()


@pytest.mark.slow
def test_a_hung_reward_actor_is_killed_and_its_chains_reissued(ray_cluster):
    """reward.call_timeout_s: the actor holding the hung chain is killed after the deadline (not an hour later),
    and every chain is still scored exactly once, as without the hang."""
    _, log_root = ray_cluster
    log_dir = _fresh_log(log_root)
    # the deadline covers the warm-up call (it builds PIQE: over 10 s on a loaded machine) and an actor's restart
    cfg = RewardConfig(num_actors=2, num_cpus=0.5, metrics=[PIQE], call_timeout_s=30.0)
    pool = RewardPool(cfg, worker_cls=HangingWorker, max_batch=2)
    rollouts, samples = batch(2, 2)
    try:
        pool.score(*batch(2, 2))  # both actors warm (a first call builds the metric, slower than later ones)
        log_dir = _fresh_log(log_root)
        rollouts[1] = make_rollout(0, 1, rough="HANG a cat")
        start = time.monotonic()
        scores = pool.score(rollouts, samples)
        took = time.monotonic() - start
        reference = pool.score([make_rollout(0, 1, rough="HANG a cat")], samples[1:2])  # marker set: no hang now
    finally:
        pool.shutdown()
    assert took < 120, took
    assert pool.killed_hung == 1 and pool.reissued >= 1
    assert [(s.prompt_id, s.sample_index) for s in scores] == [(r.prompt_id, r.sample_index) for r in rollouts]
    assert scores[1] == reference[0]  # the re-issued chain's score is what it scores without a hang
    assert Counter((p, g) for _, p, g in read_log(log_dir)) == Counter({(0, 0): 1, (0, 1): 2, (1, 0): 1, (1, 1): 1})
