"""The ``grpo`` and ``experimental`` sections' checks of ``core.validation.validate`` (split off to keep each module
short): the group, clip ranges and KL weights, the reward lists, and the registered rules, each entry checked by its
registry's own rule (``registry_entry``). ``f(key, value, why)`` raises the ConfigError naming key and value."""

from __future__ import annotations

from typing import Any

import torch

from core.chain import DEGRADATION_ITEMS, TEXT_TAGS
from core.grpo.advantages import advantage_transform
from core.grpo.credit import image_credit, token_credit
from core.grpo.objectives import image_objective


def validate_grpo(f: Any, cfg: Any) -> None:
    """grpo: the group, the clip ranges and KL weights, the image objective, the reward lists, the registered
    rules, and the image samples per chain."""
    g = cfg.grpo
    if g.group_size < 2:
        f("grpo.group_size", g.group_size, "GRPO needs at least 2 chains per group to normalise rewards")
    if g.prompts_per_step < 1:
        f("grpo.prompts_per_step", g.prompts_per_step, "must be >= 1")
    if not 0 <= g.clip_low < 1:
        f("grpo.clip_low", g.clip_low, "must be in [0, 1)")
    if g.clip_high < 0:
        f("grpo.clip_high", g.clip_high, "must be >= 0")
    if g.image_clip_range is not None and not 0 < g.image_clip_range < 1:
        f("grpo.image_clip_range", g.image_clip_range, "must be in (0, 1), or null for the text's clip range")
    if g.kl_beta < 0:
        f("grpo.kl_beta", g.kl_beta, "must be >= 0")
    if g.image_kl_beta < 0:
        f("grpo.image_kl_beta", g.image_kl_beta, "must be >= 0")
    _validate_image_objective(f, cfg)
    _validate_reward_lists(f, cfg)
    _validate_credit_and_transforms(f, cfg)
    _validate_image_credit(f, cfg)
    if g.update_epochs < 1:
        f("grpo.update_epochs", g.update_epochs, "must be >= 1")
    if not g.tis_cap >= 1:
        f("grpo.tis_cap", g.tis_cap, "must be >= 1 (the largest importance weight a stale token may get)")
    if g.engine_correction not in ("tis", "none"):
        f("grpo.engine_correction", g.engine_correction, "must be tis or none")
    if g.eps <= 0:
        f("grpo.eps", g.eps, "must be > 0")
    if g.image_group_size < 1:
        f("grpo.image_group_size", g.image_group_size, "must be >= 1 (1: one image per chain)")
    if g.image_group_size > 1 and cfg.diffusion.freeze:
        f("grpo.image_group_size", g.image_group_size, "the SR model is frozen (diffusion.freeze): extra image "
          "samples would train nothing")
    if g.image_group_size > 1 and not (cfg.reward.metrics or cfg.reward.full_reference):
        f("grpo.image_group_size", g.image_group_size, "no generation metric (reward.metrics / full_reference) tells "
          "the image samples of a chain apart")


def _validate_image_objective(f: Any, cfg: Any) -> None:
    """grpo.image_objective (an IMAGE_OBJECTIVES entry) and what goes with it: a trained SR model, its clip range."""
    g = cfg.grpo
    try:
        objective, _ = image_objective(g.image_objective)
    except (ValueError, TypeError) as exc:
        f("grpo.image_objective", dict(g.image_objective), str(exc))
    if objective != "trajectory" and cfg.diffusion.freeze:
        f("grpo.image_objective", dict(g.image_objective), "the SR model is frozen (diffusion.freeze): nothing learns "
          "from it")
    if objective != "trajectory" and g.image_clip_range is not None:
        f("grpo.image_clip_range", g.image_clip_range, f"the {objective} objective has no ratio to clip (it is the "
          "trajectory objective's)")
    if g.image_kl_beta > 0 and cfg.diffusion.freeze:
        f("grpo.image_kl_beta", g.image_kl_beta, "the SR model is frozen (diffusion.freeze): there is no update to "
          "penalise")


