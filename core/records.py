"""Records that cross process boundaries (driver <-> rollout <-> reward <-> learner).

Plain dataclasses with shape comments; required fields stay required. Images travel as uint8 HWC numpy
arrays (cheap to pickle, unambiguous range); tensors are CPU torch tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch


@dataclass(frozen=True)
class DegradationLabels:
    """What the degradation pipeline applied to one HR image, as the policy should state it."""

    levels: dict[str, str]  # item -> none|light|medium|heavy, items in data.degradations.ITEMS order
    params: dict[str, object]  # the raw sampled parameters (kernel sigmas, scales, noise sigma, jpeg quality...)


@dataclass(frozen=True)
class Sample:
    """One prompt: an LR image synthesised from an HR crop, with its ground truth."""

    prompt_id: int  # unique within a run: the data cursor position that produced it
    image_id: str  # source image name (file stem or skimage name)
    lr: np.ndarray  # (h, w, 3) uint8
    hr: Optional[np.ndarray]  # (H, W, 3) uint8, H = h * scale; None for real LR without HR
    tags: tuple[str, ...]  # ground-truth content tags for the understanding reward
    degradation: Optional[DegradationLabels]  # None for real LR images


@dataclass(frozen=True)
class DiffusionTrace:
    """One SR stage of one chain: the sampler's trajectory, re-scorable by the learner."""

    stage: str  # "rough" | "middle" | "final"
    latents: torch.Tensor  # (S+1, C, H, W) x_T ... x_0 (pixel space when the model has no VAE)
    log_probs: torch.Tensor  # (S,) Gaussian log-prob of each transition, mean over elements, at sampling time
    timesteps: torch.Tensor  # (S,) scheduler timesteps
    condition: torch.Tensor  # (3, H, W) the upsampled conditioning image in [-1, 1], noise_level noise already
    #                          added: exactly the UNet's extra input channels (H, W = latent size with a VAE)
    text_ids: torch.Tensor  # (L,) tokens of the stage's understanding text for the diffusion text encoder
    noise_level: int  # noise added to the conditioning image
    eta: float = 1.0  # DDIM eta the trajectory was sampled with (the learner re-scores with the same)
    guidance_scale: float = 1.0  # classifier-free guidance used at sampling time; 1.0 = off


@dataclass
class Rollout:
    """One sampled VLCoT chain."""

    prompt_id: int
    sample_index: int  # 0..G-1 within the group
    policy_version: int
    diffusion_version: int
    prompt_ids: torch.Tensor  # (P,) prompt tokens, the LR image's vision tokens included
    token_ids: torch.Tensor  # (T,) completion: generated text + inserted image blocks
    text_mask: torch.Tensor  # (T,) 1 on tokens the policy sampled, 0 on inserted image blocks
    log_probs: torch.Tensor  # (T,) sampling log-probs, 0 where text_mask is 0
    text: str  # the chain as text, each image shown as core.chain.IMAGE_PLACEHOLDER
    images: dict[str, np.ndarray]  # stage -> (H, W, 3) uint8
    context_images: list[np.ndarray]  # images fed to the policy in token order: LR, rough, middle
    traces: tuple[DiffusionTrace, ...]
    timings: dict[str, float] = field(default_factory=dict)
    finish_reasons: tuple[str, ...] = ()  # per text turn: "stop" (closing tag) | "length" | "eos"
    # grpo.image_group_size M > 1: the stage images (stage -> (H, W, 3) uint8) of image branches 1..M-1 (the chain's
    # texts, other diffusion noise; branch 0 is ``images``); ``traces`` then holds each branch's stage traces in
    # turn, branch 0's first
    branch_images: tuple[dict[str, np.ndarray], ...] = ()

    @property
    def image_branches(self) -> int:
        """How many image samples this chain has (1 + len(branch_images))."""
        return 1 + len(self.branch_images)

    @property
    def branch_finals(self) -> tuple[Optional[np.ndarray], ...]:
        """The final image of image branches 1..M-1 (None where a branch has none)."""
        return tuple(b.get("final") for b in self.branch_images)

    @classmethod
    def for_scoring(cls, prompt_id: int, sample_index: int, text: str,
                    images: Optional[dict[str, np.ndarray]] = None) -> "Rollout":
        """A chain known only by its text and images (external chains, reward tests and benchmarks):
        enough for the rewards, not for the learner (no tokens, no traces)."""
        one = torch.zeros(1)
        return cls(prompt_id=prompt_id, sample_index=sample_index, policy_version=0, diffusion_version=0,
                   prompt_ids=one.long(), token_ids=one.long(), text_mask=one, log_probs=one, text=text,
                   images=dict(images or {}), context_images=[], traces=())

    def scoring_view(self) -> "Rollout":
        """What the rewards read (text and every branch's stage images), without the tokens, the context images
        and the diffusion traces: the light record a reward actor fetches instead of the whole rollout."""
        view = Rollout.for_scoring(self.prompt_id, self.sample_index, self.text, self.images)
        view.policy_version, view.diffusion_version = self.policy_version, self.diffusion_version
        view.finish_reasons = self.finish_reasons
        view.branch_images = self.branch_images
        return view


@dataclass(frozen=True)
class Scores:
    """The reward of one chain, with every component kept for logging."""

    prompt_id: int
    sample_index: int
    parts: dict[str, float]  # format, degradation, understanding, generation, quality/<metric>, ...
    total: float  # the configured weighted sum
    errors: dict[str, str] = field(default_factory=dict)  # metric -> why it failed (scored by the documented rule)
    # grpo.image_group_size M > 1: per image branch (branch 0 first) the parts its final image decides
    # (generation, quality/<metric>); ``parts`` holds their means over the branches. (): one image per chain.
    branches: tuple[dict[str, float], ...] = ()


@dataclass(frozen=True)
class ChainAdvantage:
    """What the learner is told about one chain: its advantages, per part of the chain (core.grpo)."""

    text: float  # the text tokens' advantage (the chain's, in the paper)
    image: Optional[float] = None  # the diffusion steps'; None: the text's
    sections: Optional[tuple[float, ...]] = None  # one per core.chain.TEXT_TAGS section (section credit)
    image_branches: Optional[tuple[float, ...]] = None  # one per image branch (grpo.image_group_size > 1)
    items: Optional[tuple[float, ...]] = None  # one per core.chain.DEGRADATION_ITEMS (degradation item credit)
    # stage credit (grpo.image_credit stage): per stage before the final (core.chain.PROCESS_STAGES), the
    # advantage of each image branch's image at that stage (M values; 1 without branches)
    stages: Optional[tuple[tuple[float, ...], ...]] = None


@dataclass(frozen=True)
class WeightUpdate:
    """Where the learner put a new set of weights: serialised buckets (core.weights) in Ray's object store.

    The rollout group keeps the latest one, so a restarted rollout actor can catch up before it samples.
    """

    version: int  # policy version after the update (diffusion shares the counter)
    policy: tuple = ()  # ObjectRefs of safetensors bytes, HF parameter names; empty when the policy is frozen
    diffusion: tuple = ()  # ObjectRefs; names prefixed "unet." / "text_encoder."; empty when frozen
