"""The reward pool: K ``rewards.worker.RewardWorker`` actors (an ``ActorGroup``, one bundle each) scoring chains
in parallel as rollouts arrive. The only module of rewards/ that imports Ray.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from core.actor_group import ActorGroup, ProgressClock
from core.faults import ActorLost
from core.config import RewardConfig
from core.records import Rollout, Sample, Scores
from rewards.worker import RewardWorker, RolloutUnavailable

log = logging.getLogger("rewards.pool")


@dataclass
class _Actor:
    handle: Any
    state: str = "ready"  # ready | recovering (Ray is restarting it; a probe waits for it) | dead
    tasks: int = 0  # tasks in flight
    chains: int = 0  # chains in flight


class RewardPool(ActorGroup):
    """K reward actors behind one blocking call, ``score(rollouts_or_refs, samples) -> list[Scores]``.

    Dispatch: a chain is sent once its rollout is ready (``ray.wait`` over the refs) to the ready actor with
    the fewest chains in flight. The chains ready at that moment are split evenly over the ready actors, at
    most ``max_batch`` per task (bounds a task's memory): chains that arrive one by one go out one by one,
    a burst goes out as a few large batches, which network metrics need (TOPIQ on CPU: a batch of 4 costs
    ~4x more per image than a batch of 32). An actor holds at most ``max_inflight`` tasks; the rest waits
    here for whichever actor frees first. Results keep input order.

    Failures:
    - a metric that raises or runs past ``cfg.metric_timeout_s`` is handled inside the worker: it is reported
      in ``Scores.errors`` and scored by ``cfg.failed_metric``; the chain is still scored once.
    - an actor process that dies loses its in-flight tasks; their chains go back to the front of the queue
      and are re-issued to the other ready actors. Ray restarts the actor (``cfg.max_restarts``) while a probe
      (one ``pid`` call that Ray retries through the restart) tells the pool when it may be used again, or
      that it is gone for good. Scoring tasks are not retried by Ray (``max_task_retries=0``), so only the
      pool re-issues work and every chain gets exactly one result. An actor that holds chains past
      ``cfg.call_timeout_s`` without returning any (a hung process) is killed and handled the same way. A chain whose task loses its actor
      ``max_attempts`` times (a chain that crashes every process) raises RuntimeError; all actors dead raises
      ``core.actor_group.ActorLost`` (the driver rebuilds the roles), as does a chain whose rollout actor is gone
      for good (its ref failed: ``rewards.worker.RolloutUnavailable``).
    - an exception raised by the scoring code (a bug, a failed rollout ref) is raised, naming the chains.
    """

    def __init__(
        self,
        cfg: RewardConfig,
        *,
        strategy: str = "PACK",
        name: str = "reward",
        worker_cls: type = RewardWorker,
        max_batch: int = 16,
        max_inflight: int = 2,
        max_attempts: int = 3,
    ) -> None:
        """``strategy`` / ``name``: of the role's placement group (``ray.placement_strategy``, run name)."""
        import ray

        super().__init__("reward", cfg.num_actors, cfg.num_cpus, cfg.num_gpus, strategy, name)
        self._ray = ray
        self.cfg = cfg
        self.max_batch, self.max_inflight, self.max_attempts = max_batch, max_inflight, max_attempts
        device = "cuda" if cfg.num_gpus > 0 else "cpu"
        self.start(worker_cls, lambda i: ((cfg, device), {}), max_restarts=cfg.max_restarts, max_task_retries=0)
        self._actors = [_Actor(handle) for handle in self.actors]
        self._clock = ProgressClock(len(self._actors), cfg.call_timeout_s)
        self.killed_hung = 0  # actors killed for holding chains past reward.call_timeout_s
        self._probes: dict[Any, int] = {}  # probe ref -> actor index
        self.reissued = 0  # chains whose scoring task died with its actor and was sent again (for logging)
        self._lock = threading.Lock()  # one score call at a time (the asynchronous pipeline's thread, held-out eval)

    def score(self, rollouts: Sequence[Any], samples: Sequence[Sample],
              timings: dict[str, float] | None = None) -> list[Scores]:
        """rollouts[i]: Rollout or ObjectRef of one; samples[i]: its Sample -> Scores in input order. Chains are
        scored as their refs become ready, so the scoring overlaps the rollout still running; ``timings`` gets
        ``inputs_ready_s``, the seconds until the last ref was ready. Thread-safe: calls from several threads
        run one after another."""
        timings = {} if timings is None else timings
        with self._lock:
            return self._score(rollouts, samples, timings)

    def _score(self, rollouts: Sequence[Any], samples: Sequence[Sample], timings: dict[str, float]
               ) -> list[Scores]:
        ray = self._ray
        start = time.perf_counter()
        if len(rollouts) != len(samples):
            raise ValueError(f"{len(rollouts)} rollouts but {len(samples)} samples")
        results: list[Scores | None] = [None] * len(rollouts)
        attempts = [0] * len(rollouts)
        waiting: dict[Any, list[int]] = {}  # rollout ref -> chains (a ref may be passed twice)
        for i, r in enumerate(rollouts):
            if isinstance(r, ray.ObjectRef):
                waiting.setdefault(r, []).append(i)
        ready = deque(i for i, r in enumerate(rollouts) if not isinstance(r, ray.ObjectRef))
        running: dict[Any, tuple[int, list[int]]] = {}  # result ref -> (actor, chains)
        remaining = len(rollouts)
        timings["inputs_ready_s"] = 0.0
        try:
            while remaining:
                self._dispatch(ready, running, rollouts, samples)
                pending = list(running) + list(waiting) + list(self._probes)
                # block for the first (polling for hung actors when there is a deadline), then take all done
                ray.wait(pending, num_returns=1, timeout=1.0 if self._clock.timeout_s else None)
                self._kill_hung()
                finished, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
                for ref in finished:
                    if ref in waiting:
                        ready.extend(waiting.pop(ref))
                        if not waiting:
                            timings["inputs_ready_s"] = time.perf_counter() - start
                    elif ref in self._probes:
                        self._probe_done(ref)
                    else:
                        remaining -= self._task_done(
                            ref, running, results, attempts, ready, rollouts, samples
                        )
        finally:  # after an error, tasks still in flight must not count as load in the next call
            for k, chains in running.values():
                self._clock.returned(k)
                self._actors[k].tasks -= 1
                self._actors[k].chains -= len(chains)
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------ internals
    def _dispatch(
        self, ready: deque, running: dict, rollouts: Sequence[Any], samples: Sequence[Sample]
    ) -> None:
        while ready:
            usable = [k for k, a in enumerate(self._actors) if a.state == "ready"]
            if not usable and not self._probes:
                raise ActorLost(
                    f"all {len(self._actors)} reward actors are dead "
                    f"(each died more than reward.max_restarts = {self.cfg.max_restarts} times)"
                )
            free = [k for k in usable if self._actors[k].tasks < self.max_inflight]
            if not free:
                return
            k = min(free, key=lambda j: self._actors[j].chains)
            size = max(1, min(self.max_batch, math.ceil(len(ready) / len(usable))))
            chains = [ready.popleft() for _ in range(min(size, len(ready)))]
            actor = self._actors[k]
            ref = actor.handle.score.remote([(rollouts[i], samples[i]) for i in chains])
            running[ref] = (k, chains)
            self._clock.started(k)
            actor.tasks += 1
            actor.chains += len(chains)

    def _task_done(self, ref, running, results, attempts, ready: deque, rollouts, samples) -> int:
        """Collect one scoring task; returns how many chains it finished (0 when they were re-queued)."""
        ray = self._ray
        k, chains = running.pop(ref)
        actor = self._actors[k]
        self._clock.returned(k)
        actor.tasks -= 1
        actor.chains -= len(chains)
        try:
            scores = ray.get(ref)
        except ray.exceptions.RayActorError as exc:  # the process died (or is restarting): re-issue
            if actor.state == "ready":
                actor.state = "recovering"
                self._probes[actor.handle.pid.options(max_task_retries=-1).remote()] = k
            for i in chains:
                attempts[i] += 1
                if attempts[i] >= self.max_attempts:
                    raise RuntimeError(
                        f"chain (prompt {samples[i].prompt_id}, sample {_sample_index(rollouts[i])}) "
                        f"lost its reward actor {attempts[i]} times; last error: {type(exc).__name__}: {exc}"
                    ) from exc
            self.reissued += len(chains)
            ready.extendleft(reversed(chains))  # first in line: they have waited longest
            return 0
        except Exception as exc:
            ids = [(samples[i].prompt_id, _sample_index(rollouts[i])) for i in chains]
            if isinstance(exc, RolloutUnavailable):  # the rollout actor that made them is gone for good
                raise ActorLost(f"chains {ids}: {getattr(exc, 'cause', exc)}") from exc
            raise RuntimeError(f"reward actor {k} failed scoring chains {ids}: {exc}") from exc
        for i, s in zip(chains, scores):
            results[i] = s
        return len(chains)

    def _kill_hung(self) -> None:
        """Kill (Ray restarts it) each ready actor that returned nothing for ``cfg.call_timeout_s``: its tasks fail
        as a dead actor's and their chains are re-issued."""
        for k in self._clock.overdue():
            if self._actors[k].state == "ready":
                log.warning("reward actor %d: no scoring call returned within reward.call_timeout_s = %.0f s; "
                            "killing it (Ray restarts it; its chains are re-issued)", k, self._clock.timeout_s)
                self.killed_hung += 1
                self._ray.kill(self._actors[k].handle, no_restart=False)

    def _probe_done(self, ref) -> None:
        actor = self._actors[self._probes.pop(ref)]
        try:
            self._ray.get(ref)
            actor.state = "ready"
        except self._ray.exceptions.RayActorError:  # Ray retried through the restarts and gave up: none left
            actor.state = "dead"


def _sample_index(rollout: Any) -> Any:
    return rollout.sample_index if isinstance(rollout, Rollout) else "?"
