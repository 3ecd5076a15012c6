"""How new weights get from the learner to the rollout actors (``learner.sync_backend``), behind one call:
``publish(version) -> (WeightUpdate, metrics)``.

- ``object_store``: learner rank 0 serialises safetensors buckets into Ray's object store; the WeightUpdate holds
  their refs and every rollout actor fetches them one bucket at a time when it loads (``RolloutGroup.load_weights``
  / the next rollout call), the policy through vLLM's weight-transfer API (one bucket per ``update_weights``). A
  restarted rollout actor catches up from the same refs.
- ``collective``: learner rank 0 sends over process groups of its own, no object store in between. The policy,
  when vLLM serves it, goes through vLLM's weight-transfer API: every vLLM worker process of every actor (each
  tensor-parallel rank, in the EngineCore's process when ``rollout.vllm.in_process`` is false) is a member of the
  learner's transfer group (vLLM's ``nccl`` engine on GPU, the project's ``cpu_gloo`` on CPU,
  ``learner.transfer``) and loads each packed bucket into its layer-wise reload as it arrives. The SR model (and
  an HF policy) goes over a group of the rollout actors themselves (``core.weight_broadcast``). A sync first pauses
  every actor (its running rollout finishes, none starts) so the weights load in place as they arrive: no actor
  holds a staged copy of a model. In the asynchronous pipeline the learner therefore waits for the rollouts in
  flight, which the next step needs anyway. A member that dies or does not answer within
  ``learner.sync_timeout_s`` fails the sync with an error naming it; the groups are then formed again once (a
  restarted rollout actor joins them and receives the weights) and the sync retried, and a second failure ends the
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
from actors.rollout import ships_adapters, transfer_backend
from core.weight_broadcast import SyncGroupError
from learner.transfer import transfer_init

log = logging.getLogger("rl.weight_sync")
PAUSE_TIMEOUT_S = 1800.0  # without rollout.call_timeout_s: how long a sync waits for a running rollout


class ObjectStoreSync:
    def __init__(self, learner: Any):
        self.learner = learner

    def publish(self, version: int) -> tuple[WeightUpdate, dict[str, float]]:
        return self.learner.publish_weights(version)

    def close(self) -> None:
        pass


class CollectiveSync:
    """Learner rank 0 (the root) and the R rollout actors: vLLM's transfer group for a vLLM policy (members: the
    actors' vLLM workers), the actors' own group for the rest (members: the actors)."""

    def __init__(self, cfg: ExperimentConfig, learner: Any, rollouts: Any):
        self.learner, self.rollouts = learner, rollouts
        self.backend, self.timeout_s = cfg.learner.backend, cfg.learner.sync_timeout_s
        self.bucket_bytes = cfg.learner.sync_bucket_mb << 20
        # the running rollout must finish before a sync: as long as a rollout call may take
        self.pause_timeout_s = cfg.rollout.call_timeout_s or PAUSE_TIMEOUT_S
        # the policy through vLLM's transfer group when vLLM serves its full weights; its adapters alone (small)
        # go to the actors with the SR model, and the actor hands them to vLLM's LoRA
        vllm_policy = cfg.rollout.engine == "vllm" and not ships_adapters(cfg, "policy")
        self.transfer_backend = transfer_backend(cfg) if vllm_policy else None
        self.workers_per_actor = cfg.rollout.vllm.tensor_parallel_size
        trained = list(self.learner.trained)
        self.transfer_models = ["policy"] if vllm_policy and "policy" in trained else []
        self.group_models = [m for m in trained if m not in self.transfer_models]
        self.announced: dict[str, dict] = {}
        self.reopened = 0
        self.open()

    def open(self) -> None:
        """(Re)form the groups on fresh ports of rank 0's node: every member joins or the call fails naming it."""
        refs, names = [], []
        if self.group_models:
            host, port = self.learner.sync_address()
            world = 1 + len(self.rollouts.actors)
            refs.append(self.learner.actors[0].join_weight_group.remote(host, port, world, self.timeout_s))
            refs += self.rollouts.submit_join_weight_group(host, port, world, self.backend, self.timeout_s)
            names += ["learner rank 0"] + self._rollout_names()
        if self.transfer_models:
            host, port = self.learner.sync_address()
            world = 1 + len(self.rollouts.actors) * self.workers_per_actor
            init = transfer_init(self.transfer_backend, host, port, world, self.bucket_bytes, self.timeout_s)
            refs.append(self.learner.actors[0].open_transfer.remote(self.transfer_backend, init))
            refs += self.rollouts.submit_join_transfer(init, self.workers_per_actor)
            names += ["learner rank 0 (weight transfer)"] + [f"{n} (vLLM workers)" for n in self._rollout_names()]
            self.announced = {m: ray.get(self.learner.actors[0].sync_metadata.remote(m))
                              for m in self.transfer_models}
        self._wait(refs, names, "joining the weight-sync groups")

    def publish(self, version: int) -> tuple[WeightUpdate, dict[str, float]]:
        start = time.perf_counter()
        try:
            metrics = self._sync(version)
        except SyncGroupError as exc:
            log.warning("weight sync to version %d failed (%s); forming the groups again and retrying once",
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
        start = time.perf_counter()
        try:
            self._wait(self.rollouts.submit_pause(self.pause_timeout_s), self._rollout_names(),
                       "pausing the rollouts for a weight sync", self.pause_timeout_s)
            paused_s = time.perf_counter() - start
            sends = [a.broadcast_weights.remote(models, self.transfer_models, self.announced)
                     for a in self.learner.actors]
            receives = self.rollouts.submit_receive_weights(
                models, version, self.announced.get("policy") if self.transfer_models else None)
            names = [f"learner rank {r}" for r in range(len(sends))] + self._rollout_names()
            results = self._wait(sends + receives, names, f"syncing weights version {version}")
        except SyncGroupError:
            self.rollouts.resume()
            raise
        return {**results[0], "weight_sync/pause_s": paused_s}

    def _rollout_names(self) -> list[str]:
        return [f"rollout actor {i}" for i in range(len(self.rollouts.actors))]

    def _wait(self, refs: Sequence[ray.ObjectRef], names: Sequence[str], what: str,
              timeout_s: float | None = None) -> list[Any]:
        """All results, or SyncGroupError naming the members that failed or did not answer in time."""
        limit = (self.timeout_s if timeout_s is None else timeout_s) + 10.0
        _, pending = ray.wait(list(refs), num_returns=len(refs), timeout=limit)
        failed = [names[i] for i, r in enumerate(refs) if r in pending]
        if failed:
            raise SyncGroupError(f"{what}: no answer from {', '.join(failed)} within {limit - 10:.0f} s "
                                 "(learner.sync_timeout_s, or rollout.call_timeout_s for a pause)")
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
        return CollectiveSync(cfg, learner, rollouts)
    return ObjectStoreSync(learner)
