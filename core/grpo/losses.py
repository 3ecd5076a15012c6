"""GRPO losses: the clipped surrogate (text tokens and diffusion steps), token-mean aggregation, the k3 KL.

Pure torch (no Ray, no config objects: every knob is a scalar argument), named after the terms of the GRPO /
DAPO / Flow-GRPO papers. Shapes: B rows of a train batch, T (or L) token positions, S diffusion steps.

How the learner composes them for one micro-batch::

    text = clipped_surrogate(logp, batch.old_log_probs, batch.advantages, batch.loss_mask, lo, hi)
    image = image_surrogate(step_logp, batch.step_old_log_probs, batch.step_advantages, lo, hi, batch.step_mask)
    loss = (w_text * token_mean(text.loss, batch.loss_mask, global_text_tokens)
            + w_image * token_mean(image.loss, batch.step_mask, global_steps))
    if needs_reference(beta):
        loss = loss + beta * token_mean(k3_kl(logp, ref_logp), batch.loss_mask, global_text_tokens)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# The log-ratio is clamped before exp() so one wild token cannot overflow the ratio to inf (OpenRLHF does
# the same); e^20 ~ 5e8 is far outside any clip range, so clipped tokens are unaffected.
LOG_RATIO_CLAMP = 20.0


@dataclass(frozen=True)
class SurrogateOutput:
    """Per-position loss plus detached scalar metrics (0-dim tensors; masked means over this micro-batch)."""

    loss: Tensor  # same shape as log_probs; 0 where mask is 0. Aggregate with token_mean.
    metrics: dict[str, Tensor]  # clip_fraction(_low/_high), approx_kl, ratio_mean/min/max, tokens


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def clipped_surrogate(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
    weights: Tensor | None = None,
) -> SurrogateOutput:
    """PPO/GRPO clipped surrogate with DAPO's decoupled clip range (clip-higher).

    log_probs (B, T) current policy, with grad; old_log_probs (B, T) the sampling policy's;
    advantages (B, T) or (B,) (broadcast over T); mask (B, T) bool or 0/1 -> loss (B, T)

        ratio = exp(logp - old_logp)
        loss  = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)

    ``weights`` (B, T), detached, multiply each position's loss: the truncated importance weights of stale
    chains (``truncated_importance_weights``); None = 1 (on-policy). The clip and the metrics see the ratio only.

    A larger ``clip_high`` lets low-probability tokens with A > 0 grow further before clipping, which DAPO
    found keeps entropy from collapsing. Positions with mask 0 get loss exactly 0 and no gradient, whatever
    their log-probs hold (padding may be -inf or NaN): they are zeroed before the exp.

    Metrics (masked means, detached): ``clip_fraction_low`` = ratio < 1 - clip_low with A < 0,
    ``clip_fraction_high`` = ratio > 1 + clip_high with A > 0 (the tokens whose gradient the clip removes),
    ``clip_fraction`` = their sum; ``approx_kl`` = mean of Schulman's k3 estimate of KL(old || new),
    (ratio - 1) - log ratio, which is >= 0; ``ratio_mean/min/max``; ``old_logp_mean`` = the sampling
    policy's mean log-prob of what it sampled (minus a one-sample entropy estimate: a falling value means
    the policy is going flat); ``tokens`` = mask count.
    """
    if not 0 <= clip_low < 1:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if clip_high < 0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if log_probs.shape != old_log_probs.shape or log_probs.shape != mask.shape:
        raise ValueError(
            f"shape mismatch: log_probs {tuple(log_probs.shape)}, "
            f"old_log_probs {tuple(old_log_probs.shape)}, "
            f"mask {tuple(mask.shape)}"
        )
    if advantages.dim() == log_probs.dim() - 1:
        advantages = advantages.unsqueeze(-1)  # (B,) -> (B, 1), one advantage per chain
    if advantages.shape[0] != log_probs.shape[0]:
        raise ValueError(
            f"advantages {tuple(advantages.shape)} do not match log_probs {tuple(log_probs.shape)}"
        )

    on = mask.bool()
    m = on.to(log_probs.dtype)
    advantages = advantages.to(log_probs.dtype).detach()
    log_ratio = torch.where(on, log_probs - old_log_probs.detach(), torch.zeros_like(log_probs))
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # (B, T), 1 where masked
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    objective = torch.minimum(ratio * advantages, clipped * advantages)
    if weights is not None:
        if weights.shape != log_probs.shape:
            raise ValueError(f"weights {tuple(weights.shape)} do not match log_probs {tuple(log_probs.shape)}")
        objective = objective * weights.detach().to(objective.dtype)
    loss = torch.where(on, -objective, torch.zeros_like(objective))

    with torch.no_grad():
        r = ratio.detach()
        adv = advantages.expand_as(r)
        low = ((r < 1.0 - clip_low) & (adv < 0) & on).to(r.dtype)
        high = ((r > 1.0 + clip_high) & (adv > 0) & on).to(r.dtype)
        k3 = (r - 1.0) - log_ratio.detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        any_on = bool(on.any())
        metrics = {
            "clip_fraction": _masked_mean(low + high, m),
            "clip_fraction_low": _masked_mean(low, m),
            "clip_fraction_high": _masked_mean(high, m),
            "approx_kl": _masked_mean(k3, m),
            "ratio_mean": _masked_mean(r, m),
            "old_logp_mean": _masked_mean(old_log_probs.detach().masked_fill(~on, 0.0), m),
            "ratio_min": r[on].min() if any_on else r.new_tensor(1.0),
            "ratio_max": r[on].max() if any_on else r.new_tensor(1.0),
            "tokens": m.sum(),
        }
    return SurrogateOutput(loss=loss, metrics=metrics)


def image_surrogate(
    step_log_probs: Tensor,
    old_step_log_probs: Tensor,
    advantages: Tensor,
    clip_low: float,
    clip_high: float,
    step_mask: Tensor | None = None,
    weights: Tensor | None = None,
) -> SurrogateOutput:
    """The same clipped surrogate on the diffusion sampler's per-step Gaussian log-probs (Flow-GRPO/DDPO).

    step_log_probs (N, S) re-scored with grad; old_step_log_probs (N, S) from sampling; advantages (N,) the
    chain's advantage, or (N, S) one per step (each image branch's own, ``grpo.image_group_size``); step_mask
    (N, S) (None: all steps) -> loss (N, S).

    S concatenates the steps of all three stages (rough, middle, final) in trace order; every step of a
    chain (of an image branch) gets that chain's (branch's) advantage, because the reward judges the whole
    chain (the branch's final image). Each step is one "token" of the image policy: a Gaussian transition whose log-prob is a
    mean over pixels (a sum overflows the ratio), so the ratio behaves like a token ratio. Use a much
    smaller clip range than for text if the per-step ratios move fast (Flow-GRPO uses 1e-4).
    """
    if advantages.shape not in ((step_log_probs.shape[0],), tuple(step_log_probs.shape)):
        raise ValueError(
            f"advantages must be (N,) or (N, S) = {tuple(step_log_probs.shape)}, got {tuple(advantages.shape)}"
        )
    if step_mask is None:
        step_mask = torch.ones_like(step_log_probs, dtype=torch.bool)
    return clipped_surrogate(step_log_probs, old_step_log_probs, advantages, step_mask, clip_low, clip_high,
                             weights)


@dataclass(frozen=True)
class ImportanceWeights:
    """Truncated importance weights of stale chains, with what the truncation did."""

    weights: Tensor  # same shape as the log-probs: min(pi_prox / pi_behaviour, cap) on mask, 1 elsewhere
    ratio_sum: float  # sum over masked positions of the untruncated ratio (for a mean over ranks)
    truncated: float  # masked positions whose ratio exceeded the cap
    count: float  # masked positions


def truncated_importance_weights(proximal_log_probs: Tensor, behaviour_log_probs: Tensor, mask: Tensor,
                                 cap: float) -> ImportanceWeights:
    """Truncated importance sampling (TIS) of the decoupled PPO objective for off-policy chains.

    A chain sampled by an older policy (the asynchronous pipeline's stale chains) has behaviour log-probs
    from that policy; the learner re-scores it under its current, pre-update weights (the proximal policy)
    and clips the PPO ratio against those, while this weight, ``min(exp(prox - behaviour), cap)``, corrects
    for the sampling distribution (AReaL's decoupled PPO; TIS as in Yao et al. 2025 / verl's rollout IS).
    Positions where ``mask`` is 0 get weight 1 (their loss is 0 anyway). On-policy chains, whose proximal
    log-probs are their behaviour log-probs, get exactly 1.
    """
    if not cap >= 1.0:
        raise ValueError(f"importance weight cap must be >= 1, got {cap!r}")
    if proximal_log_probs.shape != behaviour_log_probs.shape or proximal_log_probs.shape != mask.shape:
        raise ValueError(f"shape mismatch: proximal {tuple(proximal_log_probs.shape)}, "
                         f"behaviour {tuple(behaviour_log_probs.shape)}, mask {tuple(mask.shape)}")
    on = mask.bool()
    log_ratio = torch.where(on, proximal_log_probs.detach().float() - behaviour_log_probs.detach().float(),
                            torch.zeros_like(proximal_log_probs, dtype=torch.float32))
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    weights = torch.where(on, ratio.clamp(max=cap), torch.ones_like(ratio))
    return ImportanceWeights(weights=weights, ratio_sum=float(ratio[on].sum()),
                             truncated=float((on & (ratio > cap)).sum()), count=float(on.sum()))


def token_mean(values: Tensor, mask: Tensor, global_token_count: float | Tensor | None = None) -> Tensor:
    """sum(values * mask) / global_token_count -> 0-dim tensor.

    values (B, T), mask (B, T). The denominator is the number of loss tokens in the WHOLE batch (all
    micro-batches on all ranks), not in this micro-batch. Gradient accumulation and data-parallel
    reduction then *add* the micro-batch losses, and sum_k sum(loss_k) / N_total is exactly the token-mean
    of the full batch, however the tokens are split. Dividing by the local count instead would weight a
    token in a short micro-batch more than one in a long micro-batch.

    The learner computes ``global_token_count`` once per step (sum of ``TrainBatch.num_tokens`` over its
    micro-batches, all-reduced over ranks). If the engine *averages* instead of adding (DeepSpeed divides by
    gradient_accumulation_steps, and data-parallel all-reduce divides by world size), multiply the loss by
    that factor. ``None`` uses the local count (the full batch in one piece).
    """
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} differ in shape")
    m = mask.to(values.dtype)
    total = (values * m).sum()
    count = m.sum() if global_token_count is None else global_token_count
    if float(count) <= 0:
        raise ValueError(f"token count must be > 0, got {float(count)}: no loss tokens in the batch")
    return total / count


def needs_reference(beta: float) -> bool:
    """Whether a frozen reference policy must exist: only for a KL penalty, beta > 0.

    With beta == 0 the learner does not build the reference model at all (saves a model's memory and a
    forward pass per step), as in TRL and the paper's released trainer.
    """
    if not isinstance(beta, (int, float)) or math.isnan(beta) or beta < 0:
        raise ValueError(f"kl beta must be a number >= 0, got {beta!r}")
    return beta > 0


def k3_kl(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi_theta || pi_ref) (Schulman 2020), as in GRPO's objective.

    log_probs (B, T) with grad, ref_log_probs (B, T) frozen -> kl (B, T), >= 0, exactly 0 where equal:

        d = ref_logp - logp;   kl = exp(d) - d - 1

    Unbiased for samples from pi_theta and low-variance. ``d`` is clamped to +-20 so a token the
    reference finds impossible cannot produce inf. Mask and aggregate with ``token_mean``.
    """
    if log_probs.shape != ref_log_probs.shape:
        raise ValueError(
            f"log_probs {tuple(log_probs.shape)} and ref_log_probs {tuple(ref_log_probs.shape)} differ"
        )
    d = (ref_log_probs.detach() - log_probs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(d) - d - 1.0


def gather_token_log_probs(logits: Tensor, input_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-prob of every token given the ones before it, aligned with ``input_ids``.

    logits (B, L, V) from a causal LM over input_ids (B, L) -> log_probs (B, L) float32, where entry t is
    log p(input_ids[:, t] | input_ids[:, :t]) and entry 0 is 0 (nothing predicts the first token). This is
    the layout of ``TrainBatch.old_log_probs``. ``temperature`` must be the sampling temperature: the
    engine's log-probs are those of logits / temperature. Computed in float32 (bf16 logsumexp is too coarse
    for ratios near 1).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to have log-probs, got {temperature}")
    logits = logits[:, :-1].float() / temperature  # (B, L-1, V) predicts positions 1..L-1
    targets = input_ids[:, 1:].unsqueeze(-1)  # (B, L-1, 1)
    picked = logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (B, L-1)
    return torch.cat([picked.new_zeros(picked.shape[0], 1), picked], dim=1)

