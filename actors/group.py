"""RolloutGroup: R Ray actors around RolloutWorker, one bundle each (the only Ray code of actors/); with vLLM
tensor-parallel on GPUs, each actor's bundle (no GPU) is followed by its TP workers' GPU bundles, where vLLM's Ray
executor places them (``core.placement.rollout_layout``).

``submit_generate`` returns two ObjectRefs per chain: the whole Rollout (tokens, log-probs, diffusion traces) for
the learner ranks, and its scoring view (text and final image, ``Rollout.scoring_view``) for the reward actors, so
each side fetches only what it needs and the driver never holds pixels. Actors restart on failure
(rollout.max_restarts) and Ray re-runs the task in flight on the restarted actor; the call carries the latest
WeightUpdate, so a restarted actor catches up to the current policy version before it samples (a step never mixes
versions silently). A call that holds an actor past ``rollout.call_timeout_s`` without returning (a hung process)
is treated the same way: a watchdog thread kills the actor, Ray restarts it and re-runs the call. The time an actor
spends restarting (a vLLM engine loads for minutes on a cluster) does not count: the timeout bounds a live actor's
silence, so a restart is never taken for a hang.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Sequence

import numpy as np
import ray

from actors.rollout import RolloutWorker
from core.actor_group import ActorGroup, ProgressClock, actor_states
from core.config import ExperimentConfig
from core.placement import rollout_layout
from core.records import Sample, WeightUpdate

WEIGHTS_THREAD = "weights"  # the actors' concurrency group of the collective weight sync
log = logging.getLogger("actors.group")


class RolloutGroup(ActorGroup):
    def __init__(self, cfg: ExperimentConfig):
        rc = cfg.rollout
        super().__init__("rollout", rc.num_actors, rc.num_cpus, rc.num_gpus, cfg.ray.placement_strategy,
                         f"{cfg.name}-rollout", layout=rollout_layout(rc))
        # the "weights" thread receives a collective weight sync while the default thread runs a rollout
        self.start(RolloutWorker, lambda i: ((cfg, i), {}), max_restarts=rc.max_restarts,
                   max_task_retries=rc.max_restarts, concurrency_groups={WEIGHTS_THREAD: 1})
        ray.get([a.ping.remote() for a in self.actors])  # fail here, not mid-step, if an engine cannot start
        self.latest: WeightUpdate | None = None
        self.killed_hung = 0  # actors killed by the watchdog (for logging)
        self._clock = ProgressClock(len(self.actors), rc.call_timeout_s)
        self._calls: list[deque] = [deque() for _ in self.actors]  # per actor: first refs of its calls in flight
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if rc.call_timeout_s > 0:
            threading.Thread(target=self._watch, name="rollout-watchdog", daemon=True).start()

    def submit_generate(self, samples: Sequence[Sample], group_size: int, seed: int, explore: bool = True
                        ) -> tuple[list[ray.ObjectRef], list[ray.ObjectRef]]:
        """B samples -> (B*G refs of Rollout, B*G refs of their scoring views), both ordered
        [p0s0, ..., p0s(G-1), p1s0, ...]; prompts split evenly over the actors. ``explore`` False: held out
        (no ``experimental.detail_gain_std`` gains)."""
        chains: list[ray.ObjectRef] = []
        views: list[ray.ObjectRef] = []
        chunks = np.array_split(np.arange(len(samples)), len(self.actors))
        for k, (actor, idx) in enumerate(zip(self.actors, chunks)):
            if len(idx) == 0:
                continue
            chunk = [samples[i] for i in idx]
            n = len(chunk) * group_size
            out = actor.generate_with_views.options(num_returns=2 * n).remote(chunk, group_size, seed, self.latest,
                                                                             explore)
            self._track(k, out[0])
            chains.extend(out[:n])
            views.extend(out[n:])
        return chains, views

    def offer(self, update: WeightUpdate) -> None:
        """Make ``update`` the weights every later ``submit_generate`` call carries (each actor loads it before
        it samples, if it is behind), without waiting: the asynchronous pipeline's sync."""
        self.latest = update

    def load_weights(self, update: WeightUpdate) -> list[dict[str, float]]:
        """Every actor loads ``update`` in place; blocking. Remembered for actors that restart later. An update
        without weights (the collective sync already delivered them) is only remembered."""
        self.latest = update
        if not update.policy and not update.diffusion:
            return []
        return ray.get([a.load_weights.remote(update) for a in self.actors])

    def submit_join_weight_group(self, host: str, port: int, world_size: int, backend: str, timeout_s: float
                                 ) -> list[ray.ObjectRef]:
        """Every actor joins the actors' collective weight-sync group as member 1..R (learner rank 0 is member 0)."""
        return [a.join_weight_group.options(concurrency_group=WEIGHTS_THREAD).remote(
            host, port, i + 1, world_size, backend, timeout_s) for i, a in enumerate(self.actors)]

    def submit_join_transfer(self, init_info: dict, workers_per_actor: int) -> list[ray.ObjectRef]:
        """Every actor's vLLM workers join the learner's weight-transfer group: actor i's first worker is member
        1 + i * ``workers_per_actor`` (its tensor-parallel ranks follow; learner rank 0 is member 0)."""
        return [a.join_transfer.options(concurrency_group=WEIGHTS_THREAD).remote(
            {**init_info, "rank_offset": 1 + i * workers_per_actor}) for i, a in enumerate(self.actors)]

    def submit_pause(self, timeout_s: float) -> list[ray.ObjectRef]:
        """Every actor finishes its running rollout and starts no other until it has received a sync."""
        return [a.pause.options(concurrency_group=WEIGHTS_THREAD).remote(timeout_s) for a in self.actors]

    def resume(self) -> None:
        """End every actor's pause (a sync that failed before it reached them); best effort."""
        for a in self.actors:
            a.resume.options(concurrency_group=WEIGHTS_THREAD).remote()

    def submit_receive_weights(self, models: Sequence[str], version: int, policy_update: dict | None
                               ) -> list[ray.ObjectRef]:
        """Every actor receives a collective sync of ``models`` (in its "weights" thread; paused, so no rollout
        runs meanwhile), loading each bucket as it arrives. ``policy_update``: the policy's names, dtypes and
        shapes for vLLM's weight transfer (None: the policy comes over the actors' group)."""
        return [a.receive_weights.options(concurrency_group=WEIGHTS_THREAD).remote(models, version, policy_update)
                for a in self.actors]

    def transfer_stats(self) -> list[list[dict[str, float]]]:
        """Per actor, its vLLM workers' weight-transfer statistics."""
        return ray.get([a.transfer_stats.options(concurrency_group=WEIGHTS_THREAD).remote() for a in self.actors])

    def versions(self) -> list[tuple[int, int]]:
        return ray.get([a.versions.remote() for a in self.actors])

    def stop_watchdog(self) -> None:
        """End the hung-call watchdog: the run is over and Ray may shut down next (its thread must not call Ray
        after that)."""
        self._stop.set()

    def close(self) -> None:
        """The run is over: stop what the driver runs for this group (Ray's shutdown ends the actors)."""
        self.stop_watchdog()

    def shutdown(self) -> None:
        self.stop_watchdog()
        super().shutdown()

    # ------------------------------------------------------------------ hung calls (rollout.call_timeout_s)
    def _track(self, k: int, ref: ray.ObjectRef) -> None:
        if self._clock.timeout_s:
            with self._lock:
                self._calls[k].append(ref)
                self._clock.started(k)

    def _hold_restarting(self) -> None:
        """A busy actor that Ray is restarting is not hung: its clock waits until the cluster reports it alive."""
        actors = list(self.actors)
        busy = [k for k, n in enumerate(self._clock.busy) if n and k < len(actors)]
        for k, state in zip(busy, actor_states([actors[k] for k in busy])):
            if state != "ALIVE":
                self._clock.hold(k)

    def _watch(self) -> None:
        """Every second: retire the calls that returned, kill the actors whose oldest call is overdue."""
        while not self._stop.wait(1.0) and ray.is_initialized():
            self._hold_restarting()
            with self._lock:
                for k, calls in enumerate(self._calls):
                    while calls and ray.wait([calls[0]], timeout=0)[0]:
                        calls.popleft()
                        self._clock.returned(k)
                late = self._clock.overdue()
            for k in late:
                log.warning("rollout actor %d: no call returned within rollout.call_timeout_s = %.0f s; killing it "
                            "(Ray restarts it and re-runs its calls)", k, self._clock.timeout_s)
                self.killed_hung += 1
                try:
                    ray.kill(self.actors[k], no_restart=False)
                except (IndexError, ValueError):  # the group was shut down meanwhile
                    return
