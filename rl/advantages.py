"""One GRPO step's advantages from its scores, as the config asks for them (no Ray: the drivers share it)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from core import grpo
from core.chain import DEGRADATION_ITEMS, TEXT_TAGS
from core.config import ExperimentConfig
from core.records import Scores
from rewards.total import metric_weights


def step_rewards(cfg: ExperimentConfig, scores: Sequence[Scores]) -> grpo.StepRewards:
    """What the estimators read of one step: ``scores`` (in group order), the reward weights, G, and the image
    branches' parts when ``grpo.image_group_size`` > 1."""
    g = cfg.grpo
    return grpo.StepRewards(parts=[s.parts for s in scores], totals=[s.total for s in scores],
                            weights=vars(cfg.reward.weights), group_size=g.group_size,
                            branches=[s.branches for s in scores] if g.image_group_size > 1 else None,
                            metric_weights=metric_weights(cfg.reward))


def advantage_plan(cfg: ExperimentConfig, step: grpo.StepRewards) -> grpo.AdvantagePlan:
    """The columns ``step`` has under ``cfg.grpo``, each normalised by ``grpo`` (``decoupled`` with
    ``decoupled_normalization``) with ``scale_by_std`` and ``eps``: the text (``text_rewards``); the images when the
    SR model trains (not ``diffusion.freeze``): one column per image branch when the step has M > 1 of them, else
    a column of their own when ``image_rewards`` differs from ``text_rewards`` (otherwise they share the text's, as
    in the paper); with ``section_rewards`` each of ``TEXT_TAGS``' sections (one it does not name learns from
    ``text_rewards``); with ``token_credit.degradation_items`` each degradation item, from its
    ``degradation/<item>`` part alone. Then the ``advantage_transforms``."""
    g = cfg.grpo
    options = {"scale_by_std": g.scale_by_std, "eps": g.eps}
    estimator = {"name": "decoupled" if g.decoupled_normalization else "grpo", **options}
    column = lambda name, names: grpo.AdvantageColumn(name, _names(names), estimator)  # noqa: E731
    columns = [column("text", g.text_rewards)]
    train_images = not cfg.diffusion.freeze
    if train_images and step.num_branches <= 1 and _names(g.image_rewards) != _names(g.text_rewards):
        columns.append(column("image", g.image_rewards))
    if g.section_rewards:
        unknown = sorted(set(g.section_rewards) - set(TEXT_TAGS))
        if unknown:
            raise ValueError(f"section_rewards names {unknown}, not sections of {list(TEXT_TAGS)}")
        named = {tag: g.section_rewards.get(tag) for tag in TEXT_TAGS}
        columns += [column(f"section/{tag}", g.text_rewards if names is None else names)
                    for tag, names in named.items()]
    if g.token_credit.get("degradation_items", False):
        columns += [column(f"item/{item}", [f"degradation/{item}"]) for item in DEGRADATION_ITEMS]
    if train_images and step.num_branches > 1:
        columns.append(grpo.AdvantageColumn("image_branches", _names(g.image_rewards), {
            "name": "image_branches", "decoupled": g.decoupled_normalization, **options}))
    return grpo.AdvantagePlan(tuple(columns), tuple(g.advantage_transforms))


def _names(components: Sequence[str] | None) -> tuple[str, ...] | None:
    return None if components is None else tuple(components)


def step_advantages(cfg: ExperimentConfig, scores: Sequence[Scores], seed: int) -> grpo.ChainAdvantages:
    """``core.grpo.estimate_advantages`` of ``scores`` (in group order) with the plan of ``cfg``; ``seed``: the step's
    (the advantage transforms draw from it, so a run is reproducible and resumable)."""
    step = step_rewards(cfg, scores)
    return grpo.estimate_advantages(step, advantage_plan(cfg, step), torch.Generator().manual_seed(seed))


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
