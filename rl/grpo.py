"""GRPO math: group-relative advantages, zero-variance filtering, clipped surrogates, KL, aggregation.

Pure torch functions (no Ray, no config objects: every knob is a scalar argument), named after the
terms of the GRPO / DAPO / Flow-GRPO papers. Shapes are in the docstrings: N chains in group order
``[g0s0, g0s1, ..., g0s(G-1), g1s0, ...]``, B rows of a train batch, L token positions, S diffusion steps.

How the learner composes them for one micro-batch (by default, as in the paper, the chain's advantage is
shared by its text tokens and by every diffusion step of its three images; ``chain_advantages`` +
``build_train_batch(image_advantages=, section_advantages=)`` give the images, or a text section, the
advantage of only the rewards that judge them)::

    text = clipped_surrogate(logp, batch.old_log_probs, batch.advantages, batch.loss_mask, lo, hi)
    image = image_surrogate(step_logp, batch.step_old_log_probs, batch.chain_advantages, lo_img, hi_img,
                            batch.step_mask)
    loss = (w_text * token_mean(text.loss, batch.loss_mask, global_text_tokens)
            + w_image * token_mean(image.loss, batch.step_mask, global_steps))
    if needs_reference(beta):
        loss = loss + beta * token_mean(k3_kl(logp, ref_logp), batch.loss_mask, global_text_tokens)
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from rl.records import Rollout

# The log-ratio is clamped before exp() so one wild token cannot overflow the ratio to inf (OpenRLHF does
# the same); e^20 ~ 5e8 is far outside any clip range, so clipped tokens are unaffected.
LOG_RATIO_CLAMP = 20.0


# ------------------------------------------------------------------------------------------ advantages
def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """rewards (N,) -> (N // group_size, group_size) float, after checking the layout and the values."""
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if rewards.numel() % group_size:
        raise ValueError(
            f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}: "
            "every prompt needs all of its G chains"
        )
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"rewards are not finite at indices {bad[:8]}: {rewards[bad[:8]].tolist()}")
    r = rewards if rewards.is_floating_point() else rewards.float()
    return r.view(-1, group_size)


