"""The GRPO update of one learner rank, on its shard of the step's chains.

    text (grpo.engine_correction: tis) and stale chains: ratio against the first epoch's own log-probs (proximal),
    TIS weights of proximal over the rollout's
    for each update epoch:                                  (old log-probs stay the rollout's / the proximal)
        for each micro-batch of learner.micro_batch_size chains:
            policy:    re-score prompt + completion with the context images -> clipped surrogate, text tokens
                       (+ beta * k3 KL to the frozen reference)       / global text-token count -> backward
                       (learner.policy_model.TrainedPolicy.grpo_micro_step)
            diffusion: the objective of grpo.image_objective (learner.image_objectives: trajectory or nft), one
                       backward per trained denoising step of each stage (diffusion.train_steps_fraction / _start)
        step both engines (one optimizer step per epoch)

Dividing by the *global* counts (all micro-batches on all ranks) makes the accumulated gradient exactly the
token-mean of the whole batch however it is split (``core.grpo.token_mean``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from core.config import GRPOConfig
from core.grpo import TrainBatch
from core.records import Rollout
from learner import off_policy
from learner.batching import MEAN_METRICS, micro_batches, reduce_sums
from learner.rank import RankContext
from learner.trained import TrainedModels


@dataclass(frozen=True)
class StepCounts:
    """What a step's metrics are averaged over: text tokens and trained denoising steps on all ranks, and this
    rank's chains (summed over ranks in the metrics)."""

    tokens: float  # text tokens of the step (all ranks)
    steps: float  # trained denoising steps of the step (all ranks)
    chains: int  # this rank's chains
    epochs: int  # grpo.update_epochs
    optimizer_steps: int  # the learner's optimizer steps after the update


def train_step(models: TrainedModels, grpo: GRPOConfig, batch: TrainBatch, rollouts: Sequence[Rollout],
               optimizer_steps: int, version: Optional[int] = None, max_staleness: Optional[int] = None
               ) -> dict[str, float]:
    """GRPO update on this rank's shard: ``batch`` row i pairs with ``rollouts[i]``. Returns metrics aggregated
    over all ranks (identical on every rank), ``optimizer_steps`` the learner's count after it (it was
    ``optimizer_steps`` before). ``version``: the learner's policy version before this update; chains sampled by
    an older one are corrected (``learner.off_policy``), and those more than ``max_staleness`` versions old are not
    trained on (counted as ``dropped_stale_chains``)."""
    t0 = time.perf_counter()
    ctx, policy, sr = models.ctx, models.policy, models.sr
    models.validate_shard(batch, rollouts)
    batch, dropped = off_policy.drop_too_stale(batch, rollouts, version, max_staleness, list(models.trained()))
    dropped_total, = ctx.all_reduce([dropped])
    micro = micro_batches(batch, rollouts, models.micro_batch_size, ctx.all_reduce)
    passes = sr.passes(micro) if sr is not None else [0] * len(micro)
    local_tokens = sum(m.batch.num_tokens for m in micro)
    local_steps = sum(m.batch.num_steps for m, n in zip(micro, passes) if n)
    global_tokens, global_steps = ctx.all_reduce([local_tokens, local_steps])
    train_text = policy is not None and global_tokens > 0
    train_image = sr is not None and global_steps > 0
    fixes, off_policy_metrics = off_policy.corrections(ctx, grpo, micro, version, train_text, train_image)

    objective = sr.objective_for_update(optimizer_steps) if sr is not None else None
    sums: dict[str, float] = {}
    extremes = {f"{kind}_ratio_{end}": (-math.inf if end == "max" else math.inf)
                for kind in ("text", "image") for end in ("max", "min")}
    lrs = models.learning_rates()
    norms: dict[str, list[float]] = {name: [] for name in models.trained()}
    stepped = [name for name, on in (("policy", train_text), ("diffusion", train_image)) if on]
    first_epoch = [0.0, 0.0]  # the first epoch's token-weighted ratio sums: the on-policy check
    skipped = 0  # model updates skipped for a non-finite gradient (learner/skipped_updates)
    for epoch in range(grpo.update_epochs):
        for i, (m, n, fix) in enumerate(zip(micro, passes, fixes)):
            if train_text:
                policy.grpo_micro_step(m, fix, global_tokens, sums, extremes)
            if train_image and n:
                objective.micro_step(m, i, fix, global_steps, sums, extremes)
        epoch_norms, epoch_skipped = models.step(stepped)
        for name, norm in epoch_norms.items():
            norms[name].append(norm)
        skipped += epoch_skipped
        optimizer_steps += int(bool(stepped) and epoch_skipped < len(stepped))
        if epoch == 0:
            first_epoch = [sums.get("text_ratio_mean", 0.0), sums.get("image_ratio_mean", 0.0)]
    ratio = objective is not None and objective.ratio
    off_policy_metrics.update(_on_policy_check(ctx, first_epoch, global_tokens if train_text else 0.0,
                                               global_steps if train_image and ratio else 0.0))
    off_policy_metrics.update(off_policy.tis_metrics(ctx, fixes))
    counts = StepCounts(global_tokens, global_steps, len(batch), grpo.update_epochs, optimizer_steps)
    per_step = objective.per_step_metrics if objective is not None else ()
    metrics = _metrics(ctx, sums, extremes, norms, lrs, counts, t0, per_step)
    return {**metrics, **off_policy_metrics, "dropped_stale_chains": dropped_total, "skipped_updates": skipped}


