"""RewardWorker: one reward process, a plain class (no Ray import) that ``rewards.pool.RewardPool`` runs as K
actors and that tests and single-process runs use directly. It builds the quality metrics once, then scores
batches of chains (``rewards.total.score_rollouts``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from core.config import RewardConfig
from core.records import Rollout, Sample, Scores
from rewards.quality import build_reward_scorers
from rewards.total import score_rollouts


class RolloutUnavailable(RuntimeError):
    """A rollout ref could not be fetched (its producer failed): not this reward actor's death."""


class RewardWorker:
    """One reward process: builds the quality metrics once, then scores batches of chains."""

    def __init__(self, cfg: RewardConfig, device: str = "cpu") -> None:
        self.cfg = cfg
        self.scorer, self.stage_scorer = build_reward_scorers(cfg, device)

    def score(self, pairs: Sequence[tuple[Any, Sample]]) -> list[Scores]:
        """pairs: (Rollout or ObjectRef of a Rollout, its Sample) -> Scores in the same order."""
        return score_rollouts(_resolve([r for r, _ in pairs]), [s for _, s in pairs], self.cfg, self.scorer,
                              self.stage_scorer)

    def pid(self) -> int:
        return os.getpid()


def _resolve(items: Sequence[Any]) -> list[Rollout]:
    """Rollouts, the ObjectRefs among them fetched in one call (Ray leaves refs nested in a list alone)."""
    refs = [k for k, r in enumerate(items) if type(r).__name__ == "ObjectRef"]
    out = list(items)
    if refs:
        import ray

        try:
            for k, value in zip(refs, ray.get([items[k] for k in refs])):
                out[k] = value
        except ray.exceptions.RayError as exc:  # the rollout's producer failed, or its object was lost
            raise RolloutUnavailable(f"a rollout ref failed: {type(exc).__name__}: {exc}") from None
    for r in out:
        if not isinstance(r, Rollout):
            raise TypeError(f"expected a Rollout (or a ref to one), got {type(r).__name__}")
    return out
