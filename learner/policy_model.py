"""The policy as one learner rank trains it: its DeepSpeed engine, token layout, frozen reference and KL weight, and
its two losses (the GRPO text surrogate and the cold start's cross-entropy).

Built once by ``TrainedPolicy.build``; the steps (``learner.grpo_step``, ``learner.sft_step``) call its micro-steps
and never reach into its parts, and the checkpointer reads its engine, adapters and processor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from core.config import GRPOConfig, LearnerConfig, PolicyConfig
from core.grpo import ChainTags, TrainBatch, clipped_surrogate, gather_token_log_probs, k3_kl, needs_reference
from core.grpo import token_mean
from core.records import Rollout
from learner import engine as eng
from learner.batching import MicroBatch, accumulate, add
from learner.off_policy import Correction
from learner.rank import RankContext
from learner.scoring import policy_log_probs, policy_logits
from models import lora


def restrict_trainable(model: torch.nn.Module, patterns: Sequence[str]) -> list[str]:
    """Freeze every parameter whose name no pattern matches (``re.search``; ``policy.trainable``) and return
    the names left trainable. A pattern that matches no parameter is an error naming it."""
    names = [n for n, _ in model.named_parameters()]
    matched, unmatched = lora.match_names(names, patterns)
    if unmatched:
        raise ValueError(f"policy.trainable: {unmatched} match no parameter of {type(model).__name__}; "
                         f"its names look like {names[:2] + names[-2:]}")
    wanted = set(matched)
    kept = []
    for name, param in model.named_parameters():
        if name not in wanted:
            param.requires_grad_(False)
        elif param.requires_grad:  # (a parameter frozen before stays frozen)
            kept.append(name)
    return kept


@dataclass
class TrainedPolicy:
    cfg: PolicyConfig
    ctx: RankContext
    engine: Any  # DeepSpeed engine of the policy
    tokens: Any  # models.chain_tokens.ChainTokens: processor and token layout
    tags: ChainTags  # the chain tags' ids, for token credit
    lora: Optional[dict[str, float]]  # adapted layer -> scaling (policy.lora), None without adapters
    reference: Any  # the KL term's frozen policy (a second copy, or the adapters switched off); None at kl_beta 0
    kl_beta: float
    clip: tuple[float, float]  # (grpo.clip_low, grpo.clip_high)
    temperature: float  # the rollout's sampling temperature: log-probs are re-scored at it

    @classmethod
    def build(cls, policy: PolicyConfig, learner: LearnerConfig, grpo: GRPOConfig, ctx: RankContext,
              optimizer_total: int, temperature: float) -> "TrainedPolicy":
        """The trained policy under DeepSpeed (``policy.trainable``, ``policy.lora``, gradient checkpointing) and the
        KL term's frozen reference when ``grpo.kl_beta`` needs one."""
        from models.chain_tokens import ChainTokens
        from models.policy import load_policy

        tokens = ChainTokens.from_pretrained(policy.path)
        model = load_policy(policy.path, learner.dtype, str(ctx.device)).train()
        if policy.trainable is not None:
            restrict_trainable(model, policy.trainable)
        scaling = lora.add_lora(model, policy.lora, "policy.lora") if policy.lora is not None else None
        if policy.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            if policy.lora is not None:  # the embeddings are frozen: checkpointed blocks need an input grad
                model.enable_input_require_grads()
        engine = eng.build_engine(model, learner.policy_optim, learner, optimizer_total, "learner.policy_optim")
        reference = None
        if needs_reference(grpo.kl_beta):
            reference = (lora.BasePolicy(model) if policy.lora is not None else
                         load_policy(policy.path, learner.dtype, str(ctx.device)).requires_grad_(False))
        return cls(policy, ctx, engine, tokens, ChainTags.from_tokens(tokens), scaling, reference, grpo.kl_beta,
                   (grpo.clip_low, grpo.clip_high), temperature)

    @property
    def pad_id(self) -> int:
        return self.tokens.tokenizer.pad_token_id or 0

    def check_contexts(self, batch: TrainBatch, rollouts: Sequence[Rollout]) -> None:
        """Every row's image pads match its context images (the processor's layout), else a ValueError naming it."""
        for row, r in enumerate(rollouts):
            ids = batch.input_ids[row][batch.attention_mask[row]].tolist()
            try:
                self.tokens.check_context(ids, r.context_images)
            except ValueError as exc:
                raise ValueError(f"rollout prompt_id={r.prompt_id} sample_index={r.sample_index}: {exc}") from None

    def log_probs(self, m: MicroBatch, model: Any = None) -> torch.Tensor:
        """(B, L) log-probs of the micro-batch's tokens under the trained policy (with grad), or ``model``."""
        return policy_log_probs(self.engine if model is None else model, self.tokens, m.batch, m.rollouts,
                                self.ctx.device, self.temperature)

    def grpo_micro_step(self, m: MicroBatch, fix: Correction, global_tokens: float, sums: dict[str, float],
                        extremes: dict[str, float]) -> None:
        """The clipped surrogate on the micro-batch's text tokens (+ ``kl_beta`` x k3 KL to the reference), divided
        by the step's global token count; backward."""
        device, mb = self.ctx.device, m.batch
        logp = self.log_probs(m)
        old, weights = fix.text(logp, mb.old_log_probs, mb.loss_mask)
        old, adv, mask = (t.to(device) for t in (old, mb.advantages, mb.loss_mask))
        weights = None if weights is None else weights.to(device)
        out = clipped_surrogate(logp, old, adv, mask, self.clip[0], self.clip[1], weights)
        loss = text_loss = token_mean(out.loss, mask, global_tokens)
        if self.reference is not None:
            with torch.no_grad():
                ref_logp = self.log_probs(m, self.reference)
            kl = token_mean(k3_kl(logp, ref_logp), mask, global_tokens)
            loss = loss + self.kl_beta * kl
            add(sums, "kl", kl.item())
        self.engine.backward(loss * eng.dp_loss_scale(), scale_wrt_gas=False)
        add(sums, "text_loss", text_loss.item())
        accumulate(sums, extremes, "text", out.metrics)

    def cross_entropy(self, m: MicroBatch, global_tokens: float, sums: dict[str, float], weight: float) -> None:
        """Cross-entropy on the micro-batch's target tokens / ``global_tokens``, times ``weight``; backward."""
        device, mb = self.ctx.device, m.batch
        logits, start = policy_logits(self.engine, self.tokens, mb, m.rollouts, device)  # (B, L - start, V)
        ids = mb.input_ids.to(device)[:, start:]  # (B, L - start)
        mask = mb.loss_mask.to(device)[:, start:]
        logp = gather_token_log_probs(logits, ids, 1.0)  # (B, L - start), entry t: log p(ids[t] | < t)
        logp = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))
        text_loss = token_mean(-logp, mask, global_tokens)
        self.engine.backward(weight * text_loss * eng.dp_loss_scale(), scale_wrt_gas=False)
        with torch.no_grad():
            correct = (logits[:, :-1].argmax(-1) == ids[:, 1:]) & mask[:, 1:].bool()  # logit t predicts t+1
        add(sums, "text_loss", text_loss.item())
        add(sums, "correct_tokens", float(correct.sum()))
