"""The learner's padded batch: rollouts + per-chain advantages -> TrainBatch (pure torch, no Ray).

``build_train_batch`` pads the kept chains, gives each sampled text token its advantage through a token-credit
rule (``core.grpo.credit``), and marks which diffusion steps are trained (``trained_steps``: Flow-GRPO's
timestep fraction, ``diffusion.train_steps_fraction`` from ``diffusion.train_steps_start``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from core.grpo.credit import ChainTags, ImageCredit, TokenCredit, chain_credit, final_credit
from core.records import ChainAdvantage, Rollout


def trained_steps(num_steps: int, fraction: float = 1.0, start: float = 0.0) -> range:
    """The denoising steps of one trace that get a loss: ``max(1, floor(fraction * S))`` of the S steps, from
    step ``floor(start * S)`` (Flow-GRPO's ``timestep_fraction``; its "Fast" variant trains only a window of
    steps). ``fraction`` 1: all; ``start`` 0: the high-noise end.

    >>> list(trained_steps(8, 0.5)), list(trained_steps(8)), list(trained_steps(3, 0.1))
    ([0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7], [0])
    >>> list(trained_steps(8, 0.5, 0.5)), list(trained_steps(8, 0.25, 0.75)), list(trained_steps(3, 0.1, 0.9))
    ([4, 5, 6, 7], [6, 7], [2])
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"train_steps_fraction = {fraction!r}: must be in (0, 1]")
    if not 0 <= start < 1:
        raise ValueError(f"train_steps_start = {start!r}: must be in [0, 1)")
    if not num_steps:
        return range(0)
    first = min(math.floor(num_steps * start + 1e-9), num_steps - 1)
    return range(first, min(num_steps, first + max(1, math.floor(num_steps * fraction + 1e-9))))


