"""Did training help? Two held-out evaluations (``tools.eval``'s eval.json) side by side, against the noise.

    python -m tools.compare runs/eval_start/eval.json runs/eval_end/eval.json --run runs/grpo_after_sft \
        --out runs/eval_end/compare.md

For every reward and every image metric of the reports (PSNR, SSIM, PIQE, ...: the model's final images): the
mean before and after, the change, and its standard error. When both reports hold the same crops (the same
``--data``, ``--split`` and ``--num`` give the same crops and degradations), the change is paired by crop: each
crop's mean over its chains, before and after, and the standard error of the crops' differences, which leaves out
the spread between crops that both models share; beside it, the same mean's standard error clustered by photo
(``core.stats.paired_clustered_se``, the photos named by each chain's ``image_id``): crops cut from one photo share
its content, so for a claim about new photos they are not independent. It has G - 1 degrees of freedom for G photos
(few photos: 2 s.e. is optimistic); a report without photo ids shows it as unavailable. Otherwise the chains'
spread, sqrt(var_a / n_a + var_b / n_b).
With ``--run``, also the training curve's step-to-step noise of the same
reward: the std of the differences between consecutive steps' means, / sqrt(2) (the noise of one step's mean;
a trend barely moves consecutive differences). A change counts as larger than the noise when it exceeds both
2 standard errors (the larger of the paired and the clustered one, where both exist) and the step-to-step noise. ``--effect E`` also prints, with
this comparison as the pilot, how many crops a confirmatory evaluation needs to see a change of E beyond 2 s.e. with
80% power (``core.stats.crops_for_power``): the number to write down before the run.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from core.chain import PROCESS_STAGES, TEXT_TAGS
from core.stats import crops_for_power, paired_clustered_se
from rl.monitor import read_scalars

# each text section's own format (rewards.format.section_format_rewards) right after the chain's; each process
# stage's fidelity (reward.stage_metrics) right after the final image's generation
REWARDS = ("format", *(f"format/{tag}" for tag in TEXT_TAGS), "degradation", "understanding",
           "generation", *(f"generation/{stage}" for stage in PROCESS_STAGES), "total")


@dataclass(frozen=True)
class Change:
    reward: str
    before: float
    after: float
    n_before: int
    n_after: int
    stderr: float  # of after - before: of the crops' differences when paired, else of the chains' spread
    step_noise: Optional[float]  # the training curve's, None without a run
    paired: bool = False  # by crop: n_before = n_after = the crops both reports hold
    # paired only: the s.e. of the mean difference clustered by photo; None when the reports do not name the
    # photos (or not paired), nan with fewer than 2 photos (undefined)
    se_clustered: float | None = None
    n_photos: int | None = None  # the clusters (photos) behind se_clustered

    @property
    def delta(self) -> float:
        return self.after - self.before

    @property
    def verdict_stderr(self) -> float:
        """The standard error the verdict uses: the larger of the paired and the clustered one where that is
        defined (with few photos the clustered one can come out smaller by chance), else ``stderr``."""
        if self.se_clustered is not None and math.isfinite(self.se_clustered):
            return max(self.se_clustered, self.stderr)
        return self.stderr

    @property
    def beyond_noise(self) -> bool:
        return abs(self.delta) > max(2 * self.verdict_stderr, self.step_noise or 0.0)


def step_to_step_noise(values: Sequence[float]) -> float:
    """std(consecutive differences) / sqrt(2): the noise of one step's value, nearly blind to a slow trend."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size < 3:
        raise ValueError(f"need at least 3 steps to measure step-to-step noise, got {v.size}")
    return float(np.diff(v).std(ddof=1) / math.sqrt(2))


def _value(chain: dict, name: str) -> Optional[float]:
    """A reward (``rewards``), an image metric of the final image (``model``) or a held-out panel metric
    (``panel``) of one chain; None where it does not apply or failed."""
    for part in ("rewards", "model", "panel"):
        v = chain.get(part, {}).get(name)
        if v is not None:
            return float(v) if math.isfinite(v) else None
    return None


def chain_values(report: dict, name: str) -> np.ndarray:
    """Per-chain values of a reward or image metric in an eval.json (chains where it does not apply are left out)."""
    vals = (_value(c, name) for c in report["per_chain"])
    return np.asarray([v for v in vals if v is not None], dtype=float)


