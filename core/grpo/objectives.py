"""The image objectives: how the SR model learns from its images' advantages (``grpo.image_objective``).

``trajectory`` (the default, Flow-GRPO / DDPO): the clipped surrogate on the recorded denoising steps' Gaussian
log-probs (``core.grpo.losses.image_surrogate``). ``nft`` (DiffusionNFT, Zheng et al. 2025, "Online Diffusion
Reinforcement with Forward Process"): no likelihoods, only the clean images the sampler produced. Each image x_0 is
noised by the forward process to a trained timestep; the model's x_0 prediction f and the sampling policy's f_old at
that point define an implicit positive policy (1 - beta) f_old + beta f and an implicit negative one
(1 + beta) f_old - beta f; the loss pulls the positive one onto x_0 with weight r and the negative one with weight
1 - r, r the image's reward probability (its advantage mapped to [0, 1]). At f = f_old its gradient is
2 beta (2r - 1)(f_old - x_0) / scale: a regression towards the better images and away from the worse ones, with
the low variance of a supervised loss (the trajectory surrogate's gradient is a noise direction per step).

Pure torch, no config objects: ``image_objective`` turns a config entry into (name, options), and each name's
learner micro-step is ``learner.image_objectives``'.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch  # noqa: F401 (the doctests use it)
from torch import Tensor

from core.grpo.advantages import registry_entry


def trajectory() -> dict[str, float]:
    """The per-step clipped surrogate on recorded trajectories (no options: ``grpo.image_clip_range`` is its clip)."""
    return {}


def nft(beta: float = 1.0, adv_clip: float = 5.0) -> dict[str, Any]:
    """DiffusionNFT's forward-process objective: the implicit policies regress onto the sampled x_0. ``beta``: how
    far the implicit policies lie from the old one (it scales the gradient; 1 in the paper); ``adv_clip``:
    advantages are clipped to +-adv_clip and mapped to r = 0.5 + A / (2 adv_clip) (Flow-GRPO's adv_clip_max is 5)."""
    if not beta > 0:
        raise ValueError(f"nft: beta = {beta!r} must be > 0")
    if not adv_clip > 0:
        raise ValueError(f"nft: adv_clip = {adv_clip!r} must be > 0")
    return {"beta": float(beta), "adv_clip": float(adv_clip)}


IMAGE_OBJECTIVES = {"trajectory": trajectory, "nft": nft}


def image_objective(spec: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """A ``grpo.image_objective`` entry (``{name: nft, beta: 1.0}``) -> (name, options); unknown names or options
    are errors listing the known ones."""
    spec = spec or {"name": "trajectory"}
    fn, options = registry_entry(IMAGE_OBJECTIVES, spec, "image objective", 0)
    return str(spec["name"]), fn(**options)


def reward_probability(advantages: Tensor, adv_clip: float) -> Tensor:
    """DiffusionNFT's optimality probability of each image: clip(A, +-adv_clip) / (2 adv_clip) + 0.5, in [0, 1].

    >>> reward_probability(torch.tensor([-10.0, -1.0, 0.0, 2.5]), 5.0).tolist()
    [0.0, 0.4000000059604645, 0.5, 0.75]
    """
    return (advantages.clamp(-adv_clip, adv_clip) / adv_clip) / 2 + 0.5


@dataclass(frozen=True)
class NFTOutput:
    loss: Tensor  # (N,) per image: r * positive + (1 - r) * negative
    positive: Tensor  # (N,) the positive policy's normalised squared error, detached
    negative: Tensor  # (N,) the negative policy's, detached


def nft_loss(prediction: Tensor, old_prediction: Tensor, target: Tensor, reward_prob: Tensor, beta: float,
             min_scale: float = 1e-5) -> NFTOutput:
    """The forward-process loss of N images: prediction (N, ...) the model's x_0 at the noised images, with grad;
    old_prediction (N, ...) the sampling policy's there (detached); target (N, ...) the images' x_0; reward_prob
    (N,) in [0, 1].

    Each squared error is divided by its own mean absolute error (detached, at least ``min_scale``), DiffusionNFT's
    adaptive weighting: every image moves the weights by a comparable amount whatever its noise level.
    """
    if not (prediction.shape == old_prediction.shape == target.shape):
        raise ValueError(f"prediction {tuple(prediction.shape)}, old {tuple(old_prediction.shape)} and target "
                         f"{tuple(target.shape)} must match")
    if reward_prob.shape != prediction.shape[:1]:
        raise ValueError(f"reward_prob must be (N,) = ({prediction.shape[0]},), got {tuple(reward_prob.shape)}")
    pred, old, x0 = prediction.float(), old_prediction.detach().float(), target.detach().float()
    r = reward_prob.detach().float()
    dims = tuple(range(1, pred.dim()))

    def normalised(error: Tensor) -> Tensor:
        scale = error.detach().abs().mean(dim=dims, keepdim=True).clamp_min(min_scale)
        return (error ** 2 / scale).mean(dim=dims)

    positive = normalised((1 - beta) * old + beta * pred - x0)
    negative = normalised((1 + beta) * old - beta * pred - x0)
    return NFTOutput(loss=r * positive + (1 - r) * negative, positive=positive.detach(), negative=negative.detach())
