"""Where the image reward can be gamed: the generation reward and the objective GRPO optimises, along the SR
residual's amplitude.

    python -m rl.reward_probe --checkpoint runs/sft_local/checkpoints [--config FILE] [--num 8]
                              [--samples-per-image 8] [--scales 0.5,0.8,1,1.25,1.5,2] [--out DIR] [key=value ...]

Samples of one input differ by their residual's noise pattern, its energy only by ~1.5%, so a sampler never
tries a globally sharper or smoother image and GRPO cannot learn one from its own samples. This probe tries it
by hand: every final image's difference to the bicubic upsampling of its stage input (the middle image) is
scaled by s, and the scaled images are scored by ``reward.metrics`` and ``reward.full_reference`` as in training.
Per scale it prints each metric's mean, the change of the generation reward (what ``rl.eval`` reports), and the
change of the decoupled objective (``grpo.decoupled_normalization``: each metric's change in units of its
within-group spread at s = 1, weighted as in the generation reward; what the image advantage rewards). A scale
where the generation reward rises while the decoupled objective falls is a gain one metric buys from the others.

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
    from rl.eval import load_samples, sample_chains
    from rl.eval_metrics import bicubic_upscale, no_downloads, usable_reward_metrics
    from rl.inference import build_sampler, default_device, load_inference_config, resolve_checkpoint

    configure_process(args.threads)
    ckpt = resolve_checkpoint(args.checkpoint)
    cfg, config_path = load_inference_config(args.config, ckpt, getattr(args, "overrides", ()))
    if cfg.chain.final_scale % cfg.chain.middle_scale:
        raise ValueError(f"chain.final_scale {cfg.chain.final_scale} is not a multiple of chain.middle_scale "
                         f"{cfg.chain.middle_scale}: the final stage's bicubic base cannot be formed")
    reward_cfg, dropped = usable_reward_metrics(cfg.reward, args.metric_weights)
    weights = {n: w for n, w in metric_weights(reward_cfg).items() if w > 0}
    if not weights:
        raise ValueError("reward.metrics / reward.full_reference: no usable metric with a weight > 0 to probe"
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
        raise ValueError(f"chains (prompt, sample) {missing[:4]} have no middle or final image to probe")
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
    return {"checkpoint": str(args.checkpoint), "export": str(ckpt.export), "config": str(config_path),
            "num_images": len(samples), "samples_per_image": G, "metrics": weights, "dropped": dropped,
            "rows": [asdict(r) for r in rows]}


def build_parser() -> argparse.ArgumentParser:
    from rl.inference import model_arguments

    p = model_arguments("python -m rl.reward_probe", __doc__.split("\n\n")[0])
    p.set_defaults(engine="hf")  # a short sampling job: no vLLM start-up
    p.add_argument("--data", default="skimage", help="skimage, an image folder, or a .jsonl manifest (with HR)")
    p.add_argument("--split", default="eval", choices=("eval", "train", "all"))
    p.add_argument("--num", type=int, default=8, help="number of images (default 8)")
    p.add_argument("--samples-per-image", type=int, default=8, help="chains per image: the group (default 8)")
    p.add_argument("--scales", type=lambda v: [float(x) for x in v.split(",")], default=list(DEFAULT_SCALES),
                   help="residual scales, comma-separated (1 is always added)")
    p.add_argument("--metric-weights", default=None, help="folder with pyiqa weight files (offline metrics)")
    p.add_argument("--batch-size", type=int, default=4, help="images per sampler call")
    p.add_argument("--out", default=None, help="output folder (default: ./probe/<export folder name>)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    for flag, value, low in (("--num", args.num, 1), ("--samples-per-image", args.samples_per_image, 2),
                             ("--batch-size", args.batch_size, 1)):
        if value < low:
            print(f"rl.reward_probe: {flag} {value} must be >= {low}", file=sys.stderr)
            return 2
    if any(not s >= 0 for s in args.scales):
        print(f"rl.reward_probe: --scales {args.scales}: every scale must be >= 0", file=sys.stderr)
        return 2
    from core.checkpoint import CheckpointError
    from core.config import ConfigError
    from data.dataset import DataSourceError

    try:
        report = probe(args)
    except (CheckpointError, ConfigError, DataSourceError, FileNotFoundError, ValueError) as exc:
        print(f"rl.reward_probe: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("probe") / Path(report["export"]).name
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(report, indent=2))
    rows = [ProbeRow(**r) for r in report["rows"]]
    md = (f"# Reward probe: {report['export']}\n\n{report['num_images']} images x {report['samples_per_image']} "
          f"chains; metrics {report['metrics']}\n\n" + to_markdown(rows, list(report["metrics"])))
    (out / "probe.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