@dataclass(frozen=True)
class TrainBatch:
    """Padded tensors for the learner. Per-token tensors are aligned with ``input_ids`` (entry t is about
    token t, predicted from tokens < t; see ``gather_token_log_probs``)."""

    input_ids: Tensor  # (B, L) long: prompt + completion, right-padded with pad_token_id
    attention_mask: Tensor  # (B, L) bool: real tokens (prompt and completion)
    loss_mask: Tensor  # (B, L) bool: tokens the policy sampled (completion & text_mask): text loss here
    old_log_probs: Tensor  # (B, L) float32: sampling log-probs on loss_mask, 0 elsewhere
    advantages: Tensor  # (B, L) float32: the chain's advantage on loss_mask, 0 elsewhere
    step_advantages: Tensor  # (B, S) float32: each diffusion step's advantage (its image branch's), 0 on padding
    prompt_lengths: Tensor  # (B,) long: P_i, completion starts at column P_i
    step_old_log_probs: Tensor  # (B, S) float32: diffusion step log-probs, all stages in Rollout.traces order
    step_mask: Tensor  # (B, S) bool: the trained steps (trained_steps of each trace), 0 on padding
    step_lengths: Tensor  # (B,) long: each row's real steps (all stages), trained or not
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
        length = int(att.any(dim=0).nonzero().max()) + 1 if att.any() else 0
        num_steps = int(self.step_lengths[idx].max()) if len(idx) else 0
        return replace(
            self,
            input_ids=self.input_ids[idx, :length],
            attention_mask=att[:, :length],
            loss_mask=self.loss_mask[idx, :length],
            old_log_probs=self.old_log_probs[idx, :length],
            advantages=self.advantages[idx, :length],
            step_advantages=self.step_advantages[idx, :num_steps],
            prompt_lengths=self.prompt_lengths[idx],
            step_old_log_probs=self.step_old_log_probs[idx, :num_steps],
            step_mask=self.step_mask[idx, :num_steps],
            step_lengths=self.step_lengths[idx],
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


def _as_records(advantages: Tensor | Sequence[ChainAdvantage], n: int) -> list[ChainAdvantage]:
    if isinstance(advantages, Tensor):
        if advantages.dim() != 1 or advantages.shape[0] != n:
            raise ValueError(f"advantages must be (N,) with N = {n} rollouts, got {tuple(advantages.shape)}")
        return [ChainAdvantage(text=float(a)) for a in advantages.detach().float()]
    if len(advantages) != n:
        raise ValueError(f"{len(advantages)} advantages for {n} rollouts (one per rollout)")
    return list(advantages)


def _kept_rows(keep: Tensor | None, n: int) -> list[int]:
    """The indices of the kept rollouts (``keep`` (N,) bool; None keeps all)."""
    if keep is None:
        return list(range(n))
    if keep.shape != (n,):
        raise ValueError(f"keep must be (N,) with N = {n} rollouts, got {tuple(keep.shape)}")
    return [i for i in range(n) if bool(keep[i])]


def build_train_batch(
    rollouts: Sequence[Rollout],
    advantages: Tensor | Sequence[ChainAdvantage],
    keep: Tensor | None = None,
    pad_token_id: int = 0,
    credit: TokenCredit = chain_credit,
    tags: ChainTags | None = None,
    train_steps: tuple[float, float] = (1.0, 0.0),
    image_credit: ImageCredit = final_credit,
) -> TrainBatch:
    """Pad the kept chains into a TrainBatch, each sampled token carrying its advantage.

    rollouts: N records; advantages: one ``ChainAdvantage`` per rollout (or a (N,) tensor of text advantages,
    shared by the images), aligned with them (see ``group_order``); keep (N,) bool from
    ``zero_variance_groups(...).keep`` (None keeps all). Rows keep the rollouts' order. Only tokens with
    text_mask 1 are loss tokens: prompt, inserted image blocks and padding carry no loss, no advantage
    and no old log-prob. ``credit`` (``core.grpo.credit.token_credit``) spreads a chain's advantages over its
    tokens, reading ``tags``; ``image_credit`` (``core.grpo.credit.image_credit``) gives each trace its advantage
    (``final``: ``ChainAdvantage.image``, None: the text's, or with image branches each branch's traces its
    ``ChainAdvantage.image_branches`` entry), on the steps ``train_steps`` = (fraction, start) of each trace
    selects (``trained_steps``). All chains filtered out is a valid, empty batch (len 0); the driver skips it.
    """
    n = len(rollouts)
    records = _as_records(advantages, n)
    rows = _kept_rows(keep, n)
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
    step_adv = torch.zeros((b, num_steps), dtype=torch.float32)

    for row, (r, p, total) in enumerate(zip(kept, p_len, lengths)):
        adv = records[rows[row]]
        input_ids[row, :p] = r.prompt_ids
        input_ids[row, p:total] = r.token_ids
        attention_mask[row, :total] = True
        sampled = r.text_mask.bool()
        loss_mask[row, p:total] = sampled
        old_log_probs[row, p:total] = torch.where(sampled, r.log_probs.float(), torch.zeros(()))
        token_adv[row, p:total] = credit(r.token_ids, sampled, adv, tags)
        trace_adv = image_credit(r, adv)
        offset = 0
        for j, trace in enumerate(r.traces):
            s = int(trace.log_probs.numel())
            step_old[row, offset:offset + s] = trace.log_probs.float()
            step_adv[row, offset:offset + s] = trace_adv[j]
            trained = trained_steps(s, *train_steps)
            step_mask[row, [offset + k for k in trained]] = True
            offset += s

    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        old_log_probs=old_log_probs,
        advantages=token_adv,
        step_advantages=step_adv,
        prompt_lengths=torch.tensor(p_len, dtype=torch.long),
        step_old_log_probs=step_old,
        step_mask=step_mask,
        step_lengths=torch.tensor(steps, dtype=torch.long),
        rows=tuple(rows),
        keys=tuple((int(r.prompt_id), int(r.sample_index)) for r in kept),
    )
