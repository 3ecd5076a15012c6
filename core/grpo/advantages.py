"""GRPO advantages: group-relative normalisation, zero-variance filtering, per-part reward columns, the
registry of advantage transforms and the per-chain records.

Pure torch (no Ray, no config objects). N chains in group order ``[g0s0, g0s1, ..., g0s(G-1), g1s0, ...]``.

These are the primitives; ``core.grpo.estimators`` composes them: the driver turns one step's ``Scores`` into
``ChainAdvantages`` with ``estimate_advantages``, one reward column per use (the text tokens, the diffusion steps
when they are judged differently, each text section under section credit, ...), each normalised within its groups
by a registered advantage estimator, then the configured transforms (``ADVANTAGE_TRANSFORMS``, chosen by name in
``grpo.advantage_transforms``), then one ``ChainAdvantage`` record per chain for the learner.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from core.records import ChainAdvantage


# ------------------------------------------------------------------------------------------ normalisation
def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """rewards (N,) -> (N // group_size, group_size) float, after checking the layout and the values."""
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if rewards.numel() % group_size:
        raise ValueError(
            f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}: "
            "every prompt needs all of its G chains"
        )
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"rewards are not finite at indices {bad[:8]}: {rewards[bad[:8]].tolist()}")
    r = rewards if rewards.is_floating_point() else rewards.float()
    return r.view(-1, group_size)


