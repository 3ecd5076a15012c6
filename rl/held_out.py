"""The periodic held-out evaluation of a GRPO run (``trainer.eval_every``): the current policy on held-out
prompts, through the run's own rollout and reward actors, logged under ``eval/`` at step 0 (the starting point)
and every ``eval_every`` steps.

Every evaluation samples the same prompts (the first ``trainer.eval_images`` of the held-out split, each
``grpo.group_size`` times at the training temperature) with the same seeds, so two evaluations differ only by
the policy. For the paper's full metric table of a checkpoint, with the bicubic baseline, use ``tools.eval``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from core.config import ExperimentConfig
from core.records import Rollout, Scores
from data.dataset import PairDataset
from rl.monitor import reward_metrics
from rl.run_state import step_seed

EVAL_SEED = 2**30  # the held-out chains' step in rl.run_state.step_seed: far past any training step


class HeldOutEval:
    def __init__(self, cfg: ExperimentConfig):
        self.samples = PairDataset(cfg.data, "eval").batch(0, cfg.trainer.eval_images)
        self.group_size = cfg.grpo.group_size
        self.seed = step_seed(cfg.trainer.seed, EVAL_SEED)
        panel = cfg.trainer.eval_panel
        self.panel = None
        if panel.metrics or panel.full_reference:
            from rewards.quality import build_panel_scorer

            self.panel = build_panel_scorer(panel)

    def run(self, rollouts, rewards, fetch: Callable[[Any], Any]) -> dict[str, float]:
        """``eval/reward/<part>/mean`` and ``/group_std`` (the quality metrics among them, ``quality/<metric>``),
        ``eval/panel/*``, ``eval/chains`` and ``timing/eval``. ``rollouts``, ``rewards``: the run's rollout group
        and reward pool; ``fetch``: its transport's (chain handles -> Rollouts)."""
        start = time.perf_counter()
        _, views = rollouts.submit_generate(self.samples, self.group_size, seed=self.seed, explore=False)
        scores = rewards.score(views, [s for s in self.samples for _ in range(self.group_size)])
        return {**self.metrics(fetch(list(views)), scores), "timing/eval": time.perf_counter() - start}

    def metrics(self, chains: Sequence[Rollout], scores: Sequence[Scores]) -> dict[str, float]:
        """The ``eval/`` metrics of the held-out chains (their scoring views will do) and their scores, both in
        the order of ``samples`` x ``group_size``."""
        out = {f"eval/{k}": v for k, v in reward_metrics(list(scores), self.group_size).items()}
        out["eval/chains"] = float(len(scores))
        if self.panel is not None:
            out.update(self._panel(chains))
        return out

    def _panel(self, chains: Sequence[Rollout]) -> dict[str, float]:
        """``eval/panel/<metric>``: the mean raw score of the final images (HR-referenced metrics against HR), and
        ``eval/panel/<metric>_failed``, the chains it could not score (a missing final image, a metric error)."""
        from rewards.eval_metrics import panel_scores

        finals = [v.images.get("final") for v in chains]
        hrs = [s.hr for s in self.samples for _ in range(self.group_size)]
        out = {}
        for name, values in panel_scores(self.panel, finals, hrs).items():
            out[f"eval/panel/{name}"] = float(np.mean(values)) if values else float("nan")
            out[f"eval/panel/{name}_failed"] = float(len(finals) - len(values))
        return out