def _validate_reward_lists(f: Any, cfg: Any) -> None:
    """grpo.text_rewards / image_rewards / section_rewards name reward components (rewards.total) and sections."""
    g = cfg.grpo
    components = (list(vars(cfg.reward.weights)) + [f"format/{tag}" for tag in TEXT_TAGS]  # rewards.total
                  + [f"degradation/{item}" for item in DEGRADATION_ITEMS])
    reward_lists = {f"grpo.{key}": getattr(g, key) for key in ("text_rewards", "image_rewards")}
    for section, names in (g.section_rewards or {}).items():
        if section not in TEXT_TAGS:
            f("grpo.section_rewards", dict(g.section_rewards), f"{section!r} is not one of {list(TEXT_TAGS)}")
        reward_lists[f"grpo.section_rewards.{section}"] = names
    for key, names in reward_lists.items():
        for name in names or []:
            if name not in components:
                f(key, names, f"{name!r} is not one of {components}")


def _validate_credit_and_transforms(f: Any, cfg: Any) -> None:
    """grpo.token_credit (a TOKEN_CREDIT entry) with the section rewards it needs, and grpo.advantage_transforms
    (ADVANTAGE_TRANSFORMS entries, each tried once)."""
    g = cfg.grpo
    try:
        token_credit(g.token_credit)
    except ValueError as exc:
        f("grpo.token_credit", dict(g.token_credit), str(exc))
    for i, spec in enumerate(g.advantage_transforms):
        try:  # a dry run on a 2-chain group, so option values are checked too
            advantage_transform(spec)(torch.zeros(2, 1), 2, torch.Generator().manual_seed(0))
        except (ValueError, TypeError) as exc:
            f(f"grpo.advantage_transforms[{i}]", dict(spec), str(exc))
    name = g.token_credit.get("name")
    if (name == "section") != bool(g.section_rewards):
        f("grpo.section_rewards", g.section_rewards,
          "section rewards go with grpo.token_credit {name: section}, and section credit needs them "
          f"(token_credit is {dict(g.token_credit)})")
    items = g.token_credit.get("degradation_items", False)
    if not isinstance(items, bool):
        f("grpo.token_credit.degradation_items", items, "must be true or false")
    elif items and not cfg.reward.weights.degradation > 0:
        f("grpo.token_credit.degradation_items", items, "the items learn from the degradation reward, and "
          f"reward.weights.degradation is {cfg.reward.weights.degradation}")


def _validate_image_credit(f: Any, cfg: Any) -> None:
    """grpo.image_credit (an IMAGE_CREDIT entry); stage credit needs a trained SR model and its process rewards."""
    g = cfg.grpo
    try:
        image_credit(g.image_credit)
    except (ValueError, TypeError) as exc:
        f("grpo.image_credit", dict(g.image_credit), str(exc))
    if g.image_credit.get("name") != "stage":
        return
    if cfg.diffusion.freeze:
        f("grpo.image_credit", dict(g.image_credit), "the SR model is frozen (diffusion.freeze): no stage learns")
    if not cfg.reward.stage_metrics:
        f("grpo.image_credit", dict(g.image_credit), "stage credit judges the rough and middle images by "
          "reward.stage_metrics, and there are none")


def validate_experimental(f: Any, cfg: Any) -> None:
    """experimental.detail_gain_std: >= 0, and only with the nft objective (grpo.image_objective is valid here)."""
    objective, _ = image_objective(cfg.grpo.image_objective)
    gain = cfg.experimental.detail_gain_std
    if not gain >= 0:
        f("experimental.detail_gain_std", gain, "must be >= 0 (0: off)")
    if gain > 0 and objective != "nft":
        f("experimental.detail_gain_std", gain, f"the {objective} objective re-scores the sampled steps, whose "
          "recorded log-probs are of the image before its gain: exploring by gains needs grpo.image_objective nft")