def crop_means(report: dict, name: str) -> Optional[dict[tuple, float]]:
    """(image_id, prompt_id) -> the mean of ``name`` over that crop's chains; None when the report does not name its
    crops (an older eval.json)."""
    if not all("prompt_id" in c for c in report["per_chain"]):
        return None
    by_crop: dict[tuple, list[float]] = {}
    for c in report["per_chain"]:
        v = _value(c, name)
        if v is not None:
            by_crop.setdefault((c.get("image_id"), c["prompt_id"]), []).append(v)
    return {k: float(np.mean(v)) for k, v in by_crop.items()}


def metric_names(*reports: dict) -> list[str]:
    """The image metrics every report scored (tools.eval's ``model`` columns), then the held-out panel's metrics
    every report has per chain (``panel``), each in the first report's order."""
    out = []
    for part in ("model", "panel"):
        names = [set(c.get(part, {})) for r in reports for c in r["per_chain"]]
        common = set.intersection(*names) if names else set()
        out += [n for n in reports[0]["per_chain"][0].get(part, {}) if n in common]
    return out


def pool(reports: Sequence[dict]) -> dict:
    """Several evaluations of the same crops (e.g. one run per seed) as one report whose chains are all of theirs:
    each crop's mean is then the mean over every report's chains of it, the pooled estimate a multi-seed
    comparison is judged on. Refuses reports of other data or crops (they cannot be pooled by crop)."""
    if len(reports) == 1:
        return reports[0]
    first = reports[0]
    for r in reports[1:]:
        if not same_crops(first, r):  # the same data and crops
            raise ValueError("only evaluations of the same crops can be pooled (the same --data, --split and --num)")
    steps = sorted({r.get("step") for r in reports}, key=str)
    return {"step": steps[0] if len(steps) == 1 else "/".join(map(str, steps)), "data": first.get("data"),
            "pooled": len(reports), "per_chain": [c for r in reports for c in r["per_chain"]]}


def _mean_variance(x: np.ndarray) -> float:
    """The variance of the mean of ``x`` (0 for a single value: no spread to measure)."""
    return float(x.var(ddof=1) / x.size) if x.size > 1 else 0.0


def same_crops(before: dict, after: dict) -> bool:
    """Both reports hold the same crops, each with its chains: the condition for pairing by crop."""
    keys = [{(c.get("image_id"), c.get("prompt_id")) for c in r["per_chain"]} for r in (before, after)]
    return (all("prompt_id" in c for r in (before, after) for c in r["per_chain"])
            and keys[0] == keys[1] and len(keys[0]) > 1 and before.get("data") == after.get("data"))


def compare(before: dict, after: dict, curves: Optional[dict] = None,
            rewards: Sequence[str] = REWARDS, metrics: Optional[Sequence[str]] = None) -> list[Change]:
    """One Change per reward (then per image metric: default, all that both reports hold) found in both."""
    paired = same_crops(before, after)
    names = [*rewards, *(metric_names(before, after) if metrics is None else metrics)]
    out = []
    for name in names:
        curve = (curves or {}).get(f"reward/{name}/mean")
        noise = step_to_step_noise([v for _, v in curve]) if curve and len(curve) >= 3 else None
        if paired:
            a, b = crop_means(before, name), crop_means(after, name)
            crops = sorted(set(a) & set(b), key=str)
            if not crops:
                continue
            x, y = np.array([a[k] for k in crops]), np.array([b[k] for k in crops])
            photos = [photo for photo, _ in crops]  # crop key: (image_id = the source photo, prompt_id)
            clustered = paired_clustered_se(y - x, photos) if None not in photos else None
            out.append(Change(name, float(x.mean()), float(y.mean()), len(crops), len(crops),
                              math.sqrt(_mean_variance(y - x)), noise, paired=True,
                              se_clustered=None if clustered is None else clustered.se_clustered,
                              n_photos=None if clustered is None else clustered.n_clusters))
            continue
        a, b = chain_values(before, name), chain_values(after, name)
        if not a.size or not b.size:
            continue
        se = math.sqrt(_mean_variance(a) + _mean_variance(b))
        out.append(Change(name, float(a.mean()), float(b.mean()), int(a.size), int(b.size), se, noise))
    return out


def _clustered_cell(c: Change, digits: int, name_photos: bool) -> str:
    """2 x the clustered s.e., or why there is none."""
    if not c.paired:
        return "-"
    if c.se_clustered is None:
        return "n/a (no photo ids)"
    if not math.isfinite(c.se_clustered):
        return f"n/a ({c.n_photos} photo)"
    return f"{2 * c.se_clustered:.{digits}f}" + (f" ({c.n_photos} photos)" if name_photos else "")


