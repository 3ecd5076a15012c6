"""The ``local`` transport: the roles' plain classes in the driver's own process, behind the methods the drivers call
on the Ray groups (``actors.group.RolloutGroup``, ``rewards.pool.RewardPool``, ``learner.group.LearnerGroup``,
``rl.weight_sync``). Chains are Rollout objects instead of ObjectRefs; the learner is one DeepSpeed rank (world
size 1: NCCL and bf16 on a GPU); a sync hands the learner's tensors to the sampler in place, nothing serialised.
Nothing here imports Ray.
"""

from __future__ import annotations

import socket
import time
from typing import Any, Optional, Sequence

from core.config import ConfigError, ExperimentConfig
from core.records import ChainAdvantage, Rollout, Sample, Scores, WeightUpdate


def local_dist_env(port: Optional[int] = None) -> dict[str, str]:
    """A world-size-1 process group on this machine (a free port unless ``port``)."""
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


class LocalRollouts:
    """One ``RolloutWorker``: ``RolloutGroup``'s calls, answered now."""

    killed_hung = 0  # no watchdog: a call runs in this thread

    def __init__(self, cfg: ExperimentConfig):
        from actors.rollout import RolloutWorker

        self.worker = RolloutWorker(cfg)
        self.latest: WeightUpdate | None = None

    def submit_generate(self, samples: Sequence[Sample], group_size: int, seed: int, explore: bool = True
                        ) -> tuple[list[Rollout], list[Rollout]]:
        """B samples -> (B*G Rollouts, their scoring views), [p0s0, ..., p0s(G-1), p1s0, ...]."""
        chains = self.worker.generate(samples, group_size, seed, explore=explore)
        return chains, [c.scoring_view() for c in chains]

    def offer(self, update: WeightUpdate) -> None:
        self.latest = update

    def load_weights(self, update: WeightUpdate) -> list[dict[str, float]]:
        """Serialised weights (a resume's), or only remembered when the sync already loaded them."""
        self.latest = update
        return [self.worker.load_weights(update)] if update.policy or update.diffusion else []

    def close(self) -> None:
        """Shut the text engine down before another is built in this process (see ``VLLMTextEngine.close``)."""
        self.worker.close()

    shutdown = close


class LocalRewards:
    """One ``RewardWorker``: ``RewardPool.score`` in this process."""

    reissued = 0
    killed_hung = 0

    def __init__(self, cfg: ExperimentConfig):
        from rewards.worker import RewardWorker

        self.worker = RewardWorker(cfg.reward, "cuda" if cfg.reward.num_gpus > 0 else "cpu")

    def score(self, rollouts: Sequence[Rollout], samples: Sequence[Sample],
              timings: dict[str, float] | None = None) -> list[Scores]:
        if timings is not None:
            timings["inputs_ready_s"] = 0.0  # the rollouts are done when they reach here
        return self.worker.score(list(zip(rollouts, samples)))

    def shutdown(self) -> None:
        pass


class LocalLearner:
    """One ``LearnerWorker`` (world size 1): ``LearnerGroup``'s calls."""

    def __init__(self, cfg: ExperimentConfig, dist_env: dict[str, str], **worker_kwargs: Any):
        from learner.worker import LearnerWorker

        self.worker = LearnerWorker.from_config(cfg, dist_env, **worker_kwargs)
        self.trained = tuple(self.worker.models.trained())

    def train(self, chains: Sequence[Rollout], advantages: Sequence[ChainAdvantage], keep: Sequence[bool],
              version: Optional[int] = None, max_staleness: Optional[int] = None) -> dict[str, float]:
        kept = [i for i, k in enumerate(keep) if k]
        if not kept:
            raise ValueError("every group was filtered: the driver must skip the learner for this step")
        return self.worker.train_chains([advantages[i] for i in kept], False, *[chains[i] for i in kept],
                                        version=version, max_staleness=max_staleness)

    def sft(self, records: Sequence[Any]) -> dict[str, float]:
        if not records:
            raise ValueError("sft: no records")
        return self.worker.sft_step(*records)

    def export_hf(self, directory: str) -> dict[str, str]:
        return self.worker.export_hf(directory)

    def save_checkpoint(self, directory: str) -> None:
        self.worker.save_checkpoint(directory)

    def load_checkpoint(self, directory: str) -> None:
        self.worker.load_checkpoint(directory)

    def shutdown(self) -> None:
        pass


class LocalWeightSync:
    """The learner's weights (the LoRA adapters alone, or merged: ``<model>.lora.sync``) into the sampler."""

    def __init__(self, learner: LocalLearner, rollouts: LocalRollouts):
        self.learner, self.rollouts = learner, rollouts

    def publish(self, version: int) -> tuple[WeightUpdate, dict[str, float]]:
        start = time.perf_counter()
        for model in self.learner.trained:
            self.rollouts.worker.load_state(model, self.learner.worker.sync_state(model).items(), version)
        return WeightUpdate(version=version), {"weight_sync/seconds": time.perf_counter() - start}

    def close(self) -> None:
        pass


class LocalTransport:
    """``rl.transport``'s ``local`` entry."""

    name = "local"

    def __init__(self, dist_env: Optional[dict[str, str]] = None):
        self.dist_env = dist_env

    def check(self, cfg: ExperimentConfig) -> None:
        """What needs several processes is an error here, naming the key."""
        if cfg.trainer.max_staleness:
            raise ConfigError(f"key 'trainer.max_staleness' = {cfg.trainer.max_staleness}: the asynchronous "
                              "pipeline needs rl.launch (one process runs its phases in turn)")
        if cfg.learner.num_ranks != 1:
            raise ConfigError(f"key 'learner.num_ranks' = {cfg.learner.num_ranks}: one process is one learner rank")

    def rollout_group(self, cfg: ExperimentConfig) -> LocalRollouts:
        return LocalRollouts(cfg)

    def reward_pool(self, cfg: ExperimentConfig) -> LocalRewards:
        return LocalRewards(cfg)

    def learner_group(self, cfg: ExperimentConfig, **worker_kwargs: Any) -> LocalLearner:
        return LocalLearner(cfg, self.dist_env or local_dist_env(), **worker_kwargs)

    def weight_sync(self, cfg: ExperimentConfig, learner: LocalLearner, rollouts: LocalRollouts) -> LocalWeightSync:
        return LocalWeightSync(learner, rollouts)

    def fetch(self, chains: Any) -> Any:
        return chains

    def lost_actor_errors(self) -> tuple[type[BaseException], ...]:
        return ()  # no actors: every error ends the run

    def is_lost(self, exc: BaseException, roles: Sequence[Any]) -> bool:
        return False
