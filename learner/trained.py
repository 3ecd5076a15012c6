"""What one learner rank trains, as the steps see it: the rank's place in the group and the trained models (each
owns its engine, reference, KL weight and losses; a frozen model is None).

The GRPO and SFT steps are functions of this record and the step's data; they change nothing but the models'
engines (backward, optimizer step) and return what they did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from core.grpo import TrainBatch
from core.records import Rollout
from learner import engine as eng
from learner.policy_model import TrainedPolicy
from learner.rank import RankContext
from learner.sr_model import TrainedSR

MODELS = ("policy", "diffusion")


@dataclass(frozen=True)
class TrainedModels:
    ctx: RankContext
    policy: Optional[TrainedPolicy]  # None: the policy is frozen (policy.freeze)
    sr: Optional[TrainedSR]  # None: the SR model is frozen (diffusion.freeze)
    micro_batch_size: int  # learner.micro_batch_size

    def trained(self) -> dict[str, Any]:
        """``{"policy": TrainedPolicy, "diffusion": TrainedSR}``, the frozen ones left out, in MODELS' order."""
        return {name: m for name, m in zip(MODELS, (self.policy, self.sr)) if m is not None}

    def engine(self, model: str) -> Any:
        """The DeepSpeed engine of ``model``; a frozen model is an error saying so."""
        if model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {model!r}")
        trained = self.trained()
        if model not in trained:
            raise ValueError(
                f"the {model} is frozen (config {model}.freeze = true): the learner does not train "
                "or hold it, so it has no weights to gather or sync"
            )
        return trained[model].engine

    @property
    def pad_id(self) -> int:
        return self.policy.pad_id if self.policy is not None else 0

    def step(self, models: Sequence[str]) -> tuple[dict[str, float], int]:
        """One optimizer step of each of ``models``: the finite gradient norms, and how many of the updates were
        skipped for a non-finite one (weights, moments and LR schedule left as they were: ``engine.update_applied``).
        The norm is reduced over ranks, so every rank skips alike."""
        norms, skipped = {}, 0
        for name in models:
            e = self.engine(name)
            e.step()
            norm = eng.grad_norm(e)
            if math.isfinite(norm):  # a skipped update's norm is counted in skipped, not reported
                norms[name] = norm
            skipped += not eng.update_applied(e)
        return norms, skipped

    def learning_rates(self) -> dict[str, float]:
        return {name: eng.current_lr(m.engine) for name, m in self.trained().items()}

    def validate_shard(self, batch: TrainBatch, rollouts: Sequence[Rollout]) -> None:
        """Check the shard on every rank and agree on the outcome before the first collective, so a bad shard
        on one rank is an error on all ranks instead of a hang in the others' all-reduce."""
        error = None
        try:
            if len(rollouts) != len(batch):
                raise ValueError(f"train_step got {len(batch)} batch rows but {len(rollouts)} rollouts "
                                 "(one per row)")
            for key, r in zip(batch.keys, rollouts):
                if key != (int(r.prompt_id), int(r.sample_index)):
                    raise ValueError(f"batch row {key} is paired with rollout {(r.prompt_id, r.sample_index)}")
            if self.policy is not None:
                self.policy.check_contexts(batch, rollouts)
        except ValueError as exc:
            error = exc
        all_ok = self.ctx.all_reduce([0.0 if error else 1.0], "min")[0] > 0
        if error is not None:
            raise error
        if not all_ok:
            raise RuntimeError("train_step: another learner rank rejected its shard (its error says why)")
