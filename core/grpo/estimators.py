"""Advantage estimators: one step's scored chains -> ``ChainAdvantages``, each column by a registered estimator.

Pure torch (no Ray, no config objects). Everything an estimator reads is one ``StepRewards``: the step's N scored
chains in group order. An estimator is registered by name with ``register_adv_est`` into ``ADV_ESTIMATORS`` and has
one signature, ``fn(step, components, **options) -> Estimate``: it forms one column's reward from the named reward
components (None: the chain's total) and normalises it within its groups, giving the column's advantages (N, K) and
the groups in which it has nothing to teach. Registered: ``grpo`` (the paper's group normalisation; Dr.GRPO's
mean-only baseline with ``scale_by_std: false``), ``decoupled`` (every component normalised on its own before the
weighted sum: LucidNFT, GDPO) and ``image_branches`` (M images per chain, each centred on its chain's).

An ``AdvantagePlan`` says which columns a step has (``rl.advantages`` builds it from the config), each an
``AdvantageColumn``: who reads it, the components it learns from and its estimator entry (``{name: grpo, eps: 1e-6}``,
options checked by ``registry_entry``), plus the advantage transforms. ``estimate_advantages`` runs a plan.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from core.chain import DEGRADATION_ITEMS, PROCESS_STAGES
from core.grpo.advantages import (
    ChainAdvantages,
    GroupFilter,
    advantage_transform,
    branch_advantages,
    component_rewards,
    decoupled_rewards,
    group_advantages,
    registry_entry,
    zero_variance_groups,
)


# ------------------------------------------------------------------------------------------ the input
@dataclass(frozen=True)
class StepRewards:
    """One step's scored chains, N of them in group order ``[g0s0, g0s1, ..., g1s0, ...]``.

    parts[i]: chain i's ``Scores.parts``; totals[i]: its ``Scores.total`` (None where the rows have no recorded
    total, the image branches': a column of the total then sums every weighted part); weights: the reward weights
    (``reward.weights``); group_size: G; branches: per chain, the M dicts of the parts each of its image branches
    decides (``Scores.branches``), or None; metric_weights: each generation metric's weight in the generation
    reward (decoupled normalisation splits generation into its ``quality/<metric>`` parts), or None.
    """

    parts: Sequence[Mapping[str, float]]
    totals: Sequence[float] | None
    weights: Mapping[str, float]
    group_size: int
    branches: Sequence[Sequence[Mapping[str, float]]] | None = None
    metric_weights: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        if self.totals is not None and len(self.totals) != len(self.parts):
            raise ValueError(f"{len(self.parts)} chains' parts but {len(self.totals)} totals")

    @property
    def num_branches(self) -> int:
        """M, the image branches of a chain (branch 0's count: 1 without branches)."""
        return len(self.branches[0]) if self.branches else 1

    def branch_rows(self) -> StepRewards:
        """The N x M image branches as rows of their own (chain-major: a chain's M branches in turn, each with its
        chain's parts and its own image parts over them), in groups of G x M, with no totals."""
        m = self.num_branches
        if self.branches is None or any(len(b) != m for b in self.branches) or len(self.branches) != len(self.parts):
            raise ValueError(f"branches: every one of the {len(self.parts)} chains needs {m} image branches")
        rows = [{**p, **b} for p, chain in zip(self.parts, self.branches) for b in chain]
        return StepRewards(rows, None, self.weights, self.group_size * m, metric_weights=self.metric_weights)


# ------------------------------------------------------------------------------------------ a column's reward
def joint_rewards(step: StepRewards, components: Sequence[str] | None) -> Tensor:
    """A column's reward as one weighted sum -> (N,) float32: the chains' totals for None (the paper; rows without
    totals sum every weighted part), else the named components' (``component_rewards``)."""
    if components is None and step.totals is not None:
        return torch.tensor([float(t) for t in step.totals], dtype=torch.float32)
    return component_rewards(step.parts, step.weights, list(step.weights) if components is None else components)


def _decoupled_parts(step: StepRewards, components: Sequence[str] | None) -> list[tuple[str, float]]:
    """(part, weight) of a decoupled column: every weighted component for None; generation split into its metrics
    (``quality/<metric>``, each with its share of the generation weight) when metric weights are known."""
    out: list[tuple[str, float]] = []
    for c in list(step.weights) if components is None else list(components):
        base = c.split("/", 1)[0]
        if base not in step.weights:
            raise ValueError(f"unknown reward components [{c!r}]; known: {sorted(step.weights)}")
        if c == "generation" and step.metric_weights:
            total = sum(step.metric_weights.values()) or 1.0
            out += [(f"quality/{m}", step.weights[base] * w / total) for m, w in step.metric_weights.items() if w > 0]
        else:
            out.append((c, step.weights[base]))
    return out


def decoupled_column(step: StepRewards, components: Sequence[str] | None, eps: float = 1e-6) -> Tensor:
    """A column's reward as the weighted sum of its parts, each normalised within its groups first
    (``decoupled_rewards``) -> (N,); a part no row has is left out, one a row lacks counts as its group's mean."""
    pairs = _decoupled_parts(step, components)
    values = torch.tensor([[float(p.get(c, math.nan)) for c, _ in pairs] for p in step.parts], dtype=torch.float32)
    present = [k for k in range(len(pairs)) if not torch.isnan(values[:, k]).all()]  # not applicable: dropped
    weights = torch.tensor([w for _, w in pairs], dtype=torch.float32)
    return decoupled_rewards(values[:, present], weights[present], step.group_size, eps)


# ------------------------------------------------------------------------------------------ the estimators
class Estimate(NamedTuple):
    """What an estimator gives: the column's advantages and the groups where it is flat."""

    advantages: Tensor  # (N, K) float: K = 1 for a reward column, M for the image branches
    flat: Tensor  # (N // G,) bool: True where the column has nothing to teach (its rewards all equal)


AdvantageEstimator = Callable[..., Estimate]  # fn(step: StepRewards, components, **options) -> Estimate
ADV_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_adv_est(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: register ``fn(step, components, **options) -> Estimate`` as the advantage estimator ``name``."""
    def register(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in ADV_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is registered already ({ADV_ESTIMATORS[name].__name__})")
        ADV_ESTIMATORS[name] = fn
        return fn
    return register


def _normalised(rewards: Tensor, group_size: int, scale_by_std: bool, eps: float) -> Estimate:
    """One reward column (N,) normalised within its groups, flat where its rewards are all equal."""
    return Estimate(group_advantages(rewards, group_size, scale_by_std, eps)[:, None],
                    zero_variance_groups(rewards, group_size).zero_variance)


@register_adv_est("grpo")
def grpo_estimator(step: StepRewards, components: Sequence[str] | None, scale_by_std: bool = True,
                   eps: float = 1e-6) -> Estimate:
    """GRPO: the column's weighted reward (``joint_rewards``) normalised within its groups (``group_advantages``);
    ``scale_by_std`` false: Dr.GRPO's mean-only baseline."""
    return _normalised(joint_rewards(step, components), step.group_size, scale_by_std, eps)


@register_adv_est("decoupled")
def decoupled_estimator(step: StepRewards, components: Sequence[str] | None, scale_by_std: bool = True,
                        eps: float = 1e-6) -> Estimate:
    """Decoupled normalisation (``grpo.decoupled_normalization``): every part of the column normalised within its
    groups before the weighted sum (``decoupled_column``), the sum then normalised as in ``grpo``."""
    return _normalised(decoupled_column(step, components, eps), step.group_size, scale_by_std, eps)


@register_adv_est("image_branches")
def image_branch_estimator(step: StepRewards, components: Sequence[str] | None, scale_by_std: bool = True,
                           eps: float = 1e-6, decoupled: bool = False) -> Estimate:
    """M image branches per chain (``grpo.image_group_size``): each branch's reward (its image parts over its chain's;
    ``decoupled``: formed as the ``decoupled`` estimator's) centred on its chain's M and scaled by the group's spread
    (``branch_advantages``) -> M columns; a group is flat when every chain's branches tie."""
    rows = step.branch_rows()
    rewards = decoupled_column(rows, components, eps) if decoupled else joint_rewards(rows, components)
    return Estimate(*branch_advantages(rewards.view(-1, step.num_branches), step.group_size, scale_by_std, eps))


# ------------------------------------------------------------------------------------------ the plan
COLUMN_NAMES = ("text", "image", "image_branches")  # and section/<tag>, item/<degradation item>, stage/<stage>


@dataclass(frozen=True)
class AdvantageColumn:
    """One entry of a step's advantage table.

    name: who reads it: ``text`` (the text tokens), ``image`` (the diffusion steps, when judged apart from the
    text; without it they take the text's), ``section/<tag>`` (a text section's tokens, section credit),
    ``item/<item>`` (the statement of a degradation item), ``image_branches`` (one column per image branch),
    ``stage/<stage>`` (that stage's denoising steps under stage credit: one column, or one per image branch);
    components: the reward components it learns from (None: the total; (): none, advantage 0); estimator: an
    ``ADV_ESTIMATORS`` entry with its options, ``{"name": "grpo", "scale_by_std": True}``."""

    name: str
    components: tuple[str, ...] | None
    estimator: Mapping[str, Any]

    def estimate(self, step: StepRewards) -> Estimate:
        fn, options = registry_entry(ADV_ESTIMATORS, self.estimator, "advantage estimator", 2)
        return fn(step, self.components, **options)


@dataclass(frozen=True)
class AdvantagePlan:
    """The columns of a step's advantage table, in table order (``text`` among them; sections and items each in
    the order the learner reads them), and the ``grpo.advantage_transforms`` entries applied to the table in turn."""

    columns: tuple[AdvantageColumn, ...]
    transforms: tuple[Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        names = [c.name for c in self.columns]
        odd = [n for n in names if n not in COLUMN_NAMES and not n.startswith(("section/", "item/", "stage/"))]
        if odd or "text" not in names or len(set(names)) < len(names) or {"image", "image_branches"} <= set(names):
            raise ValueError(f"advantage columns {names}: need one text column, unique names among {COLUMN_NAMES}, "
                             "section/<tag>, item/<item> and stage/<stage>, and image or image_branches, not both")
        for prefix, members, what in (("item/", DEGRADATION_ITEMS, "core.chain.DEGRADATION_ITEMS item"),
                                      ("stage/", PROCESS_STAGES, "core.chain.PROCESS_STAGES stage")):
            found = [n for n in names if n.startswith(prefix)]
            if found and found != [f"{prefix}{m}" for m in members]:
                raise ValueError(f"{prefix[:-1]} columns {found}: one per {what}, in its order")


# ------------------------------------------------------------------------------------------ composition
def estimate_advantages(step: StepRewards, plan: AdvantagePlan,
                        generator: torch.Generator | None = None) -> ChainAdvantages:
    """The advantages of every part of the chains: each column of ``plan`` by its estimator, the group filter (a
    group is dropped only when every column is flat in it, the image branches' included), the transforms in turn
    (drawing from ``generator``; None: seed 0), then the table split back into ``ChainAdvantages``."""
    estimates = [column.estimate(step) for column in plan.columns]
    table = torch.cat([e.advantages for e in estimates], dim=1)
    flat = torch.stack([e.flat for e in estimates]).all(dim=0)
    groups = GroupFilter(zero_variance=flat, keep=(~flat).repeat_interleave(step.group_size))
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    for spec in plan.transforms:
        table = advantage_transform(spec)(table, step.group_size, generator)
    blocks = table.split([e.advantages.shape[1] for e in estimates], dim=1)
    return _split(dict(zip((c.name for c in plan.columns), blocks)), groups)


def _split(blocks: Mapping[str, Tensor], groups: GroupFilter) -> ChainAdvantages:
    """Named blocks of the table -> ChainAdvantages (the images: branch 0's with branches, else their own column,
    else None; sections and items in plan order, None without any; the stages (N, stages, K) likewise)."""
    def joined(prefix: str) -> Tensor | None:
        found = [b for name, b in blocks.items() if name.startswith(prefix)]
        return torch.cat(found, dim=1) if found else None

    branches = blocks.get("image_branches")
    image = branches if branches is not None else blocks.get("image")
    stages = [b for name, b in blocks.items() if name.startswith("stage/")]
    return ChainAdvantages(text=blocks["text"][:, 0], image=None if image is None else image[:, 0],
                           sections=joined("section/"), groups=groups, image_branches=branches,
                           items=joined("item/"), stages=torch.stack(stages, dim=1) if stages else None)
