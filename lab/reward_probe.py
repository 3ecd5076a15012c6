"""Where the image reward can be gamed: the generation reward and the objective GRPO optimises, along the SR
residual's amplitude.

    python -m lab.reward_probe --checkpoint runs/sft_local/checkpoints [--config FILE] [--num 8]
                               [--samples-per-image 8] [--scales 0.5,0.8,1,1.25,1.5,2] [--vote-std 0.3]
                               [--out DIR] [key=value ...]

Samples of one input differ by their residual's noise pattern, its energy only by ~1.5%, so a sampler never
tries a globally sharper or smoother image and GRPO cannot learn one from its own samples. This probe tries it
by hand: every final image's difference to the bicubic upsampling of its stage input (the middle image) is
scaled by s, and the scaled images are scored by ``reward.metrics`` and ``reward.full_reference`` as in training.
Per scale it prints each metric's mean, the change of the generation reward (what ``tools.eval`` reports), and the
change of the decoupled objective (``grpo.decoupled_normalization``: each metric's change in units of its
within-group spread at s = 1, weighted as in the generation reward; what the image advantage rewards). A scale
where the generation reward rises while the decoupled objective falls is a gain one metric buys from the others.
Then GRPO's vote on that direction (``gain_vote``): with every image given a random log-normal gain, as
``experimental.detail_gain_std`` does, do the group advantages of the plain generation reward favour the more detailed
images? A vote near 0 leaves the image loss nothing to learn along it.

Writes OUT/probe.json and OUT/probe.md (default OUT: ./probe/<export folder name>).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

DEFAULT_SCALES = (0.5, 0.8, 1.0, 1.25, 1.5, 2.0)


def scale_residual(image: np.ndarray, base: np.ndarray, scale: float) -> np.ndarray:
    """base + scale * (image - base), rounded and clipped to uint8: the image with its detail amplified (s > 1)
    or damped (s < 1) about the bicubic upsampling ``base``.

    >>> scale_residual(np.array([[[110]]], np.uint8), np.array([[[100]]], np.uint8), 2.0).tolist()
    [[[120]]]
    """
    if image.shape != base.shape:
        raise ValueError(f"image {image.shape} and its bicubic base {base.shape} differ in shape")
    out = base.astype(np.float64) + scale * (image.astype(np.float64) - base.astype(np.float64))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class ProbeRow:
    scale: float
    raw: dict[str, float]  # metric -> mean of its own score
    generation: float  # mean generation reward
    generation_change: float  # against s = 1
    objective_change: float  # decoupled objective against s = 1, in group-std units
    objective_se: float  # its standard error over the groups


def decoupled_scores(values: np.ndarray, reference: np.ndarray, weights: Sequence[float],
                     eps: float = 1e-6) -> np.ndarray:
    """values (groups, G, M) -> (groups, G): each image's weighted sum over metrics of its value's distance from
    the mean of the ``reference`` group of its input, in units of that group's unbiased std + eps; weights
    normalised to sum 1. With values = reference this is exactly training's ``core.grpo.decoupled_rewards``."""
    w = np.asarray(weights, np.float64) / float(np.sum(weights))
    mean, std = reference.mean(axis=1, keepdims=True), reference.std(axis=1, ddof=1, keepdims=True)
    return (((values - mean) / (std + eps)) * w).sum(axis=2)


def probe_rows(values: Mapping[float, np.ndarray], raw: Mapping[float, np.ndarray],
               generation: Mapping[float, np.ndarray], names: Sequence[str], weights: Sequence[float],
               eps: float = 1e-6) -> list[ProbeRow]:
    """values[s] (groups, G, M): each image's normalised metric values (``quality/<metric>``, 1 best) at scale s;
    raw[s] the metrics' own scores, same shape; generation[s] (groups, G). Scale 1.0 must be present: the
    sampler's own images, the group every scale is measured against (``decoupled_scores``), so the objective's
    change at s = 1 is 0 by construction."""
    if 1.0 not in values:
        raise ValueError(f"scales {sorted(values)} must include 1.0, the sampler's own images")
    ref = values[1.0]
    if ref.ndim != 3 or ref.shape[2] != len(names) or len(weights) != len(names):
        raise ValueError(f"values must be (groups, G, {len(names)}) for metrics {list(names)}, got {ref.shape}")
    if ref.shape[1] < 2:
        raise ValueError("the decoupled objective needs G >= 2 images per input (a group has no spread otherwise)")
    rows = []
    for s in sorted(values):
        per_group = decoupled_scores(values[s], ref, weights, eps).mean(axis=1)  # (groups,)
        se = float(per_group.std(ddof=1) / np.sqrt(len(per_group))) if len(per_group) > 1 else float("nan")
        rows.append(ProbeRow(scale=float(s), raw={n: float(raw[s][..., k].mean()) for k, n in enumerate(names)},
                             generation=float(generation[s].mean()),
                             generation_change=float(generation[s].mean() - generation[1.0].mean()),
                             objective_change=float(per_group.mean()), objective_se=se))
    return rows


