"""The GRPO update of one learner rank, on its shard of the step's chains.

    text (grpo.engine_correction: tis) and stale chains: ratio against the first epoch's own log-probs (proximal),
    TIS weights of proximal over the rollout's
    for each update epoch:                                  (old log-probs stay the rollout's / the proximal)
        for each micro-batch of learner.micro_batch_size chains:
            policy:    re-score prompt + completion with the context images -> clipped surrogate, text tokens
                       (+ beta * k3 KL to the frozen reference)       / global text-token count -> backward
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

import torch

from core.grpo import TrainBatch, clipped_surrogate, k3_kl, token_mean
from core.records import Rollout
from learner import engine as eng
from learner import image_objectives, off_policy
from learner.batching import MEAN_METRICS, MicroBatch, accumulate, add, micro_batches, reduce_sums
from learner.off_policy import Correction
from learner.rank import Rank
from learner.scoring import policy_log_probs, stage_columns


@dataclass(frozen=True)
class StepCounts:
    """What a step's metrics are averaged over: text tokens and trained denoising steps on all ranks, and this
    rank's chains (summed over ranks in the metrics)."""

    tokens: float  # text tokens of the step (all ranks)
    steps: float  # trained denoising steps of the step (all ranks)
    chains: int  # this rank's chains


def train_step(w: Rank, batch: TrainBatch, rollouts: Sequence[Rollout], version: Optional[int] = None,
               max_staleness: Optional[int] = None) -> dict[str, float]:
    """GRPO update on this rank's shard: ``batch`` row i pairs with ``rollouts[i]``. Returns metrics aggregated
    over all ranks (identical on every rank). ``version``: the learner's policy version before this update; chains
    sampled by an older one are corrected (``learner.off_policy``), and those more than ``max_staleness`` versions
    old are not trained on (counted as ``dropped_stale_chains``)."""
    t0 = time.perf_counter()
    w.validate_shard(batch, rollouts)
    models = [name for name in ("policy", "diffusion") if name in w.engines]
    batch, dropped = off_policy.drop_too_stale(batch, rollouts, version, max_staleness, models)
    dropped_total, = w.all_reduce([dropped])
    micro = micro_batches(batch, rollouts, w.cfg.micro_batch_size, w.all_reduce)
    passes = _image_passes(w, micro)
    local_tokens = sum(m.batch.num_tokens for m in micro)
    local_steps = sum(m.batch.num_steps for m, n in zip(micro, passes) if n)
    global_tokens, global_steps = w.all_reduce([local_tokens, local_steps])
    train_text = "policy" in w.engines and global_tokens > 0
    train_image = "diffusion" in w.engines and global_steps > 0
    fixes, off_policy_metrics = off_policy.corrections(w, micro, version, train_text, train_image)

    objective = image_objectives.for_update(w)
    sums: dict[str, float] = {}
    extremes = {f"{kind}_ratio_{end}": (-math.inf if end == "max" else math.inf)
                for kind in ("text", "image") for end in ("max", "min")}
    lrs = {name: eng.current_lr(e) for name, e in w.engines.items()}
    norms: dict[str, list[float]] = {name: [] for name in w.engines}
    first_epoch = [0.0, 0.0]  # the first epoch's token-weighted ratio sums: the on-policy check
    for epoch in range(w.grpo.update_epochs):
        for i, (m, n, fix) in enumerate(zip(micro, passes, fixes)):
            if train_text:
                _text_micro_step(w, m, fix, global_tokens, sums, extremes)
            if train_image and n:
                objective.micro_step(w, m, i, fix, global_steps, sums, extremes)
        stepped = False
        for name, e in w.engines.items():
            if (name == "policy" and train_text) or (name == "diffusion" and train_image):
                e.step()
                norms[name].append(eng.grad_norm(e))
                stepped = True
        w.optimizer_steps += int(stepped)
        if epoch == 0:
            first_epoch = [sums.get("text_ratio_mean", 0.0), sums.get("image_ratio_mean", 0.0)]
    off_policy_metrics.update(_on_policy_check(w, first_epoch, global_tokens if train_text else 0.0,
                                               global_steps if train_image and objective.ratio else 0.0))
    off_policy_metrics.update(off_policy.tis_metrics(w, fixes))
    counts = StepCounts(tokens=global_tokens, steps=global_steps, chains=len(batch))
    metrics = _metrics(w, sums, extremes, norms, lrs, counts, t0, objective.per_step_metrics)
    return {**metrics, **off_policy_metrics, "dropped_stale_chains": dropped_total}


