"""The GRPO update of one learner rank, on its shard of the step's chains.

    text (grpo.engine_correction: tis) and stale chains: ratio against the first epoch's own log-probs (proximal),
    TIS weights of proximal over the rollout's
    for each update epoch:                                  (old log-probs stay the rollout's / the proximal)
        for each micro-batch of learner.micro_batch_size chains:
            policy:    re-score prompt + completion with the context images -> clipped surrogate, text tokens
                       (+ beta * k3 KL to the frozen reference)       / global text-token count -> backward
            diffusion: for each trained denoising step of each stage (diffusion.train_steps_fraction / _start):
                       trajectory: re-score that step of every chain -> clipped surrogate / global step count
                       nft: the chains' sampled images noised to that step's timestep -> DiffusionNFT's loss
                       -> backward (one per step: memory holds one step's UNet graph, as in Flow-GRPO)
        (+ grpo.sft_coef x the cold start's cross-entropy on the step's target chains: PPO-ptx)
        step both engines (one optimizer step per epoch)

Dividing by the *global* counts (all micro-batches on all ranks) makes the accumulated gradient exactly the
token-mean of the whole batch however it is split (``core.grpo.token_mean``).
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from core.config import DiffusionConfig, GRPOConfig
from core.grpo import (TrainBatch, adapt_kl_beta, clipped_surrogate, image_objective, image_surrogate, k3_kl,
                       nft_loss, projected_target, reward_probability, stage_trained_steps, token_mean)
from core.records import Rollout
from learner import engine as eng
from learner import off_policy
from learner.batching import MicroBatch, add, micro_batches, reduce_sums
from learner.off_policy import Correction
from learner.rank import Rank
from learner.scoring import StageColumns, policy_log_probs, stage_columns
from learner.sft_step import target_micro_batches, text_cross_entropy

# Metrics of core.grpo.SurrogateOutput that are masked means: aggregated over ranks weighted by their tokens.
MEAN_METRICS = ("clip_fraction", "clip_fraction_low", "clip_fraction_high", "approx_kl", "ratio_mean",
                "old_logp_mean")


def train_step(w: Rank, batch: TrainBatch, rollouts: Sequence[Rollout], sft_records: Sequence[Any] = (),
               version: Optional[int] = None, max_staleness: Optional[int] = None) -> dict[str, float]:
    """GRPO update on this rank's shard: ``batch`` row i pairs with ``rollouts[i]``. Returns metrics aggregated
    over all ranks (identical on every rank). ``sft_records``: this rank's target chains for ``grpo.sft_coef``
    (a zero-weight copy on a rank without); every rank gets some or none. ``version``: the learner's policy
    version before this update; chains sampled by an older one are corrected (``learner.off_policy``), and those
    more than ``max_staleness`` versions old are not trained on (counted as ``dropped_stale_chains``)."""
    t0 = time.perf_counter()
    w.validate_shard(batch, rollouts)
    models = [name for name in ("policy", "diffusion") if name in w.engines]
    batch, dropped = off_policy.drop_too_stale(batch, rollouts, version, max_staleness, models)
    dropped_total, = w.all_reduce([dropped])
    ptx: list[MicroBatch] = []
    ptx_tokens = 0.0
    if w.grpo.sft_coef > 0 and sft_records and "policy" in w.engines:
        ptx, ptx_tokens = target_micro_batches(w, sft_records, "train_step")
        ptx = ptx if ptx_tokens > 0 else []
    micro = micro_batches(batch, rollouts, w.cfg.micro_batch_size, w.all_reduce)
    passes = _image_passes(w, micro)
    local_tokens = sum(m.batch.num_tokens for m in micro)
    local_steps = sum(m.batch.num_steps for m, n in zip(micro, passes) if n)
    global_tokens, global_steps = w.all_reduce([local_tokens, local_steps])
    train_text = "policy" in w.engines and global_tokens > 0
    train_image = "diffusion" in w.engines and global_steps > 0
    fixes, off_policy_metrics = off_policy.corrections(w, micro, version, train_text, train_image)

    objective, options = image_objective(w.grpo.image_objective)
    nft_old: dict[tuple, Tensor] = {}  # nft: the first epoch's predictions, the sampling policy's, for later epochs
    nft_seed = w.optimizer_steps  # nft: the forward-process noise of this update, the same in every epoch
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
            if train_image and n and objective == "nft":
                _nft_micro_step(w, m, (nft_seed, i), global_steps, sums, options, nft_old)
            elif train_image and n:
                _image_micro_step(w, m, fix, global_steps, sums, extremes)
        for m in ptx:
            text_cross_entropy(w, m, ptx_tokens, sums, w.grpo.sft_coef, prefix="ptx_")
        stepped = False
        for name, e in w.engines.items():
            if (name == "policy" and (train_text or ptx)) or (name == "diffusion" and train_image):
                e.step()
                norms[name].append(eng.grad_norm(e))
                stepped = True
        w.optimizer_steps += int(stepped)
        if epoch == 0:
            first_epoch = [sums.get("text_ratio_mean", 0.0), sums.get("image_ratio_mean", 0.0)]
    off_policy_metrics.update(_on_policy_check(w, first_epoch, global_tokens if train_text else 0.0,
                                               global_steps if train_image and objective == "trajectory" else 0.0))
    off_policy_metrics.update(off_policy.tis_metrics(w, fixes))
    metrics = _metrics(w, sums, extremes, norms, lrs, global_tokens, global_steps, len(batch), t0)
    if "image_kl" in metrics:
        metrics["image_kl_beta"] = w.image_kl_beta  # the coefficient this update used
        if w.grpo.image_kl_target is not None:  # every rank holds the same all-reduced KL: the same next beta
            w.image_kl_beta = adapt_kl_beta(w.image_kl_beta, metrics["image_kl"], w.grpo.image_kl_target)
    return {**metrics, **off_policy_metrics, "dropped_stale_chains": dropped_total}


def _on_policy_check(w: Rank, sums: Sequence[float], tokens: float, steps: float) -> dict[str, float]:
    """``{text,image}_first_epoch_ratio_mean``: the ratio before any update of this step, 1 up to the rollout's and
    the learner's numerics (stale chains are taken against the proximal policy, so also 1); a drift means the
    learner does not re-score what the rollout sampled (Flow-GRPO's ratio == 1 check). A collective."""
    text, image = w.all_reduce(list(sums))
    return {f"{kind}_first_epoch_ratio_mean": total / count
            for kind, total, count in (("text", text, tokens), ("image", image, steps)) if count > 0}


def _trained_steps(d: DiffusionConfig, stage: StageColumns) -> range:
    """The steps of a stage's traces that get an image loss (``diffusion.train_steps_*`` and ``train_stages``)."""
    return stage_trained_steps(stage.stage, stage.num_steps, d.train_steps_fraction, d.train_steps_start,
                               d.train_stages)


def _image_passes(w: Rank, micro: Sequence[MicroBatch]) -> list[int]:
    """Per micro-batch, how many image backward passes it runs (its trained steps over all stages): 0 where
    any rank has no traces to re-score. ZeRO's collectives run per backward, so every rank must run the same
    number: a mismatch is an error on every rank, never a hang."""
    if "diffusion" not in w.engines:
        return [0] * len(micro)
    d = w.diffusion_cfg
    local = [sum(len(_trained_steps(d, c)) for c in stage_columns(m.rollouts)) for m in micro]
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
    text_loss = token_mean(out.loss, mask, global_tokens)
    loss = w.grpo.text_loss_weight * text_loss
    if w.reference is not None:
        with torch.no_grad():
            ref_logp = policy_log_probs(w.reference, w.tokens, mb, m.rollouts, w.device, w.logprob_temperature)
        kl = token_mean(k3_kl(logp, ref_logp), mask, global_tokens)
        loss = loss + w.grpo.kl_beta * kl
        add(sums, "kl", kl.item())
    policy.backward(loss * eng.dp_loss_scale(), scale_wrt_gas=False)
    add(sums, "text_loss", text_loss.item())
    _accumulate(sums, extremes, "text", out.metrics)


def _image_micro_step(w: Rank, m: MicroBatch, fix: Correction, global_steps: float, sums: dict[str, float],
                      extremes: dict[str, float]) -> None:
    """One backward per trained (stage, step): that step of every chain of the micro-batch, and of each of its image
    branches (``grpo.image_group_size``), re-scored in one UNet call."""
    diffusion = w.engines["diffusion"]
    mb = m.batch
    low, high = image_clip(w.grpo)
    B, d = len(m.rollouts), w.diffusion_cfg
    for stage in stage_columns(m.rollouts):
        traces = [r.traces[j] for j in stage.traces for r in m.rollouts]  # branch-major: (M * B)
        for k in _trained_steps(d, stage):
            cols = [o + k for o in stage.offsets]  # (M,) step columns of this step in each branch
            kl = None
            if w.diffusion_reference is None:
                logp = diffusion(traces, step_indices=[k])  # (M * B, 1) with grad
            else:
                logp, kl = diffusion(traces, step_indices=[k], reference=w.diffusion_reference)
            logp = logp.float().view(len(cols), B).T  # (B, M)
            fixes = [fix.step(c, logp[:, b:b + 1], mb.step_old_log_probs, mb.step_mask) for b, c in enumerate(cols)]
            old = torch.cat([o for o, _ in fixes], dim=1).to(w.device)
            weights = None if fixes[0][1] is None else torch.cat([wt for _, wt in fixes], dim=1).to(w.device)
            mask = mb.step_mask[:, cols].to(w.device)
            out = image_surrogate(logp, old, mb.step_advantages[:, cols].to(w.device), low, high, mask, weights)
            image_loss = token_mean(out.loss, mask, global_steps)
            loss = w.grpo.image_loss_weight * image_loss
            if kl is not None:
                image_kl = token_mean(kl.float().view(len(cols), B).T, mask, global_steps)
                loss = loss + w.image_kl_beta * image_kl
                add(sums, "image_kl", image_kl.item())
            diffusion.backward(loss * eng.dp_loss_scale(), scale_wrt_gas=False)
            add(sums, "image_loss", image_loss.item())
            _accumulate(sums, extremes, "image", out.metrics)


def _nft_micro_step(w: Rank, m: MicroBatch, where: tuple[int, int], global_steps: float, sums: dict[str, float],
                    options: Mapping[str, Any], old: dict[tuple, Tensor]) -> None:
    """DiffusionNFT on the micro-batch: one backward per trained (stage, step), over the sampled image of that stage
    of every chain and image branch, noised to the step's timestep. ``where``: (the update's first optimizer step,
    the micro-batch's index) seeds the noise, so later update epochs see the same noised images and keep the first
    epoch's predictions (``old``) as the sampling policy's."""
    diffusion = w.engines["diffusion"]
    mb, d = m.batch, w.diffusion_cfg
    for s, stage in enumerate(stage_columns(m.rollouts)):
        traces = [r.traces[j] for j in stage.traces for r in m.rollouts]  # branch-major: (M * B)
        for k in _trained_steps(d, stage):
            key = (*where, s, k)
            generator = torch.Generator().manual_seed(hash(key) % 2**31)
            prediction, x0, ref = diffusion(traces, forward_step=k, generator=generator,
                                            reference=w.diffusion_reference)
            previous = old.setdefault(key, prediction.detach())
            if options["target"] == "projected":
                x0 = projected_target(x0, previous)
            cols = [o + k for o in stage.offsets]
            adv = mb.step_advantages[:, cols].T.reshape(-1).to(w.device)  # (M * B), branch-major like the traces
            mask = mb.step_mask[:, cols].T.reshape(-1).to(w.device)
            out = nft_loss(prediction, previous, x0, reward_probability(adv, options["adv_clip"]), options["beta"])
            image_loss = token_mean(out.loss, mask, global_steps)
            loss = w.grpo.image_loss_weight * image_loss
            if ref is not None:  # the base model's x_0 prediction at the same noised images: an MSE to it
                image_kl = token_mean((prediction.float() - ref.float()).pow(2).flatten(1).mean(1), mask, global_steps)
                loss = loss + w.image_kl_beta * image_kl
                add(sums, "image_kl", image_kl.item())
            diffusion.backward(loss * eng.dp_loss_scale(), scale_wrt_gas=False)
            add(sums, "image_loss", image_loss.item())
            for name, value in (("nft_positive", out.positive), ("nft_negative", out.negative)):
                add(sums, name, float((value * mask).sum()))


def image_clip(g: GRPOConfig) -> tuple[float, float]:
    """(clip_low, clip_high) of the denoising steps' ratio: ``grpo.image_clip_range`` both ways, else the text's."""
    if g.image_clip_range is None:
        return g.clip_low, g.clip_high
    return g.image_clip_range, g.image_clip_range


def _accumulate(sums: dict[str, float], extremes: dict[str, float], kind: str,
                metrics: Mapping[str, Tensor]) -> None:
    """Token-weighted sums of the masked-mean metrics, and running extremes of the ratio."""
    tokens = float(metrics["tokens"])
    for name in MEAN_METRICS:
        add(sums, f"{kind}_{name}", float(metrics[name]) * tokens)
    if tokens > 0:
        extremes[f"{kind}_ratio_max"] = max(extremes[f"{kind}_ratio_max"], float(metrics["ratio_max"]))
        extremes[f"{kind}_ratio_min"] = min(extremes[f"{kind}_ratio_min"], float(metrics["ratio_min"]))


def _metrics(w: Rank, sums: dict[str, float], extremes: dict[str, float],
             norms: dict[str, list[float]], lrs: dict[str, float], global_tokens: float, global_steps: float,
             chains: int, t0: float) -> dict[str, float]:
    """Sum the per-rank partial sums over ranks and turn them into batch means."""
    totals = reduce_sums(sums, w.all_reduce)
    maxima = w.all_reduce([extremes[k] if "max" in k else -extremes[k] for k in sorted(extremes)], "max")
    epochs = w.grpo.update_epochs
    m: dict[str, float] = {
        "tokens": global_tokens,
        "diffusion_steps": global_steps,
        "chains": w.all_reduce([chains])[0],
        "optimizer_steps": w.optimizer_steps,
    }
    for k in ("text_loss", "image_loss", "kl", "image_kl"):
        if k in totals:
            m[k] = totals[k] / epochs
    for k in ("nft_positive", "nft_negative"):  # DiffusionNFT's two losses, per trained image step
        if k in totals:
            m[k] = totals[k] / (global_steps * epochs)
    if "ptx_text_loss" in totals:  # grpo.sft_coef's cross-entropy on the target chains
        m["ptx_loss"] = totals["ptx_text_loss"] / epochs
        m["ptx_token_accuracy"] = totals["ptx_correct_tokens"] / totals["ptx_target_tokens"]
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