@dataclass(frozen=True)
class GainVote:
    """How GRPO's advantages vote on a common detail gain (``experimental.detail_gain_std``): mean over images of the
    std-scaled group advantage x the image's log-gain. > 0: the better images of an input are its more detailed
    ones, so the image loss is pushed towards more detail."""

    std: float  # the log-gains' std (experimental.detail_gain_std)
    mean: float
    step_se: float  # std over draws of one step's vote (all groups once): how much one step's vote varies
    positive_share: float  # share of inputs whose vote, averaged over the draws, is > 0


def gain_vote(generation: Mapping[float, np.ndarray], std: float, draws: int = 200, seed: int = 0,
              eps: float = 1e-6) -> GainVote:
    """generation[s] (groups, G): each image's generation reward with its residual scaled by s. Each draw gives
    every image a log-gain z ~ N(0, std^2) and its reward interpolated (linear in log s, held at the ends)
    between the positive scales, then the group advantages (r - mean) / (std + eps) as in training
    (``grpo.scale_by_std``); the vote is the mean of advantage x z.

    >>> up = {0.5: np.array([[0.1, 0.1]]), 1.0: np.array([[0.2, 0.2]]), 2.0: np.array([[0.3, 0.3]])}
    >>> v = gain_vote(up, 0.3, draws=50); v.mean > 0 and v.positive_share == 1.0
    True
    """
    scales = sorted(s for s in generation if s > 0)
    if len(scales) < 2 or not std > 0:
        raise ValueError(f"a gain vote needs >= 2 positive scales (got {scales}) and std > 0 (got {std})")
    logs, table = np.log(scales), np.stack([generation[s] for s in scales], axis=-1)  # (groups, G, S)
    groups, G, _ = table.shape
    z = np.random.default_rng(seed).normal(0.0, std, (draws, groups, G))
    r = np.empty_like(z)
    for p in range(groups):
        for g in range(G):
            r[:, p, g] = np.interp(z[:, p, g], logs, table[p, g])
    adv = (r - r.mean(axis=2, keepdims=True)) / (r.std(axis=2, ddof=1, keepdims=True) + eps)
    votes = (adv * z).mean(axis=2)  # (draws, groups)
    return GainVote(std=float(std), mean=float(votes.mean()), step_se=float(votes.mean(axis=1).std(ddof=1)),
                    positive_share=float((votes.mean(axis=0) > 0).mean()))


