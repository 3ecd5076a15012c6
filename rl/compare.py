"""Did training help? Two held-out evaluations (``rl.eval``'s eval.json) side by side, against the noise.

    python -m rl.compare runs/eval_start/eval.json runs/eval_end/eval.json --run runs/grpo_after_sft \
        --out runs/eval_end/compare.md

For every reward: the mean before and after, the change, and its standard error (the chains' spread,
sqrt(var_a / n_a + var_b / n_b)). With ``--run``, also the training curve's step-to-step noise of the same
reward: the std of the differences between consecutive steps' means, / sqrt(2) (the noise of one step's mean;
a trend barely moves consecutive differences). A change counts as larger than the noise when it exceeds both
2 standard errors and the step-to-step noise.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from core.chain import TEXT_TAGS
from rl.monitor import read_scalars

# each text section's own format (rewards.format.section_format_rewards) right after the chain's
REWARDS = ("format", *(f"format/{tag}" for tag in TEXT_TAGS),
           "degradation", "understanding", "generation", "total")


@dataclass(frozen=True)
class Change:
    reward: str
    before: float
    after: float
    n_before: int
    n_after: int
    stderr: float  # of after - before
    step_noise: Optional[float]  # the training curve's, None without a run

    @property
    def delta(self) -> float:
        return self.after - self.before

    @property
    def beyond_noise(self) -> bool:
        return abs(self.delta) > max(2 * self.stderr, self.step_noise or 0.0)


def step_to_step_noise(values: Sequence[float]) -> float:
    """std(consecutive differences) / sqrt(2): the noise of one step's value, nearly blind to a slow trend."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size < 3:
        raise ValueError(f"need at least 3 steps to measure step-to-step noise, got {v.size}")
    return float(np.diff(v).std(ddof=1) / math.sqrt(2))


def chain_values(report: dict, reward: str) -> np.ndarray:
    """Per-chain values of ``reward`` in an eval.json (chains where it does not apply are left out)."""
    return np.asarray([c["rewards"][reward] for c in report["per_chain"] if reward in c["rewards"]], dtype=float)


def _mean_variance(x: np.ndarray) -> float:
    """The variance of the mean of ``x`` (0 for a single value: no spread to measure)."""
    return float(x.var(ddof=1) / x.size) if x.size > 1 else 0.0


def compare(before: dict, after: dict, curves: Optional[dict] = None,
            rewards: Sequence[str] = REWARDS) -> list[Change]:
    out = []
    for reward in rewards:
        a, b = chain_values(before, reward), chain_values(after, reward)
        if not a.size or not b.size:
            continue
        se = math.sqrt(_mean_variance(a) + _mean_variance(b))
        curve = (curves or {}).get(f"reward/{reward}/mean")
        noise = step_to_step_noise([v for _, v in curve]) if curve and len(curve) >= 3 else None
        out.append(Change(reward, float(a.mean()), float(b.mean()), int(a.size), int(b.size), se, noise))
    return out


def markdown(changes: Sequence[Change], before_name: str, after_name: str) -> str:
    lines = [f"| reward | {before_name} | {after_name} | change | 2 x std. error | step-to-step noise "
             "| beyond noise |",
             "|---|---|---|---|---|---|---|"]
    for c in changes:
        noise = "-" if c.step_noise is None else f"{c.step_noise:.3f}"
        lines.append(f"| {c.reward} | {c.before:.3f} | {c.after:.3f} | {c.delta:+.3f} | {2 * c.stderr:.3f} | {noise} "
                     f"| {'yes' if c.beyond_noise else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rl.compare", description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="eval.json of the starting point")
    parser.add_argument("after", type=Path, help="eval.json after training")
    parser.add_argument("--run", type=Path, default=None, help="the training run (its TensorBoard curves)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    reports = []
    for path in (args.before, args.after):
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"cannot read eval report {path}: {exc}") from None
    curves = None
    if args.run is not None:
        log_dir = args.run / "tensorboard" if (args.run / "tensorboard").is_dir() else args.run
        curves = read_scalars(log_dir)
        if not curves:
            raise SystemExit(f"no TensorBoard scalars under {log_dir}")
    table = markdown(compare(*reports, curves), f"before (step {reports[0].get('step')})",
                     f"after (step {reports[1].get('step')})")
    print(table, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
