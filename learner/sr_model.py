"""The SR diffusion model as one learner rank trains it: its DeepSpeed engine (the ``TraceScorer`` over the
pipeline's UNet and text encoder), the frozen base model the image KL is taken to, and its losses: the GRPO image
objective of ``grpo.image_objective`` (``learner.image_objectives``) and the cold start's denoising MSE.

Built once by ``TrainedSR.build``; the steps call it and never reach into its parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from core.config import DiffusionConfig, GRPOConfig, LearnerConfig
from core.dtypes import torch_dtype
from core.grpo import image_objective
from learner import engine as eng
from learner import image_objectives
from learner.batching import MicroBatch, add
from learner.rank import RankContext
from learner.scoring import TraceScorer, load_sr_pipeline, stage_columns
from models import lora


def _frozen(pipeline: Any) -> None:
    """The VAE and anything outside a TraceScorer stay frozen."""
    for module in pipeline.components.values():
        if isinstance(module, nn.Module):
            module.requires_grad_(False)


@dataclass
class TrainedSR:
    cfg: DiffusionConfig
    ctx: RankContext
    engine: Any  # DeepSpeed engine of the TraceScorer
    lora: Optional[dict[str, float]]  # adapted layer -> scaling (diffusion.lora), None without adapters
    reference: Any  # the frozen base model's SRTraining (grpo.image_kl_beta > 0), else None
    kl_beta: float  # grpo.image_kl_beta
    objective: tuple[str, dict[str, Any]]  # grpo.image_objective: registered name and options
    clip: tuple[float, float]  # the denoising steps' clip range (image_objectives.image_clip)

    @classmethod
    def build(cls, diffusion: DiffusionConfig, learner: LearnerConfig, grpo: GRPOConfig, ctx: RankContext,
              optimizer_total: int) -> "TrainedSR":
        """The SR pipeline's trained parts under DeepSpeed (``diffusion.lora``) and the frozen base model when
        ``grpo.image_kl_beta`` > 0 (the adapters switched off, or a second copy)."""
        dtype = torch_dtype(learner.dtype)
        pipeline = load_sr_pipeline(diffusion.path)
        pipeline.to(ctx.device)
        _frozen(pipeline)
        scorer = TraceScorer(pipeline).to(dtype).requires_grad_(True).train()
        scaling = lora.add_lora(scorer, diffusion.lora, "diffusion.lora") if diffusion.lora is not None else None
        engine = eng.build_engine(scorer, learner.diffusion_optim, learner, optimizer_total,
                                  "learner.diffusion_optim")
        reference = None
        if grpo.image_kl_beta > 0 and diffusion.lora is not None:
            reference = lora.BasePipeline(scorer.sr, scorer)
        elif grpo.image_kl_beta > 0:
            base = load_sr_pipeline(diffusion.path)
            base.to(ctx.device)
            frozen = TraceScorer(base).to(dtype)  # the trained components' dtype, as above
            _frozen(base)
            reference = frozen.sr
        return cls(diffusion, ctx, engine, scaling, reference, grpo.image_kl_beta, image_objective(grpo.image_objective),
                   image_objectives.image_clip(grpo))

    def passes(self, micro: Sequence[MicroBatch]) -> list[int]:
        """Per micro-batch, how many image backward passes it runs (its trained steps over all stages): 0 where
        any rank has no traces to re-score. ZeRO's collectives run per backward, so every rank must run the same
        number: a mismatch is an error on every rank, never a hang."""
        local = [sum(len(image_objectives.trained_steps(self.cfg, c)) for c in stage_columns(m.rollouts))
                 for m in micro]
        low, high = self.ctx.all_reduce(local, "min"), self.ctx.all_reduce(local, "max")
        if low != high:
            raise RuntimeError(f"learner ranks disagree on the image passes per micro-batch: {low} vs {high}")
        return [int(n) for n in low]

    def objective_for_update(self, seed: int) -> image_objectives.ImageObjective:
        """This update's objective (it may keep state across the update's epochs); ``seed``: the update's first
        optimizer step, for objectives that draw noise."""
        name, options = self.objective
        return image_objectives.OBJECTIVES[name](self, seed, **options)

    def denoising_loss(self, m: MicroBatch, global_images: float, sums: dict[str, float], seed: int,
                       weight: float) -> None:
        """The cold start's MSE: one forward per stage size over the micro-batch (the same count on every rank:
        ZeRO-3 gathers per forward), one backward, times ``weight``; a padding micro-batch runs it at weight 0."""
        groups: dict[tuple, list[Any]] = {}
        for r in m.records:
            for st in r.stages:
                groups.setdefault((st.stage, st.target.shape, st.condition.shape), []).append(st)
        generator = torch.Generator().manual_seed(seed)
        dropout = 0.1 if self.cfg.guidance_scale != 1.0 else 0.0  # CFG needs an unconditional model
        loss = None
        for stages in groups.values():
            mse = self.engine(stages=stages, generator=generator, noise_level=self.cfg.noise_level,
                              prompt_dropout=dropout)
            part = mse * (len(stages) / global_images if m.real else 0.0)  # mean over the global triple count
            loss = part if loss is None else loss + part
        self.engine.backward(weight * loss * eng.dp_loss_scale(), scale_wrt_gas=False)
        add(sums, "image_loss", loss.item())
