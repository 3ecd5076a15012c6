"""The image objectives on a learner rank: how a micro-batch's images and their advantages become the SR model's
backward passes (``grpo.image_objective``).

``core.grpo.IMAGE_OBJECTIVES`` names each objective and validates its options; ``OBJECTIVES`` here maps the same
names to the class that carries its learner micro-step, so ``learner.grpo_step`` runs whichever the config names
without a branch on its name. ``learner.sr_model.TrainedSR.objective_for_update`` builds one per update over the SR
model it trains: an objective may keep state across the update's epochs. Each runs one backward per trained (stage, step) of the micro-batch, over every chain and image branch
(memory holds one step's UNet graph, as in Flow-GRPO):

    trajectory  re-score that denoising step of every trace -> clipped surrogate / global step count (Flow-GRPO)
    nft         the sampled images of that stage noised to the step's timestep -> DiffusionNFT's loss

Both add ``grpo.image_kl_beta`` x their KL to the frozen base SR model (``TrainedSR.reference``) when it is held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from core.config import DiffusionConfig, GRPOConfig
from core.grpo import IMAGE_OBJECTIVES, image_surrogate, nft_loss, reward_probability, token_mean
from core.grpo import trained_steps as _trained_steps
from learner import engine as eng
from learner.batching import MicroBatch, accumulate, add
from learner.off_policy import Correction
from learner.scoring import StageColumns, stage_columns

if TYPE_CHECKING:
    from learner.sr_model import TrainedSR


def trained_steps(d: DiffusionConfig, stage: StageColumns) -> range:
    """The steps of a stage's traces that get an image loss (``diffusion.train_steps_fraction`` / ``_start``)."""
    return _trained_steps(stage.num_steps, d.train_steps_fraction, d.train_steps_start)


def image_clip(g: GRPOConfig) -> tuple[float, float]:
    """(clip_low, clip_high) of the denoising steps' ratio: ``grpo.image_clip_range`` both ways, else the text's."""
    if g.image_clip_range is None:
        return g.clip_low, g.clip_high
    return g.image_clip_range, g.image_clip_range


class ImageObjective:
    """One update's image objective. ``ratio``: it re-scores the recorded steps, so its first epoch's image ratio is
    the on-policy check (``image_first_epoch_ratio_mean``); ``per_step_metrics``: the sums it adds, reported as
    means per trained image step."""

    ratio = False
    per_step_metrics: tuple[str, ...] = ()

    def __init__(self, sr: "TrainedSR", seed: int):
        self.sr = sr

    def micro_step(self, m: MicroBatch, index: int, fix: Correction, global_steps: float,
                   sums: dict[str, float], extremes: dict[str, float]) -> None:
        """The backward passes of micro-batch ``m`` (number ``index`` of this rank's update), each loss divided by
        ``global_steps``; metrics into ``sums`` / ``extremes``."""
        raise NotImplementedError


class Trajectory(ImageObjective):
    """The clipped surrogate on the recorded denoising steps' Gaussian log-probs (``core.grpo.image_surrogate``),
    with the stale chains' off-policy correction; clipped at ``grpo.image_clip_range``."""

    ratio = True

    def micro_step(self, m: MicroBatch, index: int, fix: Correction, global_steps: float,
                   sums: dict[str, float], extremes: dict[str, float]) -> None:
        """That step of every chain of the micro-batch, and of each of its image branches (``grpo.image_group_size``),
        re-scored in one UNet call."""
        sr, mb, B = self.sr, m.batch, len(m.rollouts)
        device = sr.ctx.device
        for stage in stage_columns(m.rollouts):
            traces = [r.traces[j] for j in stage.traces for r in m.rollouts]  # branch-major: (M * B)
            for k in trained_steps(sr.cfg, stage):
                cols = [o + k for o in stage.offsets]  # (M,) step columns of this step in each branch
                kl = None
                if sr.reference is None:
                    logp = sr.engine(traces, step_indices=[k])  # (M * B, 1) with grad
                else:
                    logp, kl = sr.engine(traces, step_indices=[k], reference=sr.reference)
                logp = logp.float().view(len(cols), B).T  # (B, M)
                fixes = [fix.step(c, logp[:, b:b + 1], mb.step_old_log_probs, mb.step_mask)
                         for b, c in enumerate(cols)]
                old = torch.cat([o for o, _ in fixes], dim=1).to(device)
                weights = None if fixes[0][1] is None else torch.cat([wt for _, wt in fixes], dim=1).to(device)
                mask = mb.step_mask[:, cols].to(device)
                out = image_surrogate(logp, old, mb.step_advantages[:, cols].to(device), sr.clip[0], sr.clip[1], mask,
                                      weights)
                loss = image_loss = token_mean(out.loss, mask, global_steps)
                if kl is not None:
                    image_kl = token_mean(kl.float().view(len(cols), B).T, mask, global_steps)
                    loss = loss + sr.kl_beta * image_kl
                    add(sums, "image_kl", image_kl.item())
                sr.engine.backward(loss * eng.dp_loss_scale(), scale_wrt_gas=False)
                add(sums, "image_loss", image_loss.item())
                accumulate(sums, extremes, "image", out.metrics)


