"""The single-controller GRPO loop (design.md): data -> rollout -> reward -> advantages -> learner -> sync.

``GRPOTrainer.step`` reads like the data-flow diagram: one line and one timer per phase. The driver holds
ObjectRefs of the chains, never their pixels or tokens (except the one chain of an image panel); rewards and
learner ranks fetch the chains they need from Ray's object store.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import ray
import torch

from actors.group import RolloutGroup, role_placement_group
from learner.group import LearnerGroup
from rewards.pool import RewardPool
from rl import grpo, run_state
from rl.chain import TEXT_TAGS
from rl.config import ExperimentConfig
from rl.data.dataset import PairDataset
from rl.models.policy import ChainTokens
from rl.monitor import RunMonitor
from rl.records import Rollout, Sample, Scores
from rl.run_state import PhaseTimer
from rl.sft_data import target_records

log = logging.getLogger("rl.trainer")


def reward_metrics(scores: list[Scores], group_size: int) -> dict[str, float]:
    """``reward/<part>/mean`` and ``reward/<part>/group_std`` (mean within-group std) for every scored part."""
    out: dict[str, float] = {}
    parts = sorted({k for s in scores for k in s.parts} | {"total"})
    for part in parts:
        values = np.array([s.total if part == "total" else s.parts.get(part, np.nan) for s in scores], dtype=float)
        if np.all(np.isnan(values)):
            continue
        out[f"reward/{part}/mean"] = float(np.nanmean(values))
        groups = values.reshape(-1, group_size)
        with np.errstate(invalid="ignore"):
            out[f"reward/{part}/group_std"] = float(np.nanmean(np.nanstd(groups, axis=1)))
    out["reward/metric_failures"] = float(sum(len(s.errors) for s in scores))
    return out


class GRPOTrainer:
    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.data = PairDataset(cfg.data, "train")
        self.rollouts = RolloutGroup(cfg)
        rw = cfg.reward
        self.reward_pg = role_placement_group(rw.num_actors, rw.num_cpus, rw.num_gpus, cfg.ray.placement_strategy,
                                              f"{cfg.name}-reward")
        self.rewards = RewardPool(rw, placement_group=self.reward_pg)
        self.learner = LearnerGroup(cfg, logprob_temperature=cfg.rollout.sampling.temperature)
        # grpo.sft_coef: the step's target chains are tokenized here, as the cold start's driver does
        self.tokens = ChainTokens.from_pretrained(cfg.policy.path) if cfg.grpo.sft_coef > 0 else None
        self.ckpt_root = Path(cfg.trainer.checkpoint_dir)
        self.step_id = 0
        self.cursor = 0
        self.version = 0
        if cfg.trainer.resume:
            self._resume()
        self.monitor = RunMonitor(cfg.trainer.log_dir, cfg.trainer.total_steps, self.step_id,
                                  cfg.trainer.progress_bar)

    # ------------------------------------------------------------------------------------------ loop
    def fit(self) -> None:
        run_state.run_steps(self, {"reward": "reward/total/mean", "s/step": "timing/step"})

    def step(self) -> dict[str, float]:
        cfg, t = self.cfg, PhaseTimer()
        B, G = cfg.grpo.prompts_per_step, cfg.grpo.group_size
        with t("step"):
            with t("rollout"):
                samples = self.data.batch(self.cursor, B)
                refs = self.rollouts.submit_generate(samples, G, seed=cfg.trainer.seed * 1_000_003 + self.step_id)
                ray.wait(refs, num_returns=len(refs), fetch_local=False)
            with t("reward"):
                chain_samples = [s for s in samples for _ in range(G)]
                scores = self.rewards.score(refs, chain_samples)
            adv = self._advantages(scores)
            advantages, groups = adv.text, adv.groups
            image_advantages, section_advantages = adv.image, adv.sections
            keep = groups.keep if cfg.grpo.filter_zero_variance else torch.ones_like(groups.keep)
            learner_metrics: dict[str, float] = {}
            sync_metrics: dict[str, float] = {}
            if bool(keep.any()):
                with t("learner"):
                    targets = target_records(samples, self.tokens, cfg) if self.tokens is not None else []
                    learner_metrics = self.learner.train(
                        refs, advantages.tolist(), keep.tolist(),
                        None if image_advantages is None else image_advantages.tolist(),
                        None if section_advantages is None else section_advantages.tolist(), targets)
                with t("sync"):
                    update, sync_metrics = self.learner.publish_weights(self.version + 1)
                    self.rollouts.load_weights(update)
                    self.version = update.version
            self.cursor += B
            self.step_id += 1
        metrics = {
            **reward_metrics(scores, G),
            **{f"learner/{k}": v for k, v in learner_metrics.items()},
            **sync_metrics,
            **{f"timing/{k}": v for k, v in t.seconds.items()},
            "grpo/advantage_mean": float(advantages.mean()),
            "grpo/advantage_std": float(advantages.std()),
            "grpo/advantage_abs_max": float(advantages.abs().max()),
            **({} if image_advantages is None else
               {"grpo/image_advantage_std": float(image_advantages.std()),
                "grpo/image_advantage_abs_max": float(image_advantages.abs().max())}),
            **({} if section_advantages is None else
               {f"grpo/{tag}_advantage_std": float(section_advantages[:, i].std())
                for i, tag in enumerate(TEXT_TAGS)}),
            "grpo/filtered_groups": float(groups.num_filtered),
            "grpo/kept_chains": float(keep.sum()),
            "policy/version": float(self.version),
            "throughput/samples_per_s": B * G / t.seconds["step"],
            "reward/reissued_chains": float(self.rewards.reissued),
            "data/skipped_files": float(sum(self.data.stats.values())),
        }
        self.monitor.scalars(self.step_id, metrics)
        if cfg.trainer.image_every and self.step_id % cfg.trainer.image_every == 0:
            self._log_example(refs[0], samples[0], scores[0])
        self.monitor.flush()
        return metrics

    def _advantages(self, scores: list[Scores]) -> grpo.ChainAdvantages:
        g = self.cfg.grpo
        return grpo.chain_advantages(
            [s.parts for s in scores], [s.total for s in scores], vars(self.cfg.reward.weights), g.group_size,
            text_rewards=g.text_rewards, image_rewards=g.image_rewards, section_rewards=g.section_rewards,
            section_tags=TEXT_TAGS, train_images=not self.cfg.diffusion.freeze, scale_by_std=g.scale_by_std,
            eps=g.eps, negative_scale=g.negative_advantage_scale,
            shuffle=(torch.Generator().manual_seed(self.cfg.trainer.seed * 1_000_003 + self.step_id)
                     if g.shuffle_advantages else None))

    def _log_example(self, ref, sample: Sample, score: Scores) -> None:
        rollout: Rollout = ray.get(ref)
        self.monitor.panel(self.step_id, "chain/images", {"lr": sample.lr, **rollout.images, "hr": sample.hr})
        parts = ", ".join(f"{k}={v:.3f}" for k, v in sorted(score.parts.items()))
        self.monitor.text(self.step_id, "chain/text", f"{rollout.text}\n\nreward {score.total:.3f}: {parts}")

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """DeepSpeed state (all ranks) + HF/diffusers export + trainer state, committed atomically."""
        return run_state.save_checkpoint(self.learner, self.ckpt_root, self.step_id, self.cursor,
                                         self.cfg.trainer.keep_checkpoints, {"policy_version": self.version})

    def _resume(self) -> None:
        state = run_state.resume(self)
        if state is None:
            return
        self.version = int(state.extra.get("policy_version", state.step))
        update, _ = self.learner.publish_weights(self.version)  # the rollout actors sample the resumed policy
        self.rollouts.load_weights(update)
