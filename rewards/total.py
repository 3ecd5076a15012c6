"""The reward of a chain: the four components and their configured weighted sum.

total = sum over the applicable components c of RewardConfig.weights.c * reward_c. A component that is not
applicable is left out of the sum and out of ``Scores.parts``, and the weights are not renormalised:
applicability depends only on the Sample (labels, tags, HR) and every chain of a GRPO group shares its
Sample, so the whole group loses the same term and group-relative advantages are unaffected.

- format: always applicable. ``format/<section>`` parts score each text section on its own
  (rewards.format.section_format_rewards) for section-level credit; like ``quality/<metric>`` they are
  details, not terms of the total.
- degradation: needs DegradationLabels (synthetic LR); real LR has none.
- understanding: needs at least one usable tag.
- generation: needs at least one configured metric. A chain without a final image scores 0 (its fault, not
  the sample's), with ``errors["generation"]`` saying so. A chain with image branches (``grpo.image_group_size``
  > 1, ``Rollout.branch_images``) has every branch's final image scored: ``Scores.branches`` keeps each
  branch's generation and quality parts, and ``parts`` (so the total) their means over the branches.
- ``generation/<stage>`` (with ``reward.stage_metrics``): each image branch's rough and middle image scored by those
  full-reference metrics against the HR at the image's size (``data.sft_targets.hr_at``, the cold start's target):
  the process rewards stage credit reads (``grpo.image_credit``); details, never terms of the total.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from core.chain import PROCESS_STAGES, parse_chain
from core.config import RewardConfig
from core.records import Rollout, Sample, Scores
from data.sft_targets import hr_at
from rewards.degradation import degradation_item_rewards
from rewards.format import format_reward, section_format_rewards
from rewards.quality import QualityScore, QualityScorer, generation_reward
from rewards.understanding import understanding_reward

FINAL_STAGE = "final"


def metric_weights(cfg: RewardConfig) -> dict[str, float]:
    """Metric name -> weight inside the generation reward (no-reference and full-reference metrics)."""
    return {m.name: m.weight for m in list(cfg.metrics) + list(cfg.full_reference)}


def image_parts(quality: QualityScore | None, cfg: RewardConfig) -> tuple[dict[str, float], dict[str, str]]:
    """The parts one final image decides (generation, quality/<metric>) and the metric errors; ``quality`` None:
    no final image (generation 0). Empty when no metric is configured."""
    mweights = metric_weights(cfg)
    if not mweights:
        return {}, {}
    if quality is None:
        return {"generation": 0.0}, {"generation": "the chain has no final image"}
    parts: dict[str, float] = {}
    gen = generation_reward(quality, mweights, cfg.failed_metric)
    if gen is not None:
        parts["generation"] = gen
    parts.update({f"quality/{name}": value for name, value in quality.values.items()})
    return parts, dict(quality.errors)


def stage_parts(qualities: Mapping[str, QualityScore], cfg: RewardConfig) -> tuple[dict[str, float], dict[str, str]]:
    """``generation/<stage>`` of one image branch's stage images (their ``reward.stage_metrics`` scores by stage)
    and the metric errors (``<metric>@<stage>``); a stage whose every metric failed has no part."""
    weights = {m.name: m.weight for m in cfg.stage_metrics}
    parts: dict[str, float] = {}
    errors: dict[str, str] = {}
    for stage, quality in qualities.items():
        value = generation_reward(quality, weights, cfg.failed_metric)
        if value is not None and math.isfinite(value):
            parts[f"generation/{stage}"] = value
        errors.update({f"{name}@{stage}": why for name, why in quality.errors.items()})
    return parts, errors


def score_chain(
    text: str, sample: Sample, quality: QualityScore | None, cfg: RewardConfig, sample_index: int = 0,
    branch_qualities: Sequence[QualityScore | None] = (),
    stage_qualities: Sequence[Mapping[str, QualityScore]] = (),
) -> Scores:
    """All reward components of one chain, from its text, its sample and its final image's metrics.

    ``quality`` is None when the chain has no final image; ``branch_qualities``: those of its image branches
    1..M-1 (``Rollout.branch_images``); ``stage_qualities``: per image branch (branch 0 first), its stage images'
    ``reward.stage_metrics`` scores by stage (() without them). Pure: metrics are computed beforehand by a
    QualityScorer (batched over chains), so this function is cheap and testable without pyiqa.
    """
    parsed = parse_chain(text)
    weights = vars(cfg.weights)
    parts: dict[str, float] = {"format": format_reward(parsed)}
    # per-section format (grpo.section_rewards credit); not summed into the total
    parts.update({f"format/{tag}": v for tag, v in section_format_rewards(text).items()})
    errors: dict[str, str] = {}
    items = degradation_item_rewards(parsed, sample.degradation)
    if items is not None:  # the items as parts of their own (item credit); not summed into the total
        parts["degradation"] = sum(items.values()) / len(items)
        parts.update({f"degradation/{item}": v for item, v in items.items()})
    und = understanding_reward(parsed, sample.tags, cfg.understanding_stages)
    if und is not None:
        parts["understanding"] = und

    branches = [image_parts(q, cfg) for q in (quality, *branch_qualities)]
    for (b_parts, b_errors), qualities in zip(branches, stage_qualities):
        more_parts, more_errors = stage_parts(qualities, cfg)
        b_parts.update(more_parts)
        b_errors.update(more_errors)
    for i, (_, errs) in enumerate(branches):
        errors.update({(name if i == 0 else f"{name}@branch{i}"): why for name, why in errs.items()})
    if len(branches) == 1:
        parts.update(branches[0][0])
    else:  # the mean over the branches of every image part that all of them have
        shared = set.intersection(*(set(p) for p, _ in branches))
        parts.update({name: sum(p[name] for p, _ in branches) / len(branches) for name in sorted(shared)})
    total = sum(weights[name] * parts[name] for name in weights if name in parts)
    return Scores(
        prompt_id=sample.prompt_id, sample_index=sample_index, parts=parts, total=total, errors=errors,
        branches=tuple(p for p, _ in branches) if len(branches) > 1 else (),
    )


def score_rollouts(
    rollouts: Sequence[Rollout], samples: Sequence[Sample], cfg: RewardConfig, scorer: QualityScorer | None,
    stage_scorer: QualityScorer | None = None,
) -> list[Scores]:
    """Score chains in one batch: one metric pass over all final images (``scorer``), one over all stage images
    before the final (``stage_scorer``, ``reward.stage_metrics``), then ``score_chain`` per chain."""
    if len(rollouts) != len(samples):
        raise ValueError(f"{len(rollouts)} rollouts but {len(samples)} samples")
    for r, s in zip(rollouts, samples):
        if r.prompt_id != s.prompt_id:
            raise ValueError(
                f"rollout of prompt {r.prompt_id} (sample {r.sample_index}) paired with "
                f"sample of prompt {s.prompt_id}"
            )
    # every final image of every chain (branch 0, then its image branches), scored in one metric pass
    finals = [(i, b, image) for i, r in enumerate(rollouts)
              for b, image in enumerate((r.images.get(FINAL_STAGE), *r.branch_finals)) if image is not None]
    qualities: list[list[QualityScore | None]] = [[None] * r.image_branches for r in rollouts]
    if metric_weights(cfg):
        if scorer is None:
            raise ValueError(
                "reward.metrics / reward.full_reference are configured but no QualityScorer was given"
            )
        scored = scorer([image for _, _, image in finals], [samples[i].hr for i, _, _ in finals])
        for (i, b, _), q in zip(finals, scored):
            qualities[i][b] = q
    stages = _stage_qualities(rollouts, samples, cfg, stage_scorer)
    return [score_chain(r.text, s, q[0], cfg, r.sample_index, q[1:], st)
            for r, s, q, st in zip(rollouts, samples, qualities, stages)]


def _stage_qualities(rollouts: Sequence[Rollout], samples: Sequence[Sample], cfg: RewardConfig,
                     scorer: QualityScorer | None) -> list[list[dict[str, QualityScore]]]:
    """Per chain, per image branch: its process stages' ``reward.stage_metrics`` scores by stage, in one metric
    pass over every chain (nothing without stage metrics; a sample without HR has none)."""
    out: list[list[dict[str, QualityScore]]] = [[{} for _ in range(r.image_branches)] for r in rollouts]
    if not cfg.stage_metrics:
        return out
    if scorer is None:
        raise ValueError("reward.stage_metrics are configured but no stage QualityScorer was given")
    images = [(i, b, stage, image) for i, (r, s) in enumerate(zip(rollouts, samples)) if s.hr is not None
              for b, branch in enumerate((r.images, *r.branch_images))
              for stage, image in branch.items() if stage in PROCESS_STAGES]
    scored = scorer([image for *_, image in images],
                    [hr_at(samples[i].hr, image.shape[:2], stage) for i, _, stage, image in images])
    for (i, b, stage, _), q in zip(images, scored):
        out[i][b][stage] = q
    return out
