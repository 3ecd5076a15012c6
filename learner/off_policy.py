"""Off-policy correction on a learner rank: stale chains (the asynchronous pipeline, trainer.max_staleness > 0) and
the gap between the rollout engine's numerics and the learner's (``grpo.engine_correction``).

A chain is stale for a model when the rollout sampled it with an older version of that model than the one the
learner now holds (``Rollout.policy_version`` / ``diffusion_version`` < the step's ``version``). Its ratio is
clipped against the proximal policy, the learner's weights before this update, and each text token / denoising
step is weighted by ``min(pi_prox / pi_behaviour, grpo.tis_cap)`` (``core.grpo.truncated_importance_weights``:
decoupled PPO with truncated importance sampling, not IcePop-style masking). The proximal log-probs are the first
epoch's own forward (detached), so the correction costs no extra forward pass.

The same holds for on-policy text: vLLM's kernels (paged attention, the ViT's varlen attention, fused norms, bf16)
are not the learner's, so its log-probs differ from the learner's for the very same weights, and a PPO ratio taken
against them reads that noise as policy change. With ``grpo.engine_correction: tis`` (the default; verl's decoupled
mode, OpenRLHF's vLLM importance sampling) every chain's text takes the learner's first-epoch log-probs as the
proximal policy and is weighted by learner over engine, truncated; ``none`` takes the engine's log-probs as the old
policy (the paper's setting: exact when both sides compute alike, as the tiny CPU default's fp32 does). Either way
the gap is logged on the on-policy chains: ``engine_logp_gap`` (mean |learner - engine| per token),
``engine_ratio_mean`` and ``engine_clip_fraction`` (how many tokens the clip would cut on the engine's noise alone).
The denoising steps are re-scored by the same SR code that sampled them and are corrected only when stale.
Chains more than ``trainer.max_staleness`` versions old are not trained on (``drop_too_stale``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from torch import Tensor

from core.config import GRPOConfig
from core.grpo import TrainBatch, truncated_importance_weights
from core.records import Rollout
from learner.batching import MicroBatch
from learner.rank import RankContext


@dataclass
class Correction:
    """One micro-batch's off-policy state. ``text_rows`` / ``step_stale``: (B,) rows whose text / denoising steps take
    the proximal policy (None: none); ``on_policy``: (B,) rows sampled by the learner's current policy, where the
    engine gap is measured. The proximal log-probs are the first update epoch's own forward, detached: the weights
    do not change within an epoch (one optimizer step per epoch), so they cost no extra pass. They and the
    truncated importance weights are filled by the first epoch and reused by the later ones."""

    cap: float
    text_rows: Optional[Tensor] = None
    step_stale: Optional[Tensor] = None
    on_policy: Optional[Tensor] = None
    clip: tuple[float, float] = (0.2, 0.2)  # the text clip range, for engine_clip_fraction
    text_old: Optional[Tensor] = None  # (B, L) log-probs the text ratio is taken against
    text_weights: Optional[Tensor] = None  # (B, L) truncated importance weights
    step_old: Optional[Tensor] = None  # (B, S)
    step_weights: Optional[Tensor] = None  # (B, S)
    steps_filled: set[int] = field(default_factory=set)
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_SUMS, 0.0))

    def text(self, logp: Tensor, behaviour: Tensor, mask: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """(old log-probs, weights or None) for the text ratio; ``logp``: this epoch's (B, L) forward."""
        if self.text_old is None and self.on_policy is not None:
            self._engine_gap(logp.detach().float().cpu(), behaviour, mask)
        if self.text_rows is None:
            return behaviour, None
        if self.text_old is None:
            rows = self.text_rows[:, None]
            self.text_old = torch.where(rows, logp.detach().float().cpu(), behaviour)
            iw = truncated_importance_weights(self.text_old, behaviour, mask & rows, self.cap)
            self.text_weights = iw.weights
            self._add("text", iw)
        return self.text_old, self.text_weights

    def _engine_gap(self, learner: Tensor, engine: Tensor, mask: Tensor) -> None:
        """Sums of the first epoch's learner-over-engine gap on the on-policy rows' loss tokens."""
        on = mask.bool() & self.on_policy[:, None]
        delta = (learner - engine.float())[on]
        ratio = torch.exp(delta.clamp(-20, 20))
        low, high = self.clip
        self.sums["gap_abs"] += float(delta.abs().sum())
        self.sums["gap_ratio"] += float(ratio.sum())
        self.sums["gap_clipped"] += float(((ratio < 1 - low) | (ratio > 1 + high)).sum())
        self.sums["gap_tokens"] += float(on.sum())
        self.on_policy = None  # once: the first epoch's forward is the one before any update

    def step(self, col: int, logp: Tensor, behaviour: Tensor, mask: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """(old, weights or None), each (B, 1), for diffusion step column ``col``; ``logp``: its (B, 1) forward."""
        if self.step_stale is None:
            return behaviour[:, col:col + 1], None
        if self.step_old is None:
            self.step_old, self.step_weights = behaviour.clone(), torch.ones_like(behaviour)
        if col not in self.steps_filled:
            stale = self.step_stale
            self.step_old[:, col] = torch.where(stale, logp.detach().float().cpu()[:, 0], behaviour[:, col])
            iw = truncated_importance_weights(self.step_old[:, col], behaviour[:, col], mask[:, col] & stale, self.cap)
            self.step_weights[:, col] = iw.weights
            self.steps_filled.add(col)
            self._add("image", iw)
        return self.step_old[:, col:col + 1], self.step_weights[:, col:col + 1]

    def _add(self, kind: str, iw) -> None:
        self.sums[f"{kind}_ratio"] += iw.ratio_sum
        self.sums[f"{kind}_truncated"] += iw.truncated
        self.sums[f"{kind}_tokens"] += iw.count


_SUMS = ("image_ratio", "image_tokens", "image_truncated", "text_ratio", "text_tokens", "text_truncated",
         "gap_abs", "gap_ratio", "gap_clipped", "gap_tokens")


def chain_staleness(r: Rollout, version: int, models: Sequence[str]) -> int:
    """How many learner updates ago the oldest of ``models`` ("policy" / "diffusion") that sampled ``r`` was."""
    own = {"policy": r.policy_version, "diffusion": r.diffusion_version}
    return max((version - own[m] for m in models), default=0)


def drop_too_stale(batch: TrainBatch, rollouts: Sequence[Rollout], version: Optional[int],
                   max_staleness: Optional[int], models: Sequence[str]) -> tuple[TrainBatch, int]:
    """``batch`` (row i sampled as ``rollouts[i]``) with every loss position of the rows older than ``max_staleness`` versions switched off (never
    trained on), and how many rows that was. Only a rollout actor that restarted and has not yet rejoined the
    collective weight sync can produce such rows; the pipeline's gate never does."""
    if version is None or max_staleness is None:
        return batch, 0
    old = torch.tensor([chain_staleness(r, version, models) > max_staleness for r in rollouts], dtype=torch.bool)
    if not bool(old.any()):
        return batch, 0
    keep = ~old
    return replace(batch, loss_mask=batch.loss_mask & keep[:, None], advantages=batch.advantages * keep[:, None],
                   step_advantages=batch.step_advantages * keep[:, None],
                   step_mask=batch.step_mask & keep[:, None]
                   ), int(old.sum())


def stale_rows(m: MicroBatch, version: int, model: str) -> Tensor:
    """(B,) bool: the real rows of ``m`` sampled by an older ``model`` than ``version``."""
    attr = "policy_version" if model == "policy" else "diffusion_version"
    return torch.tensor([m.real and getattr(r, attr) < version for r in m.rollouts], dtype=torch.bool)


def corrections(ctx: RankContext, grpo: GRPOConfig, micro: Sequence[MicroBatch], version: Optional[int],
                train_text: bool, train_image: bool) -> tuple[list[Correction], dict[str, float]]:
    """Per micro-batch Correction, and the step's ``staleness_max`` / ``off_policy_chains`` of the chains it trains
    on (identical on every rank). ``version``: the learner's policy version before this update (None: on-policy)."""
    models = [name for name, on in (("policy", train_text), ("diffusion", train_image)) if on]
    trained = [r for m in micro if m.real for r, on in zip(m.rollouts, _trained_rows(m.batch)) if on]
    ages = [chain_staleness(r, version, models) for r in trained] if version is not None else []
    stale_total, = ctx.all_reduce([sum(a > 0 for a in ages)])
    age_max, = ctx.all_reduce([max(ages, default=0)], "max")
    metrics = {"staleness_max": age_max, "off_policy_chains": stale_total}
    engine = train_text and grpo.engine_correction == "tis"
    clip = (grpo.clip_low, grpo.clip_high)
    out = []
    for m in micro:  # every rank has stale rows or not alike: all of them then use the weighted losses
        real = torch.tensor([m.real] * len(m.rollouts), dtype=torch.bool)
        stale_text = stale_rows(m, version, "policy") if train_text and version is not None else None
        on_policy = real & ~stale_text if stale_text is not None else real
        text_rows = real if engine else (stale_text if stale_total > 0 else None)
        step_stale = (stale_rows(m, version, "diffusion") if train_image and stale_total > 0 and version is not None
                      else None)
        out.append(Correction(grpo.tis_cap, text_rows, step_stale, on_policy if train_text else None, clip))
    return out, metrics


def tis_metrics(ctx: RankContext, fixes: Sequence[Correction]) -> dict[str, float]:
    """``tis_{text,image}_ratio_mean`` / ``_truncated_fraction`` over the corrected tokens and ``engine_logp_gap`` /
    ``engine_ratio_mean`` / ``engine_clip_fraction`` over the on-policy ones, over ranks (a collective on every
    rank alike)."""
    totals = dict(zip(_SUMS, ctx.all_reduce([sum(f.sums[k] for f in fixes) for k in _SUMS])))
    out = {}
    for kind in ("text", "image"):
        if totals[f"{kind}_tokens"] > 0:
            out[f"tis_{kind}_ratio_mean"] = totals[f"{kind}_ratio"] / totals[f"{kind}_tokens"]
            out[f"tis_{kind}_truncated_fraction"] = totals[f"{kind}_truncated"] / totals[f"{kind}_tokens"]
    if totals["gap_tokens"] > 0:
        out["engine_logp_gap"] = totals["gap_abs"] / totals["gap_tokens"]
        out["engine_ratio_mean"] = totals["gap_ratio"] / totals["gap_tokens"]
        out["engine_clip_fraction"] = totals["gap_clipped"] / totals["gap_tokens"]
    return out


def _trained_rows(batch: TrainBatch) -> list[bool]:
    """Rows with a loss position (not dropped by ``drop_too_stale``, not padding)."""
    return (batch.loss_mask.any(1) | batch.step_mask.any(1)).tolist()
