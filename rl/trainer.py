"""The single-controller GRPO loop: data -> rollout -> reward -> advantages -> learner -> sync.

``GRPOTrainer.step`` reads like the data-flow diagram: one line and one timer per phase. The rollout and the
rewards are ``rl.pipeline.RolloutPipeline``'s: inline (trainer.max_staleness = 0, synchronous) or in a producer
thread up to k steps ahead of the learner (asynchronous). The roles come from a transport (``rl.transport``): Ray
actor groups (``rl.launch``; the driver holds ObjectRefs of the chains, never their pixels or tokens, except the one
chain of an image panel, and rewards and learner ranks fetch what they need from Ray's object store) or the same
plain classes in this process (``rl.one_process``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from typing import Any, Optional

import torch

from core import checkpoint as ckpt
from core.config import ExperimentConfig, to_yaml
from core.records import Rollout, Sample, Scores
from data.dataset import PairDataset
from rl import run_state
from rl.advantages import advantage_metrics, step_advantages
from rl.held_out import HeldOutEval
from rl.monitor import RunMonitor, reward_metrics
from rl.pipeline import PipelineConfig, RolloutPipeline
from rl.run_state import PhaseTimer
from rl.transport import RayTransport, Transport

log = logging.getLogger("rl.trainer")


class GRPOTrainer:
    def __init__(self, cfg: ExperimentConfig, transport: Optional[Transport] = None):
        self.cfg = cfg
        self.transport = transport or RayTransport()
        self.transport.check(cfg)
        self.ckpt_root = Path(cfg.trainer.checkpoint_dir)
        resume_from = run_state.resume_point(cfg, self.ckpt_root)  # trainer.resume=true without one fails here
        self.data = PairDataset(cfg.data, "train")
        self.retired = {"reissued": 0, "killed_hung": 0}  # the counts of reward pools a recovery replaced
        self.held_out = HeldOutEval(cfg) if cfg.trainer.eval_every else None
        self.staleness: dict[int, int] = {}  # trained step -> learner version - the version its chains came from
        self.faults: list[run_state.Fault] = []
        self.fresh_rng = ckpt.capture_rng_state()  # a recovery without a checkpoint starts over from here
        self.start_groups(resume=resume_from is not None)
        self.monitor = RunMonitor(cfg.trainer.log_dir, cfg.trainer.total_steps, self.step_id,
                                  cfg.trainer.progress_bar)

    def start_groups(self, resume: bool) -> None:
        """Every role (the reward pool, the rollout and learner groups, their weight sync) and the pipeline, at step 0
        or at the latest complete checkpoint (``resume``)."""
        cfg = self.cfg
        self.rewards = self.transport.reward_pool(cfg)
        self.rollouts = self.transport.rollout_group(cfg)
        self.learner = self.transport.learner_group(cfg, logprob_temperature=cfg.rollout.sampling.temperature)
        self.weights = self.transport.weight_sync(cfg, self.learner, self.rollouts)  # learner.sync_backend
        self.step_id = self.cursor = self.version = 0
        if resume:
            self._resume()
        self.pipeline = RolloutPipeline(self.data, self.rollouts, self.rewards,
                                        PipelineConfig.from_config(cfg, self._seed_of), self.step_id, self.cursor,
                                        self.version)

    def roles(self) -> list[Any]:
        """The live role groups (what ``run_state.run_steps`` asks whether an actor was lost)."""
        return [self.rollouts, self.rewards, self.learner]

    def recover(self) -> None:
        """After a lost actor group (``run_state.run_steps``' healing): tear every role down and start them again
        from the latest complete checkpoint, or from the start with the driver's first RNG state, so that the redone
        steps are the steps the run would have made."""
        self.retired["reissued"] += self.rewards.reissued
        self.retired["killed_hung"] += self.rewards.killed_hung + self.rollouts.killed_hung
        run_state.restart(self, (self.rollouts.shutdown, self.rewards.shutdown, self.pipeline.close,
                                 self.weights.close, self.learner.shutdown))
        self.staleness = {s: v for s, v in self.staleness.items() if s <= self.step_id}

    # ------------------------------------------------------------------------------------------ loop
    def fit(self) -> None:
        try:
            if self.held_out is not None and self.step_id == 0:  # where the eval/ curves start: the run's start
                self.monitor.scalars(0, self._evaluate())
            run_state.run_steps(self, {"reward": "reward/total/mean", "s/step": "timing/step"})
        finally:
            self.pipeline.close()
            self.rollouts.close()

    def step(self) -> dict[str, float]:
        cfg, t = self.cfg, PhaseTimer()
        G = cfg.grpo.group_size
        with t("step"):
            with t("wait"):  # synchronous: the rollout and its rewards; asynchronous: what is not hidden
                batch = self.pipeline.next()
            samples, refs, scores = batch.samples, batch.chains, batch.scores
            assert batch.step == self.step_id, (batch.step, self.step_id)
            adv = step_advantages(cfg, scores, self._seed())
            keep = adv.groups.keep if cfg.grpo.filter_zero_variance else torch.ones_like(adv.groups.keep)
            if adv.scored is not None:  # a chain whose reward could not be computed is never trained on
                keep = keep & adv.scored
            learner_metrics: dict[str, float] = {}
            sync_metrics: dict[str, float] = {}
            staleness = self.version - batch.version
            if bool(keep.any()):
                with t("learner"):
                    learner_metrics = self.learner.train(refs, adv.per_chain(), keep.tolist(),
                                                         version=self.version,
                                                         max_staleness=cfg.trainer.max_staleness)
                self.staleness[self.step_id + 1] = staleness
                with t("sync"):
                    update, sync_metrics = self.weights.publish(self.version + 1)
                    self.pipeline.publish(update)
                    self.version = update.version
            self.pipeline.step_done()
            self.cursor = batch.cursor + len(samples)
            self.step_id += 1
        metrics = {
            **reward_metrics(scores, G),
            **advantage_metrics(adv, keep),
            **{f"learner/{k}": v for k, v in learner_metrics.items()},
            **sync_metrics,
            **{f"timing/{k}": v for k, v in {**batch.seconds, **t.seconds}.items()},
            **self._staleness_metrics(staleness),
            "policy/version": float(self.version),
            "throughput/samples_per_s": len(scores) / t.seconds["step"],
            "reward/reissued_chains": float(self.retired["reissued"] + self.rewards.reissued),
            "faults/hung_actors_killed": float(self.rollouts.killed_hung + self.rewards.killed_hung
                                               + self.retired["killed_hung"]),
            "data/skipped_files": float(sum(self.data.stats.values())),
        }
        if self.held_out is not None and self.step_id % cfg.trainer.eval_every == 0:
            metrics.update(self._evaluate())
        self.monitor.scalars(self.step_id, metrics)
        if cfg.trainer.image_every and self.step_id % cfg.trainer.image_every == 0:
            self._log_example(refs[0], samples[0], scores[0])
        self.monitor.flush()
        return metrics

    def _evaluate(self) -> dict[str, float]:
        return self.held_out.run(self.rollouts, self.rewards, self.transport.fetch)

    def _seed_of(self, step: int) -> int:
        """Step ``step``'s seed: its chains' sampling and its advantage transforms (reproducible, resumable)."""
        return run_state.step_seed(self.cfg.trainer.seed, step)

    def _seed(self) -> int:
        return self._seed_of(self.step_id)

    def _staleness_metrics(self, staleness: int) -> dict[str, float]:
        """``async/*``: how many learner updates old this step's chains were, and over the run so far."""
        seen = sorted(self.staleness.values()) or [0]
        return {"async/staleness": float(staleness), "async/staleness_p50": float(seen[len(seen) // 2]),
                "async/staleness_max": float(seen[-1])}

    def _log_example(self, ref, sample: Sample, score: Scores) -> None:
        rollout: Rollout = self.transport.fetch(ref)
        self.monitor.panel(self.step_id, "chain/images", {"lr": sample.lr, **rollout.images, "hr": sample.hr})
        parts = ", ".join(f"{k}={v:.3f}" for k, v in sorted(score.parts.items()))
        self.monitor.text(self.step_id, "chain/text", f"{rollout.text}\n\nreward {score.total:.3f}: {parts}")

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """DeepSpeed state (all ranks) + HF/diffusers export + trainer state, committed atomically."""
        return run_state.save_checkpoint(self.learner, self.ckpt_root, self.step_id, self.cursor,
                                         self.cfg.trainer.keep_checkpoints, to_yaml(self.cfg),
                                         {"policy_version": self.version})

    def _resume(self) -> None:
        state = run_state.resume(self)
        if state is None:
            return
        self.version = int(state.extra.get("policy_version", state.step))
        update, _ = self.weights.publish(self.version)  # the rollout actors sample the resumed policy
        self.rollouts.load_weights(update)