def markdown(changes: Sequence[Change], before_name: str, after_name: str) -> str:
    paired = [c for c in changes if c.paired]
    se = f"2 x std. error (paired by crop, {paired[0].n_after} crops)" if paired else "2 x std. error"
    photos = {c.n_photos for c in paired if c.se_clustered is not None and math.isfinite(c.se_clustered)}
    one_g = len(photos) == 1  # every row the same photos: name them once, in the header
    clustered = [f"2 x std. error (clustered by photo{f', {min(photos)} photos' if one_g else ''})"] if paired else []
    head = ["reward", before_name, after_name, "change", se, *clustered, "step-to-step noise", "beyond noise"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in changes:
        noise = "-" if c.step_noise is None else f"{c.step_noise:.3f}"
        digits = 4 if abs(c.before) < 10 else 2  # rewards in [0, 1] need 4 to show a +0.005; PSNR in dB 2
        cells = [c.reward, f"{c.before:.{digits}f}", f"{c.after:.{digits}f}", f"{c.delta:+.{digits}f}",
                 f"{2 * c.stderr:.{digits}f}", *([_clustered_cell(c, digits, not one_g)] if paired else []),
                 noise, "yes" if c.beyond_noise else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    if paired:
        lines += ["", ("beyond noise: the change exceeds 2 x the larger of the paired and the clustered std. error "
                       "(the paired one where there is no clustered one) and the step-to-step noise. The clustered "
                       "std. error has G - 1 degrees of freedom for G photos: with few photos, 2 x std. error is an "
                       "optimistic bar.")]
    return "\n".join(lines) + "\n"


def crops_needed(c: Change, effect: float) -> Optional[int]:
    """The crops a confirmatory evaluation needs to see a change of ``effect`` in ``c``'s reward beyond 2 standard
    errors with 80% power, from this comparison as the pilot: its crops' spread and its design effect (clustered
    over paired variance, at least 1); None unless paired with a spread."""
    if not c.paired or c.stderr <= 0:
        return None
    deff = 1.0
    if c.se_clustered is not None and math.isfinite(c.se_clustered):
        deff = max(1.0, (c.se_clustered / c.stderr) ** 2)
    return crops_for_power(c.stderr * math.sqrt(c.n_after), effect, deff)


def power_lines(changes: Sequence[Change], effect: float) -> list[str]:
    rows = [(c.reward, crops_needed(c, effect)) for c in changes]
    return ["", f"crops needed to see a change of {effect:g} beyond 2 x std. error with 80% power (this comparison "
            "as the pilot: its spread, clustered by photo):",
            *(f"- {name}: {n}" for name, n in rows if n is not None)]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.compare", description=__doc__.splitlines()[0])
    parser.add_argument("before", help="eval.json of the starting point; several joined by commas are pooled "
                        "(each crop's mean over all their chains: e.g. one run per seed)")
    parser.add_argument("after", help="eval.json after training; several joined by commas are pooled")
    parser.add_argument("--run", type=Path, default=None, help="the training run (its TensorBoard curves)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    parser.add_argument("--effect", type=float, default=None,
                        help="also print the crops a confirmatory evaluation needs to see a change this large")
    args = parser.parse_args(argv)
    reports = []
    for side in (args.before, args.after):
        group = []
        if not side.strip(","):
            raise SystemExit("an empty list of eval reports")
        for path in (Path(p) for p in side.split(",") if p):
            try:
                group.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError) as exc:
                raise SystemExit(f"cannot read eval report {path}: {exc}") from None
        try:
            reports.append(pool(group))
        except ValueError as exc:
            raise SystemExit(f"{side}: {exc}") from None
    curves = None
    if args.run is not None:
        log_dir = args.run / "tensorboard" if (args.run / "tensorboard").is_dir() else args.run
        curves = read_scalars(log_dir)
        if not curves:
            raise SystemExit(f"no TensorBoard scalars under {log_dir}")
    changes = compare(*reports, curves)
    table = markdown(changes, f"before (step {reports[0].get('step')})", f"after (step {reports[1].get('step')})")
    if args.effect is not None:
        table += "\n".join(power_lines(changes, args.effect)) + "\n"
    print(table, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
