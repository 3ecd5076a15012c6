"""The periodic held-out evaluation of a GRPO run (``trainer.eval_every``): the current policy on held-out
prompts, through the run's own rollout and reward actors, logged under ``eval/``.

Every evaluation samples the same prompts (the first ``trainer.eval_images`` of the held-out split, each
``grpo.group_size`` times at the training temperature) with the same seeds, so two evaluations differ only by
the policy. For the paper's full metric table of a checkpoint, with the bicubic baseline, use ``rl.eval``.
"""

from __future__ import annotations

import time

from core.config import ExperimentConfig
from data.dataset import PairDataset
from rl.monitor import reward_metrics

EVAL_SEED = 2**30  # offset from the training steps' seeds (trainer.seed * 1_000_003 + step)


class HeldOutEval:
    def __init__(self, cfg: ExperimentConfig):
        self.samples = PairDataset(cfg.data, "eval").batch(0, cfg.trainer.eval_images)
        self.group_size = cfg.grpo.group_size
        self.seed = cfg.trainer.seed * 1_000_003 + EVAL_SEED

    def run(self, rollouts, rewards) -> dict[str, float]:
        """``eval/reward/<part>/mean`` and ``/group_std`` (the quality metrics among them, ``quality/<metric>``),
        ``eval/chains`` and ``timing/eval``. ``rollouts``: the run's RolloutGroup; ``rewards``: its RewardPool."""
        start = time.perf_counter()
        _, views = rollouts.submit_generate(self.samples, self.group_size, seed=self.seed)
        scores = rewards.score(views, [s for s in self.samples for _ in range(self.group_size)])
        out = {f"eval/{k}": v for k, v in reward_metrics(scores, self.group_size).items()}
        out["eval/chains"] = float(len(scores))
        out["timing/eval"] = time.perf_counter() - start
        return out