def _on_policy_check(w: Rank, sums: Sequence[float], tokens: float, steps: float) -> dict[str, float]:
    """``{text,image}_first_epoch_ratio_mean``: the ratio before any update of this step, 1 up to the rollout's and
    the learner's numerics (stale chains are taken against the proximal policy, so also 1); a drift means the
    learner does not re-score what the rollout sampled (Flow-GRPO's ratio == 1 check). A collective."""
    text, image = w.all_reduce(list(sums))
    return {f"{kind}_first_epoch_ratio_mean": total / count
            for kind, total, count in (("text", text, tokens), ("image", image, steps)) if count > 0}


def _image_passes(w: Rank, micro: Sequence[MicroBatch]) -> list[int]:
    """Per micro-batch, how many image backward passes it runs (its trained steps over all stages): 0 where
    any rank has no traces to re-score. ZeRO's collectives run per backward, so every rank must run the same
    number: a mismatch is an error on every rank, never a hang."""
    if "diffusion" not in w.engines:
        return [0] * len(micro)
    d = w.diffusion_cfg
    local = [sum(len(image_objectives.trained_steps(d, c)) for c in stage_columns(m.rollouts)) for m in micro]
    low, high = w.all_reduce(local, "min"), w.all_reduce(local, "max")
    if low != high:
        raise RuntimeError(f"learner ranks disagree on the image passes per micro-batch: {low} vs {high}")
    return [int(n) for n in low]


def _text_micro_step(w: Rank, m: MicroBatch, fix: Correction, global_tokens: float, sums: dict[str, float],
                     extremes: dict[str, float]) -> None:
    policy = w.engines["policy"]
    mb = m.batch
    logp = policy_log_probs(policy, w.tokens, mb, m.rollouts, w.device, w.logprob_temperature)  # (B, L), grad
    old, weights = fix.text(logp, mb.old_log_probs, mb.loss_mask)
    old, adv, mask = (t.to(w.device) for t in (old, mb.advantages, mb.loss_mask))
    weights = None if weights is None else weights.to(w.device)
    out = clipped_surrogate(logp, old, adv, mask, w.grpo.clip_low, w.grpo.clip_high, weights)
    loss = text_loss = token_mean(out.loss, mask, global_tokens)
    if w.reference is not None:
        with torch.no_grad():
            ref_logp = policy_log_probs(w.reference, w.tokens, mb, m.rollouts, w.device, w.logprob_temperature)
        kl = token_mean(k3_kl(logp, ref_logp), mask, global_tokens)
        loss = loss + w.grpo.kl_beta * kl
        add(sums, "kl", kl.item())
    policy.backward(loss * eng.dp_loss_scale(), scale_wrt_gas=False)
    add(sums, "text_loss", text_loss.item())
    accumulate(sums, extremes, "text", out.metrics)


def _metrics(w: Rank, sums: dict[str, float], extremes: dict[str, float], norms: dict[str, list[float]],
             lrs: dict[str, float], counts: StepCounts, t0: float, per_step: Sequence[str]) -> dict[str, float]:
    """Sum the per-rank partial sums over ranks and turn them into batch means."""
    global_tokens, global_steps = counts.tokens, counts.steps
    totals = reduce_sums(sums, w.all_reduce)
    maxima = w.all_reduce([extremes[k] if "max" in k else -extremes[k] for k in sorted(extremes)], "max")
    epochs = w.grpo.update_epochs
    m: dict[str, float] = {
        "tokens": global_tokens,
        "diffusion_steps": global_steps,
        "chains": w.all_reduce([counts.chains])[0],
        "optimizer_steps": w.optimizer_steps,
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
