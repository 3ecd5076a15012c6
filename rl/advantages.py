"""One GRPO step's advantages from its scores, as the config asks for them (no Ray: the drivers share it)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from core import grpo
from core.chain import DEGRADATION_ITEMS, PROCESS_STAGES, TEXT_TAGS
from core.config import ExperimentConfig
from core.records import Scores
from rewards.total import metric_weights


def step_rewards(cfg: ExperimentConfig, scores: Sequence[Scores], group_size: int | None = None) -> grpo.StepRewards:
    """What the estimators read of one step: ``scores`` (in group order), the reward weights, G (``group_size``:
    another, for a group that lost chains), and the image branches' parts when ``grpo.image_group_size`` > 1."""
    g = cfg.grpo
    return grpo.StepRewards(parts=[s.parts for s in scores], totals=[s.total for s in scores],
                            weights=vars(cfg.reward.weights), group_size=group_size or g.group_size,
                            branches=[s.branches for s in scores] if g.image_group_size > 1 else None,
                            metric_weights=metric_weights(cfg.reward))


def advantage_plan(cfg: ExperimentConfig, step: grpo.StepRewards) -> grpo.AdvantagePlan:
    """The columns ``step`` has under ``cfg.grpo``, each normalised by ``grpo`` (``decoupled`` with
    ``decoupled_normalization``) with ``scale_by_std`` and ``eps``: the text (``text_rewards``); the images when the
    SR model trains (not ``diffusion.freeze``): one column per image branch when the step has M > 1 of them, else
    a column of their own when ``image_rewards`` differs from ``text_rewards`` (otherwise they share the text's, as
    in the paper); with ``section_rewards`` each of ``TEXT_TAGS``' sections (one it does not name learns from
    ``text_rewards``); with ``token_credit.degradation_items`` each degradation item, from its
    ``degradation/<item>`` part alone; with ``image_credit`` stage each stage before the final, from its image's
    ``generation/<stage>`` (per image branch when there are several). Then the ``advantage_transforms``."""
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
    branches = {"name": "image_branches", "decoupled": g.decoupled_normalization, **options}
    if train_images and step.num_branches > 1:
        columns.append(grpo.AdvantageColumn("image_branches", _names(g.image_rewards), branches))
    if train_images and g.image_credit.get("name") == "stage":
        columns += [grpo.AdvantageColumn(f"stage/{stage}", (f"generation/{stage}",),
                                         branches if step.num_branches > 1 else estimator)
                    for stage in PROCESS_STAGES]
    return grpo.AdvantagePlan(tuple(columns), tuple(g.advantage_transforms))


def _names(components: Sequence[str] | None) -> tuple[str, ...] | None:
    return None if components is None else tuple(components)


def step_advantages(cfg: ExperimentConfig, scores: Sequence[Scores], seed: int) -> grpo.ChainAdvantages:
    """``core.grpo.estimate_advantages`` of ``scores`` (in group order) with the plan of ``cfg``; ``seed``: the step's
    (the advantage transforms draw from it, so a run is reproducible and resumable).

    A chain whose reward could not be computed (a non-finite total: every metric of its generation reward failed)
    is left out of its group, never scored 0: each group that lost chains is estimated on its own over the chains it
    kept (every estimator is group-local), the lost ones get advantage 0 and ``scored`` False."""
    generator = torch.Generator().manual_seed(seed)
    scored = [math.isfinite(s.total) for s in scores]
    if all(scored):
        step = step_rewards(cfg, scores)
        return grpo.estimate_advantages(step, advantage_plan(cfg, step), generator)
    G = cfg.grpo.group_size
    parts = []  # (chain indices, group size): the complete groups together, then each group that lost chains
    complete = [i for g in range(0, len(scores), G) if all(scored[g:g + G]) for i in range(g, g + G)]
    if complete:
        parts.append((complete, G))
    for g in range(0, len(scores), G):
        kept = [i for i in range(g, g + G) if scored[i]]
        if 0 < len(kept) < G:
            parts.append((kept, len(kept)))
    estimates = []
    for rows, size in parts:
        step = step_rewards(cfg, [scores[i] for i in rows], group_size=size)
        estimates.append((rows, grpo.estimate_advantages(step, advantage_plan(cfg, step), generator)))
    return _assemble(len(scores), G, estimates, torch.tensor(scored))


def _assemble(n: int, group_size: int, estimates: Sequence[tuple[list[int], grpo.ChainAdvantages]],
              scored: torch.Tensor) -> grpo.ChainAdvantages:
    """The step's ChainAdvantages from estimates over subsets of its chains: rows not covered get 0; a group none
    of whose chains was scored counts as flat."""
    def column(name: str) -> torch.Tensor | None:
        found = [(rows, getattr(a, name)) for rows, a in estimates if getattr(a, name) is not None]
        if not found:
            return None
        out = torch.zeros((n, *found[0][1].shape[1:]), dtype=found[0][1].dtype)
        for rows, values in found:
            out[rows] = values
        return out

    flat = torch.ones(n // group_size, dtype=torch.bool)
    for rows, a in estimates:
        groups = sorted({i // group_size for i in rows})
        flat[groups] = a.groups.zero_variance
    keep = (~flat).repeat_interleave(group_size) & scored
    return grpo.ChainAdvantages(text=column("text"), image=column("image"), sections=column("sections"),
                                groups=grpo.GroupFilter(zero_variance=flat, keep=keep),
                                image_branches=column("image_branches"), items=column("items"), scored=scored,
                                stages=column("stages"))


def advantage_metrics(adv: grpo.ChainAdvantages, keep: torch.Tensor) -> dict[str, float]:
    """``grpo/*``: the spread of each advantage column and what the group filter kept."""
    out = {"grpo/advantage_mean": float(adv.text.mean()), "grpo/advantage_std": float(adv.text.std()),
           "grpo/advantage_abs_max": float(adv.text.abs().max()),
           "grpo/filtered_groups": float(adv.groups.num_filtered), "grpo/kept_chains": float(keep.sum()),
           "grpo/unscored_chains": float(0 if adv.scored is None else (~adv.scored).sum())}
    image = adv.image_branches if adv.image_branches is not None else adv.image
    if image is not None:
        out.update({"grpo/image_advantage_std": float(image.std()),
                    "grpo/image_advantage_abs_max": float(image.abs().max())})
    if adv.sections is not None:
        out.update({f"grpo/{tag}_advantage_std": float(adv.sections[:, i].std()) for i, tag in enumerate(TEXT_TAGS)})
    if adv.items is not None:
        out["grpo/degradation_item_advantage_std"] = float(adv.items.std())
    if adv.stages is not None:
        out.update({f"grpo/{stage}_image_advantage_std": float(adv.stages[:, i].std())
                    for i, stage in enumerate(PROCESS_STAGES)})
    return out
