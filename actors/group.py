"""RolloutGroup: R Ray actors around RolloutWorker, placed with a placement group (the only Ray code of actors/).

``submit_generate`` returns one ObjectRef per chain, so rewards and learner ranks fetch only the chains they need
and the driver never holds pixels. Actors restart on failure (rollout.max_restarts) and Ray re-runs the task in
flight on the restarted actor; the call carries the latest WeightUpdate, so a restarted actor catches up to the
current policy version before it samples (a step never mixes versions silently).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.rollout import RolloutWorker
from rl.config import ExperimentConfig
from rl.records import Sample, WeightUpdate


def role_placement_group(num: int, num_cpus: float, num_gpus: float, strategy: str, name: str) -> PlacementGroup:
    """One bundle per actor of a role; blocks until the cluster (or the autoscaler) can place it."""
    bundle = {"CPU": num_cpus}
    if num_gpus > 0:
        bundle["GPU"] = num_gpus
    pg = placement_group([dict(bundle) for _ in range(num)], strategy=strategy, name=name)
    ray.get(pg.ready())
    return pg


class RolloutGroup:
    def __init__(self, cfg: ExperimentConfig):
        rc = cfg.rollout
        self.pg = role_placement_group(rc.num_actors, rc.num_cpus, rc.num_gpus, cfg.ray.placement_strategy,
                                       f"{cfg.name}-rollout")
        remote = ray.remote(RolloutWorker)
        self.actors = [
            remote.options(
                num_cpus=rc.num_cpus,
                num_gpus=rc.num_gpus,
                max_restarts=rc.max_restarts,
                max_task_retries=rc.max_restarts,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(cfg, i)
            for i in range(rc.num_actors)
        ]
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

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        ray.util.remove_placement_group(self.pg)