def group_advantages(
    rewards: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO's group-relative advantage, A_i = (r_i - mean_g(r)) / (std_g(r) + eps).

    rewards (N,) ordered [g0s0, g0s1, ..., g1s0, ...] -> advantages (N,), same float dtype.

    The std is the *unbiased* sample std (``torch.std``, Bessel's correction), as in the paper's trainer
    and TRL/verl, so G=2 rewards {0, 1} give A = +-0.707, not +-1. ``eps`` is added to the std (not to the
    variance), which keeps an all-equal group at exactly A = 0 instead of 0/0. A group of size 1 has no
    spread to compare against: its advantage is 0 (it is also a zero-variance group, see
    ``zero_variance_groups``). ``scale_by_std=False`` is Dr.GRPO's mean-only baseline, which does not
    up-weight groups whose rewards barely differ.
    """
    r = _grouped(rewards, group_size)  # (num_groups, G)
    centred = r - r.mean(dim=1, keepdim=True)
    if not scale_by_std:
        return centred.reshape(-1)
    if group_size == 1:
        return torch.zeros_like(centred).reshape(-1)
    std = r.std(dim=1, keepdim=True)  # unbiased (correction=1)
    return (centred / (std + eps)).reshape(-1)


def component_rewards(
    parts: Sequence[Mapping[str, float]], weights: Mapping[str, float], components: Sequence[str]
) -> Tensor:
    """The weighted sum of only the named reward components of each chain -> (N,) float32.

    parts[i] is ``Scores.parts`` of chain i; a component a chain's sample does not have (no labels, no tags)
    is left out, as in the total. A detail part ``name/detail`` (e.g. ``format/final_understand``) takes the
    weight of ``name``. Used to give the text tokens, the text sections and the diffusion steps advantages from
    the rewards each can change (``grpo.text_rewards`` / ``section_rewards`` / ``image_rewards``).
    """
    base = {c: c.split("/", 1)[0] for c in components}
    unknown = sorted(c for c, b in base.items() if b not in weights)
    if unknown:
        raise ValueError(f"unknown reward components {unknown}; known: {sorted(weights)}")
    return torch.tensor([sum(weights[base[c]] * p[c] for c in components if c in p) for p in parts],
                        dtype=torch.float32)


def token_sections(token_ids: Tensor, tag_columns: Mapping[int, int]) -> Tensor:
    """Which section each position of a completion is in: (T,) long.

    tag_columns maps the id of an opening tag (a single token) to a column; a position takes the column of
    the most recent opening tag at or before it (the tag token itself included), and 0 before any tag. A
    chain's text is sectioned by what the policy actually wrote, so a stray tag starts a new section.
    """
    t = token_ids.numel()
    column = torch.zeros(t, dtype=torch.long)
    is_tag = torch.zeros(t, dtype=torch.bool)
    for tag_id, col in tag_columns.items():
        hit = token_ids == tag_id
        column[hit] = col
        is_tag |= hit
    last = torch.where(is_tag, torch.arange(t), torch.full((t,), -1)).cummax(0).values if t else column
    return torch.where(last >= 0, column[last.clamp(min=0)], torch.zeros_like(column))


@dataclass(frozen=True)
class GroupFilter:
    """Which groups carry no learning signal (every chain scored the same)."""

    zero_variance: Tensor  # (num_groups,) bool, True where max - min <= atol
    keep: Tensor  # (N,) bool, True for the chains of the other groups

    @property
    def num_groups(self) -> int:
        return int(self.zero_variance.numel())

    @property
    def num_filtered(self) -> int:
        return int(self.zero_variance.sum())


def zero_variance_groups(rewards: Tensor, group_size: int, atol: float = 1e-6) -> GroupFilter:
    """Mark groups whose rewards are all equal (within ``atol``): their advantages are all 0.

    rewards (N,) in group order -> GroupFilter(zero_variance (N/G,), keep (N,)).

    Such groups add no gradient but still count in the token-mean denominator, diluting the others, so
    the driver drops them (DAPO's dynamic sampling) and logs ``num_filtered``. The test is max - min, which
    is exact for the common case of identical rewards and does not depend on the std's bias correction.
    A group of size 1 is always zero-variance.
    """
    r = _grouped(rewards, group_size)
    spread = r.max(dim=1).values - r.min(dim=1).values  # (num_groups,)
    zero = spread <= atol
    return GroupFilter(zero_variance=zero, keep=(~zero).repeat_interleave(group_size))


def column_advantages(
    rewards: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> tuple[Tensor, GroupFilter]:
    """Group advantages of several rewards at once: rewards (N, C), one column per use (the text tokens,
    the diffusion steps, a section of the text) -> advantages (N, C), each column normalised on its own,
    and a GroupFilter that drops a group only when every column is flat in it (nothing left to learn)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (N, C), got shape {tuple(rewards.shape)}")
    columns = [group_advantages(rewards[:, c].contiguous(), group_size, scale_by_std, eps)
               for c in range(rewards.shape[1])]
    flat = torch.stack([zero_variance_groups(rewards[:, c].contiguous(), group_size).zero_variance
                        for c in range(rewards.shape[1])]).all(dim=0)
    keep = (~flat).repeat_interleave(group_size)
    return torch.stack(columns, dim=1), GroupFilter(zero_variance=flat, keep=keep)


@dataclass(frozen=True)
class ChainAdvantages:
    """What the learner needs from one step's rewards (N chains in group order).

    text (N,): the text tokens' advantage; image (N,) or None (the diffusion steps share ``text``);
    sections (N, len(section_tags)) or None (every text token has ``text``); groups: the filter (a group is
    dropped only when every column is flat in it)."""

    text: Tensor
    image: Tensor | None
    sections: Tensor | None
    groups: GroupFilter


def chain_advantages(
    parts: Sequence[Mapping[str, float]],
    totals: Sequence[float],
    weights: Mapping[str, float],
    group_size: int,
    text_rewards: Sequence[str] | None = None,
    image_rewards: Sequence[str] | None = None,
    section_rewards: Mapping[str, Sequence[str]] | None = None,
    section_tags: Sequence[str] = (),
    train_images: bool = True,
    scale_by_std: bool = True,
    eps: float = 1e-6,
    negative_scale: float = 1.0,
    shuffle: torch.Generator | None = None,
) -> ChainAdvantages:
    """The advantages of every part of the chain from the chains' reward parts (``Scores.parts``) and totals.

    ``text_rewards`` / ``image_rewards``: the components the text / the diffusion steps learn from (None: the
    total). The images get a column of their own only when they are trained and judged differently from the
    text; otherwise they share the text's (the paper), and a frozen SR model's reward keeps no group alive.
    ``section_rewards``: tag -> components for the tokens of that text section (a tag of ``section_tags``
    not named there takes the text's advantage). Each column is normalised within its groups on its own;
    ``negative_scale`` then multiplies its negative entries (``grpo.negative_advantage_scale``). With a
    ``shuffle`` generator, the rows are permuted within each group (``grpo.shuffle_advantages``: the placebo).
    """
    def rewards(components: Sequence[str] | None) -> Tensor:
        if components is None:
            return torch.tensor([float(t) for t in totals], dtype=torch.float32)
        return component_rewards(parts, weights, components)

    text_key = None if text_rewards is None else list(text_rewards)
    image_key = None if image_rewards is None else list(image_rewards)
    columns = {"text": rewards(text_rewards)}
    if train_images and image_key != text_key:
        columns["image"] = rewards(image_rewards)
    if section_rewards:
        unknown = sorted(set(section_rewards) - set(section_tags))
        if unknown:
            raise ValueError(f"section_rewards names {unknown}, not sections of {list(section_tags)}")
        for tag in section_tags:
            names = section_rewards.get(tag)
            columns[f"section/{tag}"] = columns["text"] if names is None else rewards(names)
    table, groups = column_advantages(torch.stack(list(columns.values()), dim=1), group_size, scale_by_std, eps)
    if negative_scale != 1.0:
        table = torch.where(table < 0, table * negative_scale, table)
    if shuffle is not None:
        n = table.shape[0]
        table = table[torch.cat([g + torch.randperm(group_size, generator=shuffle)
                                 for g in range(0, n, group_size)])]
    out = {name: table[:, i] for i, name in enumerate(columns)}
    sections = (torch.stack([out[f"section/{tag}"] for tag in section_tags], dim=1) if section_rewards
                else None)
    return ChainAdvantages(text=out["text"], image=out.get("image"), sections=sections, groups=groups)


def group_order(records: Sequence[object], group_size: int) -> list[int]:
    """The permutation that puts records (anything with ``prompt_id`` and ``sample_index``, e.g. Scores or
    Rollout) into group order [g0s0, g0s1, ...]; groups appear in order of their first record.

    ``[records[i] for i in group_order(records, G)]`` is what ``group_advantages`` expects. Raises when a
    group is incomplete or a (prompt_id, sample_index) pair repeats, because a silent misalignment would
    give chains the advantages of other chains.
    """
    groups: dict[int, dict[int, int]] = {}
    for i, rec in enumerate(records):
        pid, sidx = int(rec.prompt_id), int(rec.sample_index)  # type: ignore[attr-defined]
        members = groups.setdefault(pid, {})
        if sidx in members:
            raise ValueError(
                f"duplicate chain prompt_id={pid} sample_index={sidx} (records {members[sidx]} and {i})"
            )
        members[sidx] = i
    order: list[int] = []
    for pid, members in groups.items():
        if sorted(members) != list(range(group_size)):
            raise ValueError(
                f"group prompt_id={pid} has sample_index {sorted(members)}, expected 0..{group_size - 1}"
            )
        order.extend(members[s] for s in range(group_size))
    return order


# ------------------------------------------------------------------------------------------ losses
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
) -> SurrogateOutput:
    """PPO/GRPO clipped surrogate with DAPO's decoupled clip range (clip-higher).

    log_probs (B, T) current policy, with grad; old_log_probs (B, T) the sampling policy's;
    advantages (B, T) or (B,) (broadcast over T); mask (B, T) bool or 0/1 -> loss (B, T)

        ratio = exp(logp - old_logp)
        loss  = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)

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
) -> SurrogateOutput:
    """The same clipped surrogate on the diffusion sampler's per-step Gaussian log-probs (Flow-GRPO/DDPO).

    step_log_probs (N, S) re-scored with grad; old_step_log_probs (N, S) from sampling; advantages (N,)
    the chain's advantage; step_mask (N, S) (None: all steps) -> loss (N, S).

    S concatenates the steps of all three stages (rough, middle, final) in trace order; every step of a
    chain gets that chain's advantage, the same number its text tokens get, because the reward judges the
    whole chain. Each step is one "token" of the image policy: a Gaussian transition whose log-prob is a
    mean over pixels (a sum overflows the ratio), so the ratio behaves like a token ratio. Use a much
    smaller clip range than for text if the per-step ratios move fast (Flow-GRPO uses 1e-4).
    """
    if advantages.dim() != 1 or advantages.shape[0] != step_log_probs.shape[0]:
        raise ValueError(
            f"advantages must be (N,) with N = {step_log_probs.shape[0]} chains, "
            f"got {tuple(advantages.shape)}"
        )
    if step_mask is None:
        step_mask = torch.ones_like(step_log_probs, dtype=torch.bool)
    return clipped_surrogate(step_log_probs, old_step_log_probs, advantages, step_mask, clip_low, clip_high)


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


def stray_tags(token_ids: Tensor, sampled: Tensor, tag_order: Sequence[int], tag_ids: Collection[int]) -> Tensor:
    """Which sampled tokens are tags the grammar does not allow there: (T,) bool.

    ``tag_order``: the ids of the tags the policy writes, in the grammar's order (rl.chain.WRITTEN_TAGS);
    ``tag_ids``: the ids of every chain tag. Walking the sampled tokens, a tag that is the next expected one
    advances the grammar; any other tag (a closing tag of another section, a second opening tag, an image tag
    the system should insert) is stray, and the grammar still expects the same tag after it. Tokens the system
    inserted (``sampled`` 0) are skipped. A stray tag is exactly what makes ``rewards.format`` score 0 in most
    sampled chains: this marks the token that did it (``grpo.stray_tag_penalty``).
    """
    out = torch.zeros(token_ids.numel(), dtype=torch.bool)
    ids = torch.tensor(sorted(tag_ids), dtype=token_ids.dtype)
    candidates = (torch.isin(token_ids, ids) & sampled.bool()).nonzero().flatten().tolist()
    k = 0
    for pos in candidates:
        if k < len(tag_order) and int(token_ids[pos]) == tag_order[k]:
            k += 1
        else:
            out[pos] = True
    return out


# ------------------------------------------------------------------------------------------ train batch
@dataclass(frozen=True)
class TrainBatch:
    """Padded tensors for the learner. Per-token tensors are aligned with ``input_ids`` (entry t is about
    token t, predicted from tokens < t; see ``gather_token_log_probs``)."""

    input_ids: Tensor  # (B, L) long: prompt + completion, right-padded with pad_token_id
    attention_mask: Tensor  # (B, L) bool: real tokens (prompt and completion)
    loss_mask: Tensor  # (B, L) bool: tokens the policy sampled (completion & text_mask): text loss here
    old_log_probs: Tensor  # (B, L) float32: sampling log-probs on loss_mask, 0 elsewhere
    advantages: Tensor  # (B, L) float32: the chain's advantage on loss_mask, 0 elsewhere
    chain_advantages: Tensor  # (B,) float32: one advantage per chain, for image_surrogate
    prompt_lengths: Tensor  # (B,) long: P_i, completion starts at column P_i
    step_old_log_probs: Tensor  # (B, S) float32: diffusion step log-probs, all stages in Rollout.traces order
    step_mask: Tensor  # (B, S) bool: real steps (rows have different step counts)
    rows: tuple[int, ...]  # (B,) index of each row in the rollouts given to build_train_batch
    keys: tuple[tuple[int, int], ...]  # (B,) (prompt_id, sample_index) of each row

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        """Loss tokens in this batch: its share of the text token_mean denominator."""
        return int(self.loss_mask.sum())

    @property
    def num_steps(self) -> int:
        """Diffusion steps in this batch: its share of the image token_mean denominator."""
        return int(self.step_mask.sum())

    def select(self, index: Sequence[int]) -> TrainBatch:
        """The rows ``index`` (positions in this batch), with padding columns nobody uses trimmed."""
        idx = torch.as_tensor(list(index), dtype=torch.long)
        att = self.attention_mask[idx]
        steps = self.step_mask[idx]
        length = int(att.any(dim=0).nonzero().max()) + 1 if att.any() else 0
        num_steps = int(steps.any(dim=0).nonzero().max()) + 1 if steps.any() else 0
        return replace(
            self,
            input_ids=self.input_ids[idx, :length],
            attention_mask=att[:, :length],
            loss_mask=self.loss_mask[idx, :length],
            old_log_probs=self.old_log_probs[idx, :length],
            advantages=self.advantages[idx, :length],
            chain_advantages=self.chain_advantages[idx],
            prompt_lengths=self.prompt_lengths[idx],
            step_old_log_probs=self.step_old_log_probs[idx, :num_steps],
            step_mask=steps[:, :num_steps],
            rows=tuple(self.rows[i] for i in idx.tolist()),
            keys=tuple(self.keys[i] for i in idx.tolist()),
        )

    def split(self, micro_batch_size: int) -> list[TrainBatch]:
        """Consecutive micro-batches of at most ``micro_batch_size`` rows (each trimmed)."""
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        n = len(self)
        return [self.select(range(i, min(i + micro_batch_size, n))) for i in range(0, n, micro_batch_size)]


def _check_rollout(r: Rollout) -> None:
    who = f"rollout prompt_id={r.prompt_id} sample_index={r.sample_index}"
    if r.prompt_ids.dim() != 1:
        raise ValueError(f"{who}: prompt_ids must be 1-D (P,), got {tuple(r.prompt_ids.shape)}")
    t = r.token_ids.shape
    for name in ("token_ids", "text_mask", "log_probs"):
        value = getattr(r, name)
        if value.dim() != 1 or value.shape != t:
            raise ValueError(f"{who}: {name} has shape {tuple(value.shape)}, expected (T,) = {tuple(t)}")
    sampled = r.text_mask.bool()
    if not torch.isfinite(r.log_probs[sampled]).all():
        raise ValueError(f"{who}: log_probs are not finite on sampled tokens")
    for trace in r.traces:
        if trace.log_probs.dim() != 1 or not torch.isfinite(trace.log_probs).all():
            raise ValueError(
                f"{who}: trace {trace.stage!r} log_probs must be finite (S,), got {trace.log_probs}"
            )


def build_train_batch(
    rollouts: Sequence[Rollout],
    advantages: Tensor,
    keep: Tensor | None = None,
    pad_token_id: int = 0,
    image_advantages: Tensor | None = None,
    section_advantages: Tensor | None = None,
    tag_columns: Mapping[int, int] | None = None,
    stray_tag_penalty: float = 0.0,
    tag_order: Sequence[int] = (),
    tag_ids: Collection[int] = (),
) -> TrainBatch:
    """Pad the kept chains into a TrainBatch, each token carrying its chain's advantage.

    rollouts: N records; advantages (N,) aligned with them (see ``group_order``); keep (N,) bool from
    ``zero_variance_groups(...).keep`` (None keeps all). Rows keep the rollouts' order. Only tokens with
    text_mask 1 are loss tokens: prompt, inserted image blocks and padding carry no loss, no advantage
    and no old log-prob. All kept chains filtered out is a valid, empty batch (len 0); the driver skips it.
    ``image_advantages`` (N,), when given, is what the diffusion steps get instead of ``advantages``
    (``grpo.image_rewards``: the images judged by the rewards they can change).
    ``section_advantages`` (N, K), when given with ``tag_columns`` (opening-tag id -> column 1..K, 0 for
    tags that keep ``advantages``), gives each text token the advantage of the section it is in
    (``token_sections``); tokens before any tag or in a column-0 section keep ``advantages``
    (``grpo.section_rewards``: a section judged by the reward that scores it).
    ``stray_tag_penalty`` > 0 (with ``tag_order`` and ``tag_ids``, see ``stray_tags``) is subtracted from the
    advantage of every sampled tag the grammar does not allow there: the format reward's credit given to the
    token that broke the format.
    """
    n = len(rollouts)
    if advantages.dim() != 1 or advantages.shape[0] != n:
        raise ValueError(f"advantages must be (N,) with N = {n} rollouts, got {tuple(advantages.shape)}")
    if section_advantages is not None and (section_advantages.dim() != 2 or section_advantages.shape[0] != n
                                           or tag_columns is None):
        raise ValueError(f"section_advantages must be (N, K) with N = {n} rollouts, with tag_columns; got "
                         f"{None if section_advantages is None else tuple(section_advantages.shape)}")
    if stray_tag_penalty and not (tag_order and tag_ids):
        raise ValueError("stray_tag_penalty needs tag_order and tag_ids (the chain tags' token ids)")
    if image_advantages is not None and tuple(image_advantages.shape) != (n,):
        raise ValueError(f"image_advantages must be (N,) with N = {n} rollouts, "
                         f"got {tuple(image_advantages.shape)}")
    if keep is None:
        keep = torch.ones(n, dtype=torch.bool)
    if keep.shape != (n,):
        raise ValueError(f"keep must be (N,) with N = {n} rollouts, got {tuple(keep.shape)}")
    rows = [i for i in range(n) if bool(keep[i])]
    kept = [rollouts[i] for i in rows]
    for r in kept:
        _check_rollout(r)

    b = len(kept)
    p_len = [int(r.prompt_ids.numel()) for r in kept]
    lengths = [p + int(r.token_ids.numel()) for p, r in zip(p_len, kept)]
    steps = [sum(int(t.log_probs.numel()) for t in r.traces) for r in kept]
    length, num_steps = max(lengths, default=0), max(steps, default=0)

    input_ids = torch.full((b, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((b, length), dtype=torch.bool)
    loss_mask = torch.zeros((b, length), dtype=torch.bool)
    old_log_probs = torch.zeros((b, length), dtype=torch.float32)
    step_old = torch.zeros((b, num_steps), dtype=torch.float32)
    step_mask = torch.zeros((b, num_steps), dtype=torch.bool)
    token_adv = torch.zeros((b, length), dtype=torch.float32)
    image_source = advantages if image_advantages is None else image_advantages
    chain_adv = image_source.detach().float()[rows] if rows else torch.zeros(0)

    for row, (r, p, total) in enumerate(zip(kept, p_len, lengths)):
        input_ids[row, :p] = r.prompt_ids
        input_ids[row, p:total] = r.token_ids
        attention_mask[row, :total] = True
        sampled = r.text_mask.bool()
        loss_mask[row, p:total] = sampled
        old_log_probs[row, p:total] = torch.where(sampled, r.log_probs.float(), torch.zeros(()))
        own = advantages[rows[row]].detach().float()
        if section_advantages is None:
            token_adv[row, p:total] = own * sampled
        else:  # column 0: the text's own advantage
            table = torch.cat([own.reshape(1), section_advantages[rows[row]].detach().float()])
            token_adv[row, p:total] = table[token_sections(r.token_ids, tag_columns)] * sampled
        if stray_tag_penalty:
            token_adv[row, p:total] -= stray_tag_penalty * stray_tags(r.token_ids, sampled, tag_order, tag_ids)
        if steps[row]:
            step_old[row, : steps[row]] = torch.cat([t.log_probs.float() for t in r.traces])
            step_mask[row, : steps[row]] = True

    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        old_log_probs=old_log_probs,
        advantages=token_adv,
        chain_advantages=chain_adv,
        prompt_lengths=torch.tensor(p_len, dtype=torch.long),
        step_old_log_probs=step_old,
        step_mask=step_mask,
        rows=tuple(rows),
        keys=tuple((int(r.prompt_id), int(r.sample_index)) for r in kept),
    )