class NFT(ImageObjective):
    """DiffusionNFT's forward-process loss on the sampled images (``core.grpo.nft_loss``): no likelihoods, so no
    ratio and no off-policy correction. The forward-process noise is seeded by (the update's first optimizer step,
    the micro-batch's index, stage, step), so later update epochs see the same noised images and keep the first
    epoch's predictions as the sampling policy's. Reports its two losses (``nft_positive``, ``nft_negative``)."""

    per_step_metrics = ("nft_positive", "nft_negative")

    def __init__(self, sr: "TrainedSR", seed: int, beta: float, adv_clip: float):
        super().__init__(sr, seed)
        self.beta, self.adv_clip = beta, adv_clip
        self.seed = seed  # this update's noise, the same in every epoch
        self.old: dict[tuple, Tensor] = {}  # the first epoch's predictions, the sampling policy's, for later epochs

    def micro_step(self, m: MicroBatch, index: int, fix: Correction, global_steps: float,
                   sums: dict[str, float], extremes: dict[str, float]) -> None:
        """The sampled image of each stage of every chain and image branch, noised to each trained step."""
        sr, mb = self.sr, m.batch
        device = sr.ctx.device
        for s, stage in enumerate(stage_columns(m.rollouts)):
            traces = [r.traces[j] for j in stage.traces for r in m.rollouts]  # branch-major: (M * B)
            for k in trained_steps(sr.cfg, stage):
                key = (self.seed, index, s, k)
                generator = torch.Generator().manual_seed(hash(key) % 2**31)
                prediction, x0, ref = sr.engine(traces, forward_step=k, generator=generator, reference=sr.reference)
                previous = self.old.setdefault(key, prediction.detach())
                cols = [o + k for o in stage.offsets]
                adv = mb.step_advantages[:, cols].T.reshape(-1).to(device)  # (M * B), branch-major like the traces
                mask = mb.step_mask[:, cols].T.reshape(-1).to(device)
                out = nft_loss(prediction, previous, x0, reward_probability(adv, self.adv_clip), self.beta)
                loss = image_loss = token_mean(out.loss, mask, global_steps)
                if ref is not None:  # the base model's x_0 prediction at the same noised images: an MSE to it
                    image_kl = token_mean((prediction.float() - ref.float()).pow(2).flatten(1).mean(1), mask,
                                          global_steps)
                    loss = loss + sr.kl_beta * image_kl
                    add(sums, "image_kl", image_kl.item())
                sr.engine.backward(loss * eng.dp_loss_scale(), scale_wrt_gas=False)
                add(sums, "image_loss", image_loss.item())
                for name, value in (("nft_positive", out.positive), ("nft_negative", out.negative)):
                    add(sums, name, float((value * mask).sum()))


OBJECTIVES: dict[str, type[ImageObjective]] = {"trajectory": Trajectory, "nft": NFT}
if set(OBJECTIVES) != set(IMAGE_OBJECTIVES):  # a rule core.grpo validates must have a learner step, and back
    raise ImportError(f"learner.image_objectives has {sorted(OBJECTIVES)}, core.grpo.IMAGE_OBJECTIVES "
                      f"{sorted(IMAGE_OBJECTIVES)}")