def group_advantages(
    rewards: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO's group-relative advantage, A_i = (r_i - mean_g(r)) / (std_g(r) + eps).

    rewards (N,) ordered [g0s0, g0s1, ..., g1s0, ...] -> advantages (N,), same float dtype.

    The std is the *unbiased* sample std (``torch.std``, Bessel's correction), as in the paper's trainer
    and TRL/verl, so G=2 rewards {0, 1} give A = +-0.707, not +-1. ``eps`` is added to the std (not to the
    variance), which keeps an all-equal group at exactly A = 0 instead of 0/0. A group of size 1 has no
    spread to compare against: its advantage is 0 (it is also a zero-variance group, see
    ``zero_variance_groups``). ``scale_by_std=False`` is Dr.GRPO's mean-only baseline, which does not
    up-weight groups whose rewards barely differ.
    """
    r = _grouped(rewards, group_size)  # (num_groups, G)
    centred = r - r.mean(dim=1, keepdim=True)
    if not scale_by_std:
        return centred.reshape(-1)
    if group_size == 1:
        return torch.zeros_like(centred).reshape(-1)
    std = r.std(dim=1, keepdim=True)  # unbiased (correction=1)
    return (centred / (std + eps)).reshape(-1)


def component_rewards(
    parts: Sequence[Mapping[str, float]], weights: Mapping[str, float], components: Sequence[str]
) -> Tensor:
    """The weighted sum of only the named reward components of each chain -> (N,) float32.

    parts[i] is ``Scores.parts`` of chain i; a component a chain's sample does not have (no labels, no tags)
    is left out, as in the total. A detail part ``name/detail`` (e.g. ``format/final_understand``) takes the
    weight of ``name``. Used to give the text tokens, the text sections and the diffusion steps advantages from
    the rewards each can change (``grpo.text_rewards`` / ``section_rewards`` / ``image_rewards``).
    """
    base = {c: c.split("/", 1)[0] for c in components}
    unknown = sorted(c for c, b in base.items() if b not in weights)
    if unknown:
        raise ValueError(f"unknown reward components {unknown}; known: {sorted(weights)}")
    return torch.tensor([sum(weights[base[c]] * p[c] for c in components if c in p) for p in parts],
                        dtype=torch.float32)


@dataclass(frozen=True)
class GroupFilter:
    """Which groups carry no learning signal (every chain scored the same)."""

    zero_variance: Tensor  # (num_groups,) bool, True where max - min <= atol
    keep: Tensor  # (N,) bool, True for the chains of the other groups

    @property
    def num_groups(self) -> int:
        return int(self.zero_variance.numel())

    @property
    def num_filtered(self) -> int:
        return int(self.zero_variance.sum())


def zero_variance_groups(rewards: Tensor, group_size: int, atol: float = 1e-6) -> GroupFilter:
    """Mark groups whose rewards are all equal (within ``atol``): their advantages are all 0.

    rewards (N,) in group order -> GroupFilter(zero_variance (N/G,), keep (N,)).

    Such groups add no gradient but still count in the token-mean denominator, diluting the others, so
    the driver drops them (DAPO's dynamic sampling) and logs ``num_filtered``. The test is max - min, which
    is exact for the common case of identical rewards and does not depend on the std's bias correction.
    A group of size 1 is always zero-variance.
    """
    r = _grouped(rewards, group_size)
    spread = r.max(dim=1).values - r.min(dim=1).values  # (num_groups,)
    zero = spread <= atol
    return GroupFilter(zero_variance=zero, keep=(~zero).repeat_interleave(group_size))


def column_advantages(
    rewards: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> tuple[Tensor, GroupFilter]:
    """Group advantages of several rewards at once: rewards (N, C), one column per use (the text tokens,
    the diffusion steps, a section of the text) -> advantages (N, C), each column normalised on its own,
    and a GroupFilter that drops a group only when every column is flat in it (nothing left to learn)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (N, C), got shape {tuple(rewards.shape)}")
    columns = [group_advantages(rewards[:, c].contiguous(), group_size, scale_by_std, eps)
               for c in range(rewards.shape[1])]
    flat = torch.stack([zero_variance_groups(rewards[:, c].contiguous(), group_size).zero_variance
                        for c in range(rewards.shape[1])]).all(dim=0)
    keep = (~flat).repeat_interleave(group_size)
    return torch.stack(columns, dim=1), GroupFilter(zero_variance=flat, keep=keep)


def branch_advantages(
    rewards: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Advantages of M image samples per chain (``grpo.image_group_size``): rewards (N, M), chains in group order
    -> (advantages (N, M), zero-variance (N // group_size,) bool).

    Each image is centred on its own chain's M images: they share the chain's texts, so the residual measures
    what the SR model did, not what the text did (a baseline per text, which lowers the variance and keeps the
    estimate unbiased). The residuals are then divided by their std over the whole group (G x M values, unbiased)
    + ``eps``, not per chain: a per-chain std of M near-identical images would blow tiny differences up (Pref-GRPO's
    "illusory advantage"). A group whose residuals are all 0 is zero-variance (advantage 0).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (N, M), got shape {tuple(rewards.shape)}")
    n, m = rewards.shape
    r = _grouped(rewards.reshape(-1), group_size * m).view(-1, group_size, m)  # (groups, G, M)
    residual = r - r.mean(dim=2, keepdim=True)
    flat = residual.flatten(1)
    zero = (flat.max(dim=1).values - flat.min(dim=1).values) <= 1e-6
    if scale_by_std and flat.shape[1] > 1:
        residual = residual / (flat.std(dim=1)[:, None, None] + eps)
    return residual.reshape(n, m), zero


def decoupled_rewards(values: Tensor, weights: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """Decoupled normalisation (LucidNFT; GDPO): values (N, K), one column per reward component, NaN where a
    chain has none (a failed metric); weights (K,) -> (N,) the weighted sum of each column's own group-normalised
    values. A missing value takes its group's mean (advantage 0), so a failure neither rewards nor punishes.
    No column (K = 0: an empty component list, or none that applies to these chains) gives 0 for every chain."""
    if values.dim() != 2 or weights.shape != (values.shape[1],):
        raise ValueError(f"values must be (N, K) and weights (K,), got {tuple(values.shape)}, {tuple(weights.shape)}")
    if values.shape[1] == 0:
        return values.new_zeros(values.shape[0])
    g = values.view(-1, group_size, values.shape[1])  # (groups, G, K)
    present = ~torch.isnan(g)
    mean = torch.where(present, g, torch.zeros(())).sum(1, keepdim=True) / present.sum(1, keepdim=True).clamp(min=1)
    filled = torch.where(present, g, mean).reshape(values.shape)
    z = torch.stack([group_advantages(filled[:, k].contiguous(), group_size, True, eps)
                     for k in range(values.shape[1])], dim=1)
    return (z * weights.to(z.dtype)).sum(dim=1)


# ------------------------------------------------------------------------------------------ transforms
# A transform maps the normalised table (N, C) to a new one; ``generator`` is seeded per step by the driver so a
# run is reproducible. Options, if a transform takes any, come from the config entry (``{name: ..., option: value}``).
AdvantageTransform = Callable[..., Tensor]


def placebo_shuffle(table: Tensor, group_size: int, generator: torch.Generator) -> Tensor:
    """A placebo control, not a training setting: every chain takes the advantages of another chain of its
    group (a random permutation per group). The update keeps its size and noise but loses the reward's
    signal, so a run with it measures what the reward adds."""
    n = table.shape[0]
    return table[torch.cat([g + torch.randperm(group_size, generator=generator) for g in range(0, n, group_size)])]


ADVANTAGE_TRANSFORMS: dict[str, AdvantageTransform] = {
    "placebo_shuffle": placebo_shuffle,
}


def registry_entry(registry: Mapping[str, Callable[..., Any]], spec: Mapping[str, Any], what: str,
                   fixed: int) -> tuple[Callable[..., Any], dict[str, Any]]:
    """A ``{name: ..., option: value}`` config entry -> (the registered function, its options). An unknown name
    or option is an error listing the known ones; ``fixed``: how many leading parameters the caller passes."""
    options = dict(spec)
    name = options.pop("name", None)
    if name not in registry:
        raise ValueError(f"{what} {name!r} is not one of {sorted(registry)}")
    fn = registry[name]
    params = list(inspect.signature(fn).parameters.values())[fixed:]
    known = {p.name for p in params}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{what} {name!r}: unknown option(s) {unknown}; it takes {sorted(known)}")
    missing = sorted(p.name for p in params if p.default is inspect.Parameter.empty and p.name not in options)
    if missing:
        raise ValueError(f"{what} {name!r}: missing option(s) {missing}")
    return fn, options


def advantage_transform(spec: Mapping[str, Any]) -> Callable[[Tensor, int, torch.Generator], Tensor]:
    """The transform a ``grpo.advantage_transforms`` entry names, with its options bound."""
    fn, options = registry_entry(ADVANTAGE_TRANSFORMS, spec, "advantage transform", 3)
    return lambda table, group_size, generator: fn(table, group_size, generator, **options)


# ------------------------------------------------------------------------------------------ per chain
@dataclass(frozen=True)
class ChainAdvantages:
    """One step's advantages (N chains in group order) and the group filter.

    text (N,): the text tokens' advantage; image (N,) or None (the diffusion steps share ``text``);
    sections (N, len(section_tags)) or None (every text token has ``text``); image_branches (N, M) or None: one
    advantage per image branch (``branch_advantages``; ``image`` is then branch 0's); groups: the filter (a group
    is dropped only when every column is flat in it)."""

    text: Tensor
    image: Tensor | None
    sections: Tensor | None
    groups: GroupFilter
    image_branches: Tensor | None = None
    items: Tensor | None = None  # (N, len(DEGRADATION_ITEMS)): each degradation item's own advantage
    # (N,) bool: False for a chain whose reward could not be computed (left out of its group, never trained on);
    # None: every chain was scored
    scored: Tensor | None = None
    # (N, len(PROCESS_STAGES), M): each stage image's own advantage, per image branch (stage credit)
    stages: Tensor | None = None

    def per_chain(self) -> list[ChainAdvantage]:
        """One record per chain, what the learner is sent."""
        row = lambda t, i: None if t is None else tuple(t[i].tolist())  # noqa: E731
        return [ChainAdvantage(text=float(self.text[i]),
                               image=None if self.image is None else float(self.image[i]),
                               sections=row(self.sections, i), image_branches=row(self.image_branches, i),
                               items=row(self.items, i),
                               stages=None if self.stages is None else tuple(map(tuple, self.stages[i].tolist())))
                for i in range(self.text.shape[0])]


def group_order(records: Sequence[object], group_size: int) -> list[int]:
    """The permutation that puts records (anything with ``prompt_id`` and ``sample_index``, e.g. Scores or
    Rollout) into group order [g0s0, g0s1, ...]; groups appear in order of their first record.

    ``[records[i] for i in group_order(records, G)]`` is what ``group_advantages`` expects. Raises when a
    group is incomplete or a (prompt_id, sample_index) pair repeats, because a silent misalignment would
    give chains the advantages of other chains.
    """
    groups: dict[int, dict[int, int]] = {}
    for i, rec in enumerate(records):
        pid, sidx = int(rec.prompt_id), int(rec.sample_index)  # type: ignore[attr-defined]
        members = groups.setdefault(pid, {})
        if sidx in members:
            raise ValueError(
                f"duplicate chain prompt_id={pid} sample_index={sidx} (records {members[sidx]} and {i})"
            )
        members[sidx] = i
    order: list[int] = []
    for pid, members in groups.items():
        if sorted(members) != list(range(group_size)):
            raise ValueError(
                f"group prompt_id={pid} has sample_index {sorted(members)}, expected 0..{group_size - 1}"
            )
        order.extend(members[s] for s in range(group_size))
    return order
