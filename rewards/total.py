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
  > 1, ``Rollout.branch_finals``) has every branch's final image scored: ``Scores.branches`` keeps each
  branch's generation and quality parts, and ``parts`` (so the total) their means over the branches.
"""

from __future__ import annotations

from collections.abc import Sequence

from core.chain import parse_chain
from core.config import RewardConfig
from core.records import Rollout, Sample, Scores
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


def score_chain(
    text: str, sample: Sample, quality: QualityScore | None, cfg: RewardConfig, sample_index: int = 0,
    branch_qualities: Sequence[QualityScore | None] = (),
) -> Scores:
    """All reward components of one chain, from its text, its sample and its final image's metrics.

    ``quality`` is None when the chain has no final image; ``branch_qualities``: those of its image branches
    1..M-1 (``Rollout.branch_finals``). Pure: metrics are computed beforehand by a QualityScorer (batched over
    chains), so this function is cheap and testable without pyiqa.
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
    rollouts: Sequence[Rollout], samples: Sequence[Sample], cfg: RewardConfig, scorer: QualityScorer | None
) -> list[Scores]:
    """Score chains in one batch: one metric pass over all final images, then ``score_chain`` per chain."""
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
    return [score_chain(r.text, s, q[0], cfg, r.sample_index, q[1:]) for r, s, q in zip(rollouts, samples, qualities)]
