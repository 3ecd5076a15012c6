"""RolloutGroup: R Ray actors around RolloutWorker, one bundle each (the only Ray code of actors/).

``submit_generate`` returns one ObjectRef per chain, so rewards and learner ranks fetch only the chains they need
and the driver never holds pixels. Actors restart on failure (rollout.max_restarts) and Ray re-runs the task in
flight on the restarted actor; the call carries the latest WeightUpdate, so a restarted actor catches up to the
current policy version before it samples (a step never mixes versions silently).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import ray

from actors.rollout import RolloutWorker
from core.actor_group import ActorGroup
from core.config import ExperimentConfig
from core.records import Sample, WeightUpdate


class RolloutGroup(ActorGroup):
    def __init__(self, cfg: ExperimentConfig):
        rc = cfg.rollout
        super().__init__("rollout", rc.num_actors, rc.num_cpus, rc.num_gpus, cfg.ray.placement_strategy,
                         f"{cfg.name}-rollout")
        self.start(RolloutWorker, lambda i: ((cfg, i), {}), max_restarts=rc.max_restarts,
                   max_task_retries=rc.max_restarts)
        ray.get([a.ping.remote() for a in self.actors])  # fail here, not mid-step, if an engine cannot start
        self.latest: WeightUpdate | None = None

    def submit_generate(self, samples: Sequence[Sample], group_size: int, seed: int) -> list[ray.ObjectRef]:
        """B samples -> B*G refs of Rollout, ordered [p0s0, ..., p0s(G-1), p1s0, ...]; prompts split evenly."""
        refs: list[ray.ObjectRef] = []
        chunks = np.array_split(np.arange(len(samples)), len(self.actors))
        for actor, idx in zip(self.actors, chunks):
            if len(idx) == 0:
                continue
            chunk = [samples[i] for i in idx]
            n = len(chunk) * group_size
            out = actor.generate.options(num_returns=n).remote(chunk, group_size, seed, self.latest)
            refs.extend(out if n > 1 else [out])
        return refs

    def load_weights(self, update: WeightUpdate) -> list[dict[str, float]]:
        """Every actor loads ``update`` in place; blocking. Remembered for actors that restart later."""
        self.latest = update
        return ray.get([a.load_weights.remote(update) for a in self.actors])

    def versions(self) -> list[tuple[int, int]]:
        return ray.get([a.versions.remote() for a in self.actors])
