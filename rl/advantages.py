"""One GRPO step's advantages from its scores, as the config asks for them (no Ray: the drivers share it)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from core import grpo
from core.chain import TEXT_TAGS
from core.config import ExperimentConfig
from core.records import Scores
from rewards.total import metric_weights


def step_advantages(cfg: ExperimentConfig, scores: Sequence[Scores], seed: int) -> grpo.ChainAdvantages:
    """``core.grpo.chain_advantages`` with every ``grpo.*`` knob of ``cfg``; ``scores`` in group order; ``seed``: the
    step's (the advantage transforms draw from it, so a run is reproducible and resumable)."""
    g = cfg.grpo
    return grpo.chain_advantages(
        [s.parts for s in scores], [s.total for s in scores], vars(cfg.reward.weights), g.group_size,
        text_rewards=g.text_rewards, image_rewards=g.image_rewards, section_rewards=g.section_rewards,
        section_tags=TEXT_TAGS, train_images=not cfg.diffusion.freeze, scale_by_std=g.scale_by_std, eps=g.eps,
        transforms=g.advantage_transforms, generator=torch.Generator().manual_seed(seed),
        branches=[s.branches for s in scores] if g.image_group_size > 1 else None,
        decoupled=g.decoupled_normalization, metric_weights=metric_weights(cfg.reward),
        degradation_items=bool(g.token_credit.get("degradation_items", False)))


def advantage_metrics(adv: grpo.ChainAdvantages, keep: torch.Tensor) -> dict[str, float]:
    """``grpo/*``: the spread of each advantage column and what the group filter kept."""
    out = {"grpo/advantage_mean": float(adv.text.mean()), "grpo/advantage_std": float(adv.text.std()),
           "grpo/advantage_abs_max": float(adv.text.abs().max()),
           "grpo/filtered_groups": float(adv.groups.num_filtered), "grpo/kept_chains": float(keep.sum())}
    image = adv.image_branches if adv.image_branches is not None else adv.image
    if image is not None:
        out.update({"grpo/image_advantage_std": float(image.std()),
                    "grpo/image_advantage_abs_max": float(image.abs().max())})
    if adv.sections is not None:
        out.update({f"grpo/{tag}_advantage_std": float(adv.sections[:, i].std()) for i, tag in enumerate(TEXT_TAGS)})
    if adv.items is not None:
        out["grpo/degradation_item_advantage_std"] = float(adv.items.std())
    return out
