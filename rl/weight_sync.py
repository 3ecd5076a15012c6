"""How new weights get from the learner to the rollout actors (``learner.sync_backend``), behind one call:
``publish(version) -> (WeightUpdate, metrics)``.

- ``object_store``: learner rank 0 serialises safetensors buckets into Ray's object store; the WeightUpdate holds
  their refs and every rollout actor fetches them when it loads (``RolloutGroup.load_weights`` / the next rollout
  call). A restarted rollout actor catches up from the same refs.
- ``collective``: learner rank 0 broadcasts the buckets over a process group of its own with every rollout actor
  (``core.weight_broadcast``: gloo on CPU, NCCL on GPU), received in each actor's "weights" thread; the
  WeightUpdate carries only the version. Synchronous pipeline: the actors have loaded the weights when
  ``publish`` returns. Asynchronous pipeline (``defer``): the broadcast runs while the actors are still sampling
  the next batch, and each actor loads the received weights at the start of the first rollout call that carries
  their version, exactly where the object-store path would load them. A member that dies or does not answer within
  ``learner.sync_timeout_s`` fails the sync with an error naming it; the group is then formed again once (a
  restarted rollout actor joins it and receives the weights) and the sync retried, and a second failure ends the
  run. Chains a restarted actor sampled before it rejoined carry its old version, so the learner treats them as
  stale (``learner.off_policy``) and does not train on those more than ``trainer.max_staleness`` versions old
  (``learner/dropped_stale_chains``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import ray

from core.config import ExperimentConfig
from core.records import WeightUpdate
from core.weight_broadcast import SyncGroupError

log = logging.getLogger("rl.weight_sync")


class ObjectStoreSync:
    def __init__(self, learner: Any):
        self.learner = learner

    def publish(self, version: int) -> tuple[WeightUpdate, dict[str, float]]:
        return self.learner.publish_weights(version)

    def close(self) -> None:
        pass


class CollectiveSync:
    """Learner rank 0 (the root) and the R rollout actors (members 1..R) in one weight-sync group."""

    def __init__(self, learner: Any, rollouts: Any, backend: str, timeout_s: float, defer: bool = False):
        self.learner, self.rollouts = learner, rollouts
        self.backend, self.timeout_s, self.defer = backend, timeout_s, defer
        self.reopened = 0
        self.open()

    def open(self) -> None:
        """(Re)form the group on a fresh port of rank 0's node: every member joins or the call fails naming it."""
        host, port = self.learner.sync_address()
        world = 1 + len(self.rollouts.actors)
        refs = [self.learner.actors[0].join_weight_group.remote(host, port, world, self.timeout_s)]
        refs += self.rollouts.submit_join_weight_group(host, port, world, self.backend, self.timeout_s)
        self._wait(refs, ["learner rank 0"] + self._rollout_names(), "joining the weight-sync group")

    def publish(self, version: int) -> tuple[WeightUpdate, dict[str, float]]:
        start = time.perf_counter()
        try:
            metrics = self._sync(version)
        except SyncGroupError as exc:
            log.warning("weight sync to version %d failed (%s); forming the group again and retrying once",
                        version, exc)
            self.reopened += 1
            self.open()
            metrics = self._sync(version)
        metrics["weight_sync/seconds"] = time.perf_counter() - start
        metrics["weight_sync/regroups"] = float(self.reopened)
        return WeightUpdate(version=version), metrics

    def close(self) -> None:
        pass

    def _sync(self, version: int) -> dict[str, float]:
        models = list(self.learner.trained)
        sends = [a.broadcast_weights.remote(models) for a in self.learner.actors]
        receives = self.rollouts.submit_receive_weights(models, version, self.defer)
        names = [f"learner rank {r}" for r in range(len(sends))] + self._rollout_names()
        results = self._wait(sends + receives, names, f"syncing weights version {version}")
        return dict(results[0])

    def _rollout_names(self) -> list[str]:
        return [f"rollout actor {i}" for i in range(len(self.rollouts.actors))]

    def _wait(self, refs: Sequence[ray.ObjectRef], names: Sequence[str], what: str) -> list[Any]:
        """All results, or SyncGroupError naming the members that failed or did not answer in time."""
        _, pending = ray.wait(list(refs), num_returns=len(refs), timeout=self.timeout_s + 10.0)
        failed = [names[i] for i, r in enumerate(refs) if r in pending]
        if failed:
            raise SyncGroupError(f"{what}: no answer from {', '.join(failed)} within learner.sync_timeout_s = "
                                 f"{self.timeout_s:.0f} s")
        results, errors = [], []
        for name, ref in zip(names, refs):
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayError as exc:
                errors.append(f"{name}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[-1][:300]}")
        if errors:
            raise SyncGroupError(f"{what} failed: " + "; ".join(errors))
        return results


def build_weight_sync(cfg: ExperimentConfig, learner: Any, rollouts: Any) -> ObjectStoreSync | CollectiveSync:
    """The ``learner.sync_backend`` of ``cfg`` between the run's learner and rollout groups."""
    if cfg.learner.sync_backend == "collective":
        return CollectiveSync(learner, rollouts, cfg.learner.backend, cfg.learner.sync_timeout_s,
                              defer=cfg.trainer.max_staleness > 0)
    return ObjectStoreSync(learner)
