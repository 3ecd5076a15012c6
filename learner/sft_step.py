"""The supervised cold start on one learner rank (records from ``data.sft_targets``): text cross-entropy on the
target tokens / global target-token count, plus the SR pipeline's denoising MSE over every stage triple /
global triple count; one optimizer step per call. Same micro-batching (equal count on every rank), clipping and
LR schedule as the GRPO step; frozen models are skipped.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from core.grpo import build_train_batch, gather_token_log_probs, token_mean
from data.sft_targets import to_rollout
from learner import engine as eng
from learner.batching import MicroBatch, add, micro_batches, reduce_sums
from learner.rank import Rank
from learner.scoring import policy_logits


def sft_step(w: Rank, records: Sequence[Any]) -> dict[str, float]:
    """One supervised step on this rank's ``SFTRecord``s. Returns metrics aggregated over all ranks."""
    if w.sft is None:
        raise ValueError("sft_step: this learner was built without the sft config "
                         "(LearnerWorker(..., sft=cfg.sft), or a config with mode: sft)")
    t0 = time.perf_counter()
    micro, global_tokens = target_micro_batches(w, records)
    real = micro[0].real
    local_images = sum(len(r.stages) for r in records) if real else 0
    global_images, global_records = w.all_reduce([local_images, len(records) if real else 0])
    train_text = "policy" in w.engines and global_tokens > 0
    train_image = "diffusion" in w.engines and global_images > 0

    sums: dict[str, float] = {}
    lrs = {name: eng.current_lr(e) for name, e in w.engines.items()}
    for k, m in enumerate(micro):
        if train_text:
            text_cross_entropy(w, m, global_tokens, sums, w.sft.text_loss_weight)
        if train_image:
            seed = ((w.optimizer_steps * 1009 + w.rank) * 1013 + k) % (2**31 - 1)
            _denoising_loss(w, m, global_images, sums, seed)
    norms: dict[str, float] = {}
    for name, e in w.engines.items():
        if (name == "policy" and train_text) or (name == "diffusion" and train_image):
            e.step()
            norms[name] = eng.grad_norm(e)
    w.optimizer_steps += int(bool(norms))

    totals = reduce_sums(sums, w.all_reduce)
    out: dict[str, float] = {"tokens": global_tokens, "images": global_images, "records": global_records,
                             "optimizer_steps": w.optimizer_steps}
    if "text_loss" in totals:
        out["text_loss"] = totals["text_loss"]
        out["token_accuracy"] = totals["correct_tokens"] / global_tokens
    if "image_loss" in totals:
        out["image_loss"] = totals["image_loss"]
    for name in w.engines:
        if name in norms:
            out[f"{name}_grad_norm"] = norms[name]
        out[f"{name}_lr"] = lrs[name]
    out["seconds"] = time.perf_counter() - t0
    return out


def target_micro_batches(w: Rank, records: Sequence[Any]) -> tuple[list[MicroBatch], float]:
    """``SFTRecord``s -> micro-batches, as many on every rank (padding copies carry no loss), and the global
    count of target tokens. All records weigh 1.0 (data) or all 0.0 (a rank's padding copy)."""
    if not records:
        raise ValueError("sft_step: no records (a rank without data gets a zero-weight copy)")
    weights = {float(r.weight) for r in records}
    if not weights <= {0.0, 1.0} or len(weights) != 1:
        raise ValueError(f"sft_step: record weights must be all 1.0 (data) or all 0.0 (a padding copy), "
                         f"got {sorted(weights)}")
    rollouts = [to_rollout(r) for r in records]
    pad_id = w.tokens.tokenizer.pad_token_id if w.tokens is not None else 0
    batch = build_train_batch(rollouts, torch.zeros(len(rollouts)), pad_token_id=pad_id or 0)
    w.validate_shard(batch, rollouts)
    micro = micro_batches(batch, rollouts, w.cfg.micro_batch_size, w.all_reduce, records, real=weights == {1.0})
    (global_tokens,) = w.all_reduce([batch.num_tokens])
    return micro, global_tokens


def text_cross_entropy(w: Rank, m: MicroBatch, global_tokens: float, sums: dict[str, float],
                       weight: float) -> None:
    """Cross-entropy on the micro-batch's target tokens / ``global_tokens``, times ``weight``; backward."""
    policy = w.engines["policy"]
    mb = m.batch
    logits, start = policy_logits(policy, w.tokens, mb, m.rollouts, w.device)  # (B, L - start, V)
    ids = mb.input_ids.to(w.device)[:, start:]  # (B, L - start)
    mask = mb.loss_mask.to(w.device)[:, start:]
    logp = gather_token_log_probs(logits, ids, 1.0)  # (B, L - start), entry t: log p(ids[t] | < t)
    logp = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))
    text_loss = token_mean(-logp, mask, global_tokens)
    policy.backward(weight * text_loss * eng.dp_loss_scale(), scale_wrt_gas=False)
    with torch.no_grad():
        correct = (logits[:, :-1].argmax(-1) == ids[:, 1:]) & mask[:, 1:].bool()  # logit t predicts t+1
    add(sums, "text_loss", text_loss.item())
    add(sums, "correct_tokens", float(correct.sum()))


def _denoising_loss(w: Rank, m: MicroBatch, global_images: float, sums: dict[str, float],
                    seed: int) -> None:
    """One forward per stage size over the micro-batch (the same count on every rank: ZeRO-3 gathers per
    forward), one backward; a padding micro-batch runs it at weight 0."""
    diffusion = w.engines["diffusion"]
    groups: dict[tuple, list[Any]] = {}
    for r in m.records:
        for st in r.stages:
            groups.setdefault((st.stage, st.target.shape, st.condition.shape), []).append(st)
    generator = torch.Generator().manual_seed(seed)
    dropout = 0.1 if w.diffusion_cfg.guidance_scale != 1.0 else 0.0  # CFG needs an unconditional model
    loss = None
    for stages in groups.values():
        mse = diffusion(stages=stages, generator=generator, noise_level=w.diffusion_cfg.noise_level,
                        prompt_dropout=dropout)
        part = mse * (len(stages) / global_images if m.real else 0.0)  # mean over the global triple count
        loss = part if loss is None else loss + part
    diffusion.backward(w.sft.image_loss_weight * loss * eng.dp_loss_scale(), scale_wrt_gas=False)
    add(sums, "image_loss", loss.item())
