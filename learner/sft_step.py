"""The supervised cold start on one learner rank (records from ``data.sft_targets``): text cross-entropy on the
target tokens / global target-token count (``TrainedPolicy.cross_entropy``), plus the SR pipeline's denoising MSE
over every stage triple / global triple count (``TrainedSR.denoising_loss``); one optimizer step per call. Same
micro-batching (equal count on every rank), clipping and LR schedule as the GRPO step; frozen models are skipped.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from core.config import SFTConfig
from core.grpo import build_train_batch
from data.sft_targets import to_rollout
from learner.batching import MicroBatch, micro_batches, reduce_sums
from learner.trained import TrainedModels


def sft_step(models: TrainedModels, sft: SFTConfig, records: Sequence[Any], optimizer_steps: int
             ) -> dict[str, float]:
    """One supervised step on this rank's ``SFTRecord``s. Returns metrics aggregated over all ranks,
    ``optimizer_steps`` the learner's count after the step (it was ``optimizer_steps`` before)."""
    t0 = time.perf_counter()
    ctx, policy, sr = models.ctx, models.policy, models.sr
    micro, global_tokens = target_micro_batches(models, records)
    real = micro[0].real
    local_images = sum(len(r.stages) for r in records) if real else 0
    global_images, global_records = ctx.all_reduce([local_images, len(records) if real else 0])
    train_text = policy is not None and global_tokens > 0
    train_image = sr is not None and global_images > 0

    sums: dict[str, float] = {}
    lrs = models.learning_rates()
    for k, m in enumerate(micro):
        if train_text:
            policy.cross_entropy(m, global_tokens, sums, sft.text_loss_weight)
        if train_image:
            seed = ((optimizer_steps * 1009 + ctx.rank) * 1013 + k) % (2**31 - 1)
            sr.denoising_loss(m, global_images, sums, seed, sft.image_loss_weight)
    stepped = [name for name, on in (("policy", train_text), ("diffusion", train_image)) if on]
    norms, skipped = models.step(stepped)
    optimizer_steps += int(bool(stepped) and skipped < len(stepped))

    totals = reduce_sums(sums, ctx.all_reduce)
    out: dict[str, float] = {"tokens": global_tokens, "images": global_images, "records": global_records,
                             "optimizer_steps": optimizer_steps, "skipped_updates": skipped}
    if "text_loss" in totals:
        out["text_loss"] = totals["text_loss"]
        out["token_accuracy"] = totals["correct_tokens"] / global_tokens
    if "image_loss" in totals:
        out["image_loss"] = totals["image_loss"]
    for name in models.trained():
        if name in norms:
            out[f"{name}_grad_norm"] = norms[name]
        out[f"{name}_lr"] = lrs[name]
    out["seconds"] = time.perf_counter() - t0
    return out


def target_micro_batches(models: TrainedModels, records: Sequence[Any]) -> tuple[list[MicroBatch], float]:
    """``SFTRecord``s -> micro-batches, as many on every rank (padding copies carry no loss), and the global
    count of target tokens. All records weigh 1.0 (data) or all 0.0 (a rank's padding copy)."""
    if not records:
        raise ValueError("sft_step: no records (a rank without data gets a zero-weight copy)")
    weights = {float(r.weight) for r in records}
    if not weights <= {0.0, 1.0} or len(weights) != 1:
        raise ValueError(f"sft_step: record weights must be all 1.0 (data) or all 0.0 (a padding copy), "
                         f"got {sorted(weights)}")
    rollouts = [to_rollout(r) for r in records]
    batch = build_train_batch(rollouts, torch.zeros(len(rollouts)), pad_token_id=models.pad_id)
    models.validate_shard(batch, rollouts)
    micro = micro_batches(batch, rollouts, models.micro_batch_size, models.ctx.all_reduce, records,
                          real=weights == {1.0})
    (global_tokens,) = models.ctx.all_reduce([batch.num_tokens])
    return micro, global_tokens
