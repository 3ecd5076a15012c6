"""Reward actors: K ``RewardWorker`` processes scoring chains in parallel as rollouts arrive.

The only module of rewards/ that touches Ray, and lazily: ``RewardWorker`` is a plain class that tests and
single-process runs use directly; ``RewardPool`` applies ``ray.remote`` to it at construction.
"""

from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from rewards.quality import QualityScorer, build_quality_scorer
from rewards.total import score_rollouts
from rl.config import RewardConfig
from rl.records import Rollout, Sample, Scores


class RolloutUnavailable(RuntimeError):
    """A rollout ref could not be fetched (its producer failed): not this reward actor's death."""


class RewardWorker:
    """One reward process: builds the quality metrics once, then scores batches of chains."""

    def __init__(self, cfg: RewardConfig, device: str = "cpu") -> None:
        self.cfg = cfg
        self.scorer: Optional[QualityScorer] = None
        if cfg.metrics or cfg.full_reference:
            self.scorer = build_quality_scorer(cfg.metrics, device, cfg.full_reference, cfg.metric_timeout_s)

    def score(self, pairs: Sequence[tuple[Any, Sample]]) -> list[Scores]:
        """pairs: (Rollout or ObjectRef of a Rollout, its Sample) -> Scores in the same order."""
        rollouts = [_resolve(r) for r, _ in pairs]
        return score_rollouts(rollouts, [s for _, s in pairs], self.cfg, self.scorer)

    def pid(self) -> int:
        return os.getpid()


