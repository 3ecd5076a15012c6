"""The rollout side of the GRPO loop: sampled and scored batches for the learner, synchronous or up to
``trainer.max_staleness`` steps ahead of it.

    pipeline = RolloutPipeline(data, rollouts, rewards, PipelineConfig(B, G, k, total, seed_of), first_step, cursor)
    batch = pipeline.next()          # step s's chains: refs, their scores, the version that sampled them
    ... the learner trains on batch ...
    pipeline.publish(update)         # the new weights (k = 0: loaded now; k >= 1: carried by later rollouts)
    pipeline.step_done()             # lets the producer start step s + k + 1

k = 0 is the synchronous loop, run inline: rollout (each chain handed to the reward pool as it finishes), then
the learner, then the weights are loaded on every rollout actor. With k >= 1 a producer thread of the driver
samples and scores step j as soon as step j - k has started training, with the newest weights published so far
(the rollout actors load them before sampling, in call order). A chain is therefore produced by a policy at
most k learner updates older than the one that trains on it: older chains are never produced (the one exception,
a rollout actor restarted under the collective sync before it rejoins the group, is dropped by the learner and
counted as ``learner/dropped_stale_chains``). The gate counts finished steps, not versions, so a step whose groups were all filtered (no update)
cannot stall the producer.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from core.config import ExperimentConfig
from core.faults import ActorLost
from core.records import Sample, Scores, WeightUpdate

log = logging.getLogger("rl.pipeline")


@dataclass(frozen=True)
class PipelineConfig:
    """The schedule of a ``RolloutPipeline``: B prompts x G chains a step, up to ``max_staleness`` steps ahead of the
    learner (0: synchronous), steps until ``total_steps``, step s sampled with seed ``seed_of(s)``."""

    prompts_per_step: int  # B
    group_size: int  # G
    max_staleness: int  # k
    total_steps: int
    seed_of: Callable[[int], int]
    wait_timeout_s: float = 0.0  # k >= 1: the longest the learner waits for the producer's next batch (0: forever)

    def __post_init__(self) -> None:
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, seed_of: Callable[[int], int]) -> PipelineConfig:
        """``grpo.prompts_per_step`` x ``grpo.group_size``, ``trainer.max_staleness``, ``trainer.total_steps``; the
        producer's deadline: twice a rollout and a scoring call's (``*.call_timeout_s``: each hung call is killed and
        run once more), none while either has none."""
        rollout, reward = cfg.rollout.call_timeout_s, cfg.reward.call_timeout_s
        wait = 2.0 * (rollout + reward) if rollout > 0 and reward > 0 else 0.0
        return cls(cfg.grpo.prompts_per_step, cfg.grpo.group_size, cfg.trainer.max_staleness, cfg.trainer.total_steps,
                   seed_of, wait)


@dataclass
class ScoredBatch:
    """One step's chains, ready for the advantages and the learner."""

    step: int  # 0-based step index the batch is for
    cursor: int  # data cursor of its first sample
    samples: list[Sample]  # B prompts
    chains: list[Any]  # B*G ObjectRefs of Rollout, [p0s0 .. p0s(G-1), p1s0 ..]
    scores: list[Scores]  # B*G, same order
    version: int  # the newest weight version published when the batch was submitted
    seconds: dict[str, float] = field(default_factory=dict)  # rollout (until its last chain), reward (the tail)


class RolloutPipeline:
    """Sampled and scored batches in step order, from ``first_step`` to ``total_steps`` - 1."""

    def __init__(self, data: Any, rollouts: Any, rewards: Any, config: PipelineConfig, first_step: int = 0,
                 cursor: int = 0, version: int = 0):
        """``data``: a PairDataset; ``rollouts``: the RolloutGroup; ``rewards``: the RewardPool; ``config``: the
        schedule; ``first_step``, ``cursor``: where it starts (a resumed run: its checkpoint's); ``version``: the
        weights the rollout actors hold now."""
        self.data, self.rollouts, self.rewards = data, rollouts, rewards
        self.B, self.G, self.seed_of = config.prompts_per_step, config.group_size, config.seed_of
        self.k, self.total_steps = config.max_staleness, config.total_steps
        self.wait_timeout_s = config.wait_timeout_s
        self.version = version  # newest published
        self._next_step, self._next_cursor = first_step, cursor  # the producer's position
        self._finished = first_step  # steps the learner has finished
        self._cond = threading.Condition()
        self._queue: queue.Queue = queue.Queue()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        if self.k > 0:
            self._thread = threading.Thread(target=self._produce, name="rollout-pipeline", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------------------------------ learner side
    def next(self) -> ScoredBatch:
        """The next step's batch (k = 0: sampled and scored now; k >= 1: waits for the producer)."""
        if self._thread is None:
            batch = self._make(self._next_step, self._next_cursor)
            self._next_step += 1
            self._next_cursor += self.B
            return batch
        try:
            item = self._queue.get(timeout=self.wait_timeout_s or None)
        except queue.Empty:  # a call the actors' own deadlines did not end: heal as a lost actor
            raise ActorLost(f"the rollout producer delivered no batch for step {self._finished + 1} in "
                            f"{self.wait_timeout_s:g} s (twice rollout.call_timeout_s + reward.call_timeout_s)"
                            ) from None
        if isinstance(item, BaseException):
            raise item
        return item

    def publish(self, update: WeightUpdate) -> None:
        """New weights from the learner. k = 0: every rollout actor loads them now (blocking). k >= 1: the next
        batches the producer submits carry them."""
        with self._cond:
            if self._thread is None:
                self.rollouts.load_weights(update)
            else:
                self.rollouts.offer(update)
            self.version = update.version

    def step_done(self) -> None:
        """The learner finished a step (trained or skipped): the producer may run one step further ahead."""
        with self._cond:
            self._finished += 1
            self._cond.notify_all()

    def close(self) -> None:
        """Stop the producer (a batch in flight finishes first; nothing more is submitted)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=600)

    # ------------------------------------------------------------------------------------------ producer
    def _produce(self) -> None:
        try:
            while True:
                with self._cond:
                    # step j may start once step j - k has started training (finished >= j - k)
                    while not self._stop and self._finished < self._next_step - self.k:
                        self._cond.wait()
                    if self._stop or self._next_step >= self.total_steps:
                        return
                    step, cursor = self._next_step, self._next_cursor
                    self._next_step += 1
                    self._next_cursor += self.B
                self._queue.put(self._make(step, cursor))
        except BaseException as exc:  # handed to the learner side, which raises it from next()
            log.error("rollout pipeline failed at step %d: %s: %s", self._next_step, type(exc).__name__, exc)
            self._queue.put(exc)

    def _make(self, step: int, cursor: int) -> ScoredBatch:
        start = time.perf_counter()
        samples = self.data.batch(cursor, self.B)
        with self._cond:  # the weights this batch is sampled with, published before it was submitted
            version = self.version
            chains, views = self.rollouts.submit_generate(samples, self.G, seed=self.seed_of(step))
        submitted = time.perf_counter() - start  # ~0 with Ray (refs); the whole rollout in one process
        timings: dict[str, float] = {}
        scores = self.rewards.score(views, [s for s in samples for _ in range(self.G)], timings)
        total = time.perf_counter() - start
        rollout = submitted + timings["inputs_ready_s"]
        return ScoredBatch(step, cursor, samples, chains, scores, version,
                           {"rollout": rollout, "reward": max(total - rollout, 0.0)})