def to_markdown(rows: Sequence[ProbeRow], names: Sequence[str]) -> str:
    head = ["scale", *names, "generation", "change", "decoupled objective (group std)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r.scale:g}", *(f"{r.raw[n]:.4g}" for n in names), f"{r.generation:.4f}",
                 f"{r.generation_change:+.4f}", f"{r.objective_change:+.2f} ± {2 * r.objective_se:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ the run
def probe(args: argparse.Namespace) -> dict:
    from core.env import configure_process
    from rewards.quality import build_quality_scorer, generation_reward
    from rewards.total import metric_weights
    from rewards.eval_metrics import bicubic_upscale, no_downloads, usable_reward_metrics
    from tools.eval import load_samples, sample_chains
    from tools.inference import (UsageError, build_sampler, default_device, load_inference_config,
                                 resolve_checkpoint)

    configure_process(args.threads)
    ckpt = resolve_checkpoint(args.checkpoint)
    cfg, config_path = load_inference_config(args.config, ckpt, getattr(args, "overrides", ()))
    if cfg.chain.final_scale % cfg.chain.middle_scale:
        raise UsageError(f"chain.final_scale {cfg.chain.final_scale} is not a multiple of chain.middle_scale "
                         f"{cfg.chain.middle_scale}: the final stage's bicubic base cannot be formed")
    reward_cfg, dropped = usable_reward_metrics(cfg.reward, args.metric_weights)
    weights = {n: w for n, w in metric_weights(reward_cfg).items() if w > 0}
    if not weights:
        raise UsageError("reward.metrics / reward.full_reference: no usable metric with a weight > 0 to probe"
                         + (f" (dropped: {dropped})" if dropped else ""))
    device = args.device or default_device()
    samples, _ = load_samples(cfg, args.data, args.split, args.num, False)
    sampler = build_sampler(cfg, args.engine, False, device, seed=args.seed)
    G = args.samples_per_image
    rollouts, _ = sample_chains(sampler, samples, G, args.batch_size, args.seed)
    with no_downloads():
        scorer = build_quality_scorer(reward_cfg.metrics, device, reward_cfg.full_reference,
                                      timeout_s=reward_cfg.metric_timeout_s)
    up = cfg.chain.final_scale // cfg.chain.middle_scale
    missing = [(r.prompt_id, r.sample_index) for r in rollouts if not {"middle", "final"} <= set(r.images)]
    if missing:
        raise UsageError(f"chains (prompt, sample) {missing[:4]} have no middle or final image to probe")
    finals = [r.images["final"] for r in rollouts]
    bases = [bicubic_upscale(r.images["middle"], up) for r in rollouts]
    hrs = [s.hr for s in samples for _ in range(G)]
    names = list(weights)
    values, raw, generation = {}, {}, {}
    for s in sorted(set(args.scales) | {1.0}):
        scores = scorer([scale_residual(f, b, s) for f, b in zip(finals, bases)], hrs)
        for q in scores:
            if q.errors:
                raise RuntimeError(f"scale {s}: a metric failed: {q.errors}")
        values[s] = np.array([[q.values[n] for n in names] for q in scores]).reshape(len(samples), G, len(names))
        raw[s] = np.array([[q.raw[n] for n in names] for q in scores]).reshape(len(samples), G, len(names))
        generation[s] = np.array([generation_reward(q, weights, reward_cfg.failed_metric)
                                  for q in scores]).reshape(len(samples), G)
    rows = probe_rows(values, raw, generation, names, [weights[n] for n in names])
    vote = gain_vote(generation, args.vote_std, seed=args.seed) if args.vote_std > 0 else None
    return {"checkpoint": str(args.checkpoint), "export": str(ckpt.export), "config": str(config_path),
            "num_images": len(samples), "samples_per_image": G, "metrics": weights, "dropped": dropped,
            "rows": [asdict(r) for r in rows], "vote": None if vote is None else asdict(vote)}


def build_parser() -> argparse.ArgumentParser:
    from tools.inference import model_arguments

    p = model_arguments("python -m lab.reward_probe", __doc__.split("\n\n")[0])
    p.set_defaults(engine="hf")  # a short sampling job: no vLLM start-up
    p.add_argument("--data", default="skimage", help="skimage, an image folder, or a .jsonl manifest (with HR)")
    p.add_argument("--split", default="eval", choices=("eval", "train", "all"))
    p.add_argument("--num", type=int, default=8, help="number of images (default 8)")
    p.add_argument("--samples-per-image", type=int, default=8, help="chains per image: the group (default 8)")
    p.add_argument("--scales", type=lambda v: [float(x) for x in v.split(",")], default=list(DEFAULT_SCALES),
                   help="residual scales, comma-separated (1 is always added)")
    p.add_argument("--vote-std", type=float, default=0.3,
                   help="log-gain std of the gain vote (experimental.detail_gain_std; 0: no vote; default 0.3)")
    p.add_argument("--metric-weights", default=None, help="folder with pyiqa weight files (offline metrics)")
    p.add_argument("--batch-size", type=int, default=4, help="images per sampler call")
    p.add_argument("--out", default=None, help="output folder (default: ./probe/<export folder name>)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from tools.inference import UsageError, check_at_least, run_tool

    def work() -> int:
        check_at_least("--num", args.num, 1)
        check_at_least("--samples-per-image", args.samples_per_image, 2)
        check_at_least("--batch-size", args.batch_size, 1)
        check_at_least("--vote-std", args.vote_std, 0)
        if any(not s >= 0 for s in args.scales):
            raise UsageError(f"--scales {args.scales}: every scale must be >= 0")
        if args.vote_std > 0 and len({s for s in args.scales if s > 0} | {1.0}) < 2:
            raise UsageError(f"--scales {args.scales}: the gain vote (--vote-std {args.vote_std}) needs a positive "
                             f"scale besides 1")
        report = probe(args)
        out = Path(args.out) if args.out else Path("probe") / Path(report["export"]).name
        out.mkdir(parents=True, exist_ok=True)
        (out / "probe.json").write_text(json.dumps(report, indent=2))
        rows = [ProbeRow(**r) for r in report["rows"]]
        md = (f"# Reward probe: {report['export']}\n\n{report['num_images']} images x {report['samples_per_image']} "
              f"chains; metrics {report['metrics']}\n\n" + to_markdown(rows, list(report["metrics"])))
        if report["vote"] is not None:
            v = GainVote(**report["vote"])
            md += (f"\nGRPO's vote on a detail gain (log-gains N(0, {v.std:g}^2), group advantages of the generation "
                   f"reward): mean advantage x log-gain {v.mean:+.4f} (one step's: +- {v.step_se:.4f}); inputs "
                   f"voting for more detail: {v.positive_share:.0%}\n")
        (out / "probe.md").write_text(md)
        print(md)
        return 0

    return run_tool("lab.reward_probe", work)


if __name__ == "__main__":
    sys.exit(main())