def _resolve(rollout: Any) -> Rollout:
    if isinstance(rollout, Rollout):
        return rollout
    if type(rollout).__name__ == "ObjectRef":  # refs nested in a list are not resolved by Ray: fetch here
        import ray

        try:
            rollout = ray.get(rollout)
        except Exception as exc:
            raise RolloutUnavailable(f"rollout ref {rollout} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(rollout, Rollout):
        raise TypeError(f"expected a Rollout (or a ref to one), got {type(rollout).__name__}")
    return rollout


@dataclass
class _Actor:
    handle: Any
    tasks: int = 0  # tasks in flight
    chains: int = 0  # chains in flight
    deaths: int = 0  # deaths seen by this pool
    epoch: int = 0  # bumped on each counted death; tasks submitted earlier that fail are the same death
    alive: bool = True


class RewardPool:
    """K reward actors behind one blocking call, ``score(rollouts_or_refs, samples) -> list[Scores]``.

    Dispatch: a chain is sent once its rollout is ready (``ray.wait`` over the refs), in chunks of at most
    ``max_batch`` chains, to the live actor with the fewest chains in flight; an actor holds at most
    ``max_inflight`` tasks, so the rest waits here for whichever actor frees first. Results keep input order.

    Failures:
    - a metric that raises or runs past ``cfg.metric_timeout_s`` is handled inside the worker: it is reported
      in ``Scores.errors`` and scored by ``cfg.failed_metric``; the chain is still scored once.
    - an actor process that dies is restarted by Ray (``cfg.max_restarts``); the chains of its lost tasks are
      re-issued by the pool to the least-loaded live actor. Ray does not retry them itself
      (``max_task_retries=0``), so a chain is never scored by both Ray's retry and the pool: every chain gets
      exactly one result. A chain that kills its actor ``max_attempts`` times raises RuntimeError.
    - an exception raised by the scoring code (a bug, a failed rollout ref) is raised, naming the chains.
    """

    def __init__(
        self,
        cfg: RewardConfig,
        *,
        worker_cls: type = RewardWorker,
        max_batch: int = 4,
        max_inflight: int = 2,
        max_attempts: int = 3,
    ) -> None:
        import ray

        self._ray = ray
        self.cfg = cfg
        self.max_batch, self.max_inflight, self.max_attempts = max_batch, max_inflight, max_attempts
        device = "cuda" if cfg.num_gpus > 0 else "cpu"
        remote_cls = ray.remote(worker_cls).options(
            num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, max_restarts=cfg.max_restarts, max_task_retries=0
        )
        self._actors = [_Actor(remote_cls.remote(cfg, device)) for _ in range(cfg.num_actors)]

    @property
    def actors(self) -> list[Any]:
        return [a.handle for a in self._actors]

    def score(self, rollouts: Sequence[Any], samples: Sequence[Sample]) -> list[Scores]:
        """rollouts[i]: Rollout or ObjectRef of one; samples[i]: its Sample -> Scores in input order."""
        ray = self._ray
        if len(rollouts) != len(samples):
            raise ValueError(f"{len(rollouts)} rollouts but {len(samples)} samples")
        results: list[Optional[Scores]] = [None] * len(rollouts)
        attempts = [0] * len(rollouts)
        waiting = {r: i for i, r in enumerate(rollouts) if isinstance(r, ray.ObjectRef)}  # rollout ref -> chain
        ready = deque(i for i, r in enumerate(rollouts) if not isinstance(r, ray.ObjectRef))
        running: dict[Any, tuple[int, list[int], int]] = {}  # result ref -> (actor, chains, actor epoch)
        remaining = len(rollouts)
        while remaining:
            self._dispatch(ready, running, rollouts, samples)
            pending = list(running) + list(waiting)
            ray.wait(pending, num_returns=1)  # block for the first; then take everything already done
            finished, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
            for ref in finished:
                if ref in waiting:
                    ready.append(waiting.pop(ref))
                    continue
                a, chains, epoch = running.pop(ref)
                actor = self._actors[a]
                actor.tasks -= 1
                actor.chains -= len(chains)
                try:
                    scores = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    self._count_death(actor, epoch)
                    self._requeue(chains, attempts, ready, rollouts, samples, exc)
                    continue
                except Exception as exc:
                    ids = [(samples[i].prompt_id, _sample_index(rollouts[i])) for i in chains]
                    raise RuntimeError(f"reward actor {a} failed scoring chains {ids}: {exc}") from exc
                for i, s in zip(chains, scores):
                    results[i] = s
                remaining -= len(chains)
        return results  # type: ignore[return-value]

    def shutdown(self) -> None:
        for a in self._actors:
            self._ray.kill(a.handle, no_restart=True)
            a.alive = False

    # ------------------------------------------------------------------------------------------ internals
    def _dispatch(self, ready: deque, running: dict, rollouts: Sequence[Any], samples: Sequence[Sample]) -> None:
        while ready:
            alive = [k for k, a in enumerate(self._actors) if a.alive]
            if not alive:
                raise RuntimeError(f"all {len(self._actors)} reward actors are dead "
                                   f"(each died more than reward.max_restarts = {self.cfg.max_restarts} times)")
            free = [k for k in alive if self._actors[k].tasks < self.max_inflight]
            if not free:
                return
            k = min(free, key=lambda j: (self._actors[j].chains, self._actors[j].deaths))
            size = max(1, min(self.max_batch, math.ceil(len(ready) / len(alive))))
            chains = [ready.popleft() for _ in range(min(size, len(ready)))]
            actor = self._actors[k]
            ref = actor.handle.score.remote([(rollouts[i], samples[i]) for i in chains])
            running[ref] = (k, chains, actor.epoch)
            actor.tasks += 1
            actor.chains += len(chains)

    def _count_death(self, actor: _Actor, epoch: int) -> None:
        if epoch == actor.epoch:  # submitted after the last counted death: a new death
            actor.deaths += 1
            actor.epoch += 1
            actor.alive = actor.deaths <= self.cfg.max_restarts

    def _requeue(self, chains, attempts, ready: deque, rollouts, samples, exc: Exception) -> None:
        for i in chains:
            attempts[i] += 1
            if attempts[i] >= self.max_attempts:
                raise RuntimeError(
                    f"chain (prompt {samples[i].prompt_id}, sample {_sample_index(rollouts[i])}) lost its reward "
                    f"actor {attempts[i]} times; last error: {type(exc).__name__}: {exc}"
                ) from exc
        ready.extendleft(reversed(chains))  # first in line: they have waited longest


def _sample_index(rollout: Any) -> Any:
    return rollout.sample_index if isinstance(rollout, Rollout) else "?"
