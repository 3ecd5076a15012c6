"""How a step's chains are cut for the ranks and their micro-batches, and how per-rank sums become batch metrics.

Shared by the GRPO and SFT steps. ZeRO's collectives run per forward / backward, so every rank must run the
same number of micro-batches: a rank with fewer pads with masked copies (``masked_copy``), which run the
collectives and contribute exactly zero loss, tokens and gradient. Metrics are sums per rank, added over ranks
(``reduce_sums``) and only then divided, so they are the whole batch's, identical on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from core.grpo import TrainBatch
from core.records import Rollout

AllReduce = Callable[..., list[float]]  # (values, op="sum" | "max" | "min") -> values over all ranks


def contiguous_sizes(n: int, num_ranks: int) -> list[int]:
    """Near-equal contiguous shard sizes, the first ranks taking the remainder: (5, 2) -> [3, 2]."""
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    return [n // num_ranks + (r < n % num_ranks) for r in range(num_ranks)]


def masked_copy(batch: TrainBatch) -> TrainBatch:
    """The same rows with every loss position switched off: runs the forward/backward collectives of a
    rank that has no real work left, and contributes exactly zero loss, tokens and gradient."""
    return replace(
        batch,
        loss_mask=torch.zeros_like(batch.loss_mask),
        advantages=torch.zeros_like(batch.advantages),
        step_advantages=torch.zeros_like(batch.step_advantages),
        step_mask=torch.zeros_like(batch.step_mask),
    )


@dataclass(frozen=True)
class MicroBatch:
    """One forward/backward's worth of rows on this rank."""

    batch: TrainBatch
    rollouts: list[Rollout]  # one per row (the records' rollout view for SFT)
    records: list[Any]  # one per row for SFT (data.sft_targets.SFTRecord), [] for GRPO
    real: bool  # False: a padding copy that only keeps this rank's collectives in step


def micro_batches(batch: TrainBatch, rollouts: Sequence[Rollout], size: int, all_reduce: AllReduce,
                  records: Sequence[Any] = (), real: bool = True) -> list[MicroBatch]:
    """Consecutive micro-batches of ``size`` rows, padded with masked copies of the last one up to the count of
    the rank with the most (an all-reduce: every rank must call it). ``real`` False marks them all padding."""
    if len(rollouts) != len(batch):
        raise ValueError(f"{len(batch)} batch rows but {len(rollouts)} rollouts (one per row)")
    out = [MicroBatch(batch.select(range(i, min(i + size, len(batch)))), list(rollouts[i:i + size]),
                      list(records[i:i + size]), real)
           for i in range(0, len(batch), size)]
    count = int(all_reduce([len(out)], "max")[0])
    while len(out) < count:
        last = out[-1]
        out.append(MicroBatch(masked_copy(last.batch), last.rollouts, last.records, False))
    return out


# Metrics of core.grpo.SurrogateOutput that are masked means: aggregated over ranks weighted by their tokens.
MEAN_METRICS = ("clip_fraction", "clip_fraction_low", "clip_fraction_high", "approx_kl", "ratio_mean",
                "old_logp_mean")


def add(sums: dict[str, float], key: str, value: float) -> None:
    sums[key] = sums.get(key, 0.0) + value


def accumulate(sums: dict[str, float], extremes: dict[str, float], kind: str, metrics: Mapping[str, Any]) -> None:
    """A surrogate's metrics (``kind``: text or image) into token-weighted sums of the masked means, and running
    extremes of the ratio."""
    tokens = float(metrics["tokens"])
    for name in MEAN_METRICS:
        add(sums, f"{kind}_{name}", float(metrics[name]) * tokens)
    if tokens > 0:
        extremes[f"{kind}_ratio_max"] = max(extremes[f"{kind}_ratio_max"], float(metrics["ratio_max"]))
        extremes[f"{kind}_ratio_min"] = min(extremes[f"{kind}_ratio_min"], float(metrics["ratio_min"]))


def reduce_sums(sums: Mapping[str, float], all_reduce: AllReduce) -> dict[str, float]:
    """Per-rank partial sums -> their totals over ranks. Every rank must hold the same keys (a key exists iff
    its branch ran on every rank), which keeps the all-reduce vectors aligned."""
    keys = sorted(sums)
    return dict(zip(keys, all_reduce([sums[k] for k in keys])))