def _on_policy_check(ctx: RankContext, sums: Sequence[float], tokens: float, steps: float) -> dict[str, float]:
    """``{text,image}_first_epoch_ratio_mean``: the ratio before any update of this step, 1 up to the rollout's and
    the learner's numerics (stale chains are taken against the proximal policy, so also 1); a drift means the
    learner does not re-score what the rollout sampled (Flow-GRPO's ratio == 1 check). A collective."""
    text, image = ctx.all_reduce(list(sums))
    return {f"{kind}_first_epoch_ratio_mean": total / count
            for kind, total, count in (("text", text, tokens), ("image", image, steps)) if count > 0}


def _metrics(ctx: RankContext, sums: dict[str, float], extremes: dict[str, float], norms: dict[str, list[float]],
             lrs: dict[str, float], counts: StepCounts, t0: float, per_step: Sequence[str]) -> dict[str, float]:
    """Sum the per-rank partial sums over ranks and turn them into batch means."""
    global_tokens, global_steps, epochs = counts.tokens, counts.steps, counts.epochs
    totals = reduce_sums(sums, ctx.all_reduce)
    maxima = ctx.all_reduce([extremes[k] if "max" in k else -extremes[k] for k in sorted(extremes)], "max")
    m: dict[str, float] = {
        "tokens": global_tokens,
        "diffusion_steps": global_steps,
        "chains": ctx.all_reduce([counts.chains])[0],
        "optimizer_steps": counts.optimizer_steps,
    }
    for k in ("text_loss", "image_loss", "kl", "image_kl"):
        if k in totals:
            m[k] = totals[k] / epochs
    for k in per_step:  # the image objective's own metrics, per trained image step
        if k in totals:
            m[k] = totals[k] / (global_steps * epochs)
    for kind, count in (("text", global_tokens), ("image", global_steps)):
        for name in MEAN_METRICS:
            if f"{kind}_{name}" in totals:
                m[f"{kind}_{name}"] = totals[f"{kind}_{name}"] / (count * epochs)
    for k, v in zip(sorted(extremes), maxima):
        if math.isfinite(v):
            m[k] = v if "max" in k else -v
    for name, values in norms.items():
        if values:
            m[f"{name}_grad_norm"] = sum(values) / len(values)
        m[f"{name}_lr"] = lrs[name]
    m["seconds"] = time.perf_counter() - t0
    return m
