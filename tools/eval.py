"""Held-out evaluation of a trained checkpoint: rewards and the paper's image metrics, against bicubic x4.

    python -m tools.eval --checkpoint runs/grpo_local/checkpoints --data skimage [--split eval] [--num N]
                         [--samples-per-image K] [--out DIR] [--config FILE] [--engine vllm|hf] [--greedy]
                         [--real-lr] [--metric-weights DIR] [--save-images] [--threads T] [key=value ...]

Synthetic mode (default): LR images are synthesised from HR crops by the training degradation pipeline
(``PairDataset`` with the config's data section, ``source`` = ``--data``), so every reward applies and the
full-reference metrics have their HR (``--split all`` takes every image of a folder of held-out HR images).
``--real-lr``: ``--data`` is a folder of real LR images, used as they are (no HR, no degradation labels): only
the format / understanding (if tags exist) / no-reference terms apply; sizes the SR model cannot take are
reflect-padded and every stage image cropped back (``tools.inference.fit_lr``).

Writes ``OUT/eval.json`` (summary + per-chain values) and ``OUT/eval.md`` (two tables). Reward means are over
all chains (``--samples-per-image`` per image); the bicubic baseline is computed once per image. Each per-chain
record names its crop (``prompt_id``) and the photo it was cut from (``image_id``; ``--num`` above the number of
photos cuts several crops from each): ``tools.compare`` pairs by crop and clusters by photo.

The image metrics are the paper's (``rewards.eval_metrics``: which run offline, and why the others are skipped);
every metric is also computed for the bicubic x4 upsampling of the same LR image, the baseline column.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from core.chain import TEXT_TAGS
from rewards.eval_metrics import (
    PAPER_METRICS,
    bicubic_upscale,
    build_image_metrics,
    metric_scorer,
    no_downloads,
    panel_markdown,
    panel_report,
    usable_reward_metrics,
)

log = logging.getLogger("tools.eval")

REWARD_PARTS: tuple[str, ...] = ("format", "degradation", "understanding", "generation", "total")
REWARD_NOTES = {  # why a component is missing for every chain (rewards/total.py's applicability rules)
    "degradation": "not applicable: no degradation labels (real LR)",
    "understanding": "not applicable: the images have no content tags",
    "generation": "not applicable: no reward metric configured or usable",
}

def load_samples(cfg, data: str, split: str, num: Optional[int], real_lr: bool) -> tuple[list, dict]:
    """The evaluation samples and a description of where they came from."""
    from core.images import BadImageError, load_rgb
    from core.records import Sample
    from data.dataset import PairDataset, list_source

    if real_lr:
        entries = list_source(data)
        samples, skipped = [], []
        for entry in entries:
            if num is not None and len(samples) >= num:
                break
            try:
                lr = load_rgb(entry.path)
            except BadImageError as exc:
                print(f"skipped {entry.path}: {exc.reason}", file=sys.stderr)
                skipped.append(entry.path)
                continue
            samples.append(Sample(prompt_id=len(samples), image_id=entry.image_id, lr=lr, hr=None,
                                  tags=entry.tags, degradation=None))
        if not samples:
            raise SystemExit(f"tools.eval: no usable image in {data}")
        return samples, {"source": data, "mode": "real-lr", "skipped": skipped}
    dcfg = replace(cfg.data, source=data, eval_source=data if split == "all" else None)
    ds = PairDataset(dcfg, "train" if split == "train" else "eval")
    # default: one crop of each usable image (sample() moves past skipped files to the next usable one)
    n = num if num is not None else max(1, len(ds) - sum(ds.stats.values()))
    samples = ds.batch(0, n)
    return samples, {"source": data, "mode": "synthetic", "split": split,
                     "images": list(dict.fromkeys(s.image_id for s in samples)),
                     "skipped": {k: v for k, v in ds.stats.items() if v}}


def _mean(values: Sequence[float]) -> Optional[float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def evaluate(args: argparse.Namespace) -> dict:
    from core.env import configure_process
    from tools.inference import build_sampler, default_device, load_inference_config, resolve_checkpoint

    configure_process(args.threads)  # CPU: torch threads capped (oversubscribed cores ran 20x slower here)
    start = time.perf_counter()
    ckpt = resolve_checkpoint(args.checkpoint)
    cfg, config_path = load_inference_config(args.config, ckpt, getattr(args, "overrides", ()))
    device = args.device or default_device()
    samples, data_info = load_samples(cfg, args.data, args.split, args.num, args.real_lr)
    timings = {"data_s": time.perf_counter() - start}

    t0 = time.perf_counter()
    sampler = build_sampler(cfg, args.engine, args.greedy, device, seed=args.seed)
    timings["load_s"] = time.perf_counter() - t0
    spi = args.samples_per_image

    t0 = time.perf_counter()  # 1. chains
    chain_samples = [s for s in samples for _ in range(spi)]
    ordered, fitted = sample_chains(sampler, samples, spi, args.batch_size, args.seed)
    timings["chains_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()  # 2. rewards, exactly as in training, with metrics that cannot run offline left out
    reward_cfg, dropped = usable_reward_metrics(cfg.reward, args.metric_weights)
    scores = _rewards(ordered, chain_samples, reward_cfg, device)
    timings["rewards_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()  # 3. image metrics: the model's (every chain) and bicubic's (once per image)
    scale = cfg.chain.final_scale
    metrics = build_image_metrics(PAPER_METRICS, all(s.hr is not None for s in samples), device,
                                  args.metric_weights)
    scorer = metric_scorer(metrics, device)
    finals = [r.images.get("final") for r in ordered]
    model_values = image_metric_values(scorer, finals, [s.hr for s in chain_samples])
    bicubics = {s.prompt_id: bicubic_upscale(s.lr, scale) for s in samples}
    bicubic_values = dict(zip(bicubics, image_metric_values(scorer, list(bicubics.values()),
                                                            [s.hr for s in samples])))
    panel_values, panel = panel_report(cfg.trainer.eval_panel, finals, [s.hr for s in chain_samples], device)
    per_chain = [{"image_id": s.image_id, "prompt_id": s.prompt_id, "sample_index": r.sample_index,
                  "lr_size": list(s.lr.shape[:2]), "notes": list(fitted[s.prompt_id].notes),
                  "rewards": dict(sc.parts) | {"total": sc.total}, "reward_errors": dict(sc.errors),
                  "model": values, "bicubic": bicubic_values[s.prompt_id],
                  **({"panel": panel_values[i]} if panel_values else {}), "text": r.text}
                 for i, (s, r, sc, values) in enumerate(zip(chain_samples, ordered, scores, model_values))]
    if args.save_images:
        _save_images(Path(args.out), samples, ordered, bicubics)
    timings["metrics_s"] = time.perf_counter() - t0

    timings["total_s"] = time.perf_counter() - start
    return {
        "checkpoint": str(args.checkpoint), "export": str(ckpt.export), "step": ckpt.step,
        "config": str(config_path), "overrides": list(getattr(args, "overrides", ())),
        "engine": getattr(sampler, "engine_name", args.engine), "greedy": bool(args.greedy),
        "seed": args.seed,
        "device": device, "scale": scale, "data": data_info, "num_images": len(samples),
        "samples_per_image": spi, "num_chains": len(per_chain),
        "rewards": reward_summary(per_chain, reward_cfg, dropped),
        "metrics": metric_summary(metrics, per_chain, list(bicubic_values.values())),
        "panel": panel,
        "per_chain": _jsonable(per_chain), "timings": timings,
    }


def sample_chains(sampler, samples: Sequence, spi: int, batch_size: int, seed: int) -> tuple[list, dict]:
    """``spi`` chains per sample in sample order, and each sample's ``Fitted``. Real LR of any size: the UNet
    needs multiples of its downsampling factor, so each LR is padded (every pixel kept) and every stage image
    cropped back; synthetic LR passes unchanged. One sampler call per LR size, ``batch_size`` samples each."""
    import torch

    from tools.inference import crop_output, fit_lr, lr_multiple

    multiple = lr_multiple(sampler.pipeline, sampler.scales)
    fitted = {}
    for s in samples:
        fitted[s.prompt_id] = f = fit_lr(s.lr, multiple)
        for note in f.notes:
            print(f"note: {s.image_id}: {note}", file=sys.stderr)
    rollouts: dict[tuple[int, int], Any] = {}
    by_shape: dict[tuple, list] = {}
    for s in samples:
        by_shape.setdefault(fitted[s.prompt_id].lr.shape, []).append(s)
    for group in by_shape.values():
        for i in range(0, len(group), batch_size):
            batch = [replace(s, lr=fitted[s.prompt_id].lr) for s in group[i:i + batch_size]]
            with torch.no_grad():  # sampling only: no autograd graph for the chain
                for r in sampler.sample(batch, group_size=spi, seed=seed):
                    f = fitted[r.prompt_id]
                    r.images = {k: crop_output(v, f, sampler.scales[k]) for k, v in r.images.items()}
                    rollouts[(r.prompt_id, r.sample_index)] = r
    return [rollouts[(s.prompt_id, k)] for s in samples for k in range(spi)], fitted


def _rewards(rollouts: Sequence, samples: Sequence, reward_cfg, device: str) -> list:
    from rewards.quality import build_reward_scorers
    from rewards.total import score_rollouts

    with no_downloads():
        scorer, stage_scorer = build_reward_scorers(reward_cfg, device)
    return score_rollouts(rollouts, samples, reward_cfg, scorer, stage_scorer)


def image_metric_values(scorer, images: Sequence[Optional[np.ndarray]], hrs: Sequence[Optional[np.ndarray]],
                        chunk: int = 16) -> list[dict[str, float]]:
    """label -> raw score for every image (nan where it failed or there is no image), scored ``chunk`` images
    at a time (bounds the network metrics' memory)."""
    labels = list(scorer.weights)
    out = [{label: math.nan for label in labels} for _ in images]
    have = [i for i, im in enumerate(images) if im is not None]
    for lo in range(0, len(have), chunk):
        idx = have[lo:lo + chunk]
        for i, q in zip(idx, scorer([images[i] for i in idx], [hrs[i] for i in idx])):
            out[i].update(q.raw)
            for label, why in q.errors.items():
                log.warning("%s failed on an image: %s", label, why)
    return out


def _save_images(out: Path, samples: Sequence, rollouts: Sequence, bicubics: dict) -> None:
    from core.images import save_png

    for s in samples:
        base = out / "images" / f"{s.prompt_id:04d}_{_safe(s.image_id)}"
        save_png(f"{base}_lr.png", s.lr)
        save_png(f"{base}_bicubic.png", bicubics[s.prompt_id])
        if s.hr is not None:
            save_png(f"{base}_hr.png", s.hr)
    by_id = {s.prompt_id: s for s in samples}
    for r in rollouts:
        base = f"{r.prompt_id:04d}_{_safe(by_id[r.prompt_id].image_id)}"
        for stage, image in r.images.items():
            save_png(out / "images" / f"{base}_s{r.sample_index}_{stage}.png", image)


def reward_summary(per_chain: Sequence[dict], reward_cfg, dropped: dict[str, str]) -> dict[str, dict]:
    """Per reward part (format, each section's format, degradation, understanding, generation, each quality
    metric, total): the mean over the chains it applies to, their count, and a note."""
    out = {}
    details = {k for row in per_chain for k in row["rewards"] if "/" in k}  # format/<section>, quality/<metric>
    section_parts = tuple(f"format/{tag}" for tag in TEXT_TAGS if f"format/{tag}" in details)
    quality_parts = tuple(sorted(k for k in details if k.startswith("quality/")))
    for part in REWARD_PARTS[:1] + section_parts + REWARD_PARTS[1:-1] + quality_parts + REWARD_PARTS[-1:]:
        vals = [row["rewards"][part] for row in per_chain if part in row["rewards"]]
        note = "" if vals else REWARD_NOTES.get(part, "not applicable")
        if part == "generation" and dropped:
            note = "; ".join(filter(None, [note, *(f"{k} left out: {v}" for k, v in dropped.items())]))
        if part == "total":
            note = "weighted sum " + " + ".join(f"{w:g}*{k}" for k, w in vars(reward_cfg.weights).items())
        out[part] = {"mean": _mean(vals), "n": len(vals), "note": note}
    return out


def metric_summary(metrics: Sequence, per_chain: Sequence[dict], bicubic_rows: Sequence[dict]) -> dict[str, dict]:
    """Per image metric: the model's mean over chains, bicubic's over images, and whether the model beats it."""
    out = {}
    for m in metrics:
        label = m.spec.label
        if m.fn is None:
            out[label] = {"model": None, "bicubic": None, "n": 0, "skipped": True,
                          "lower_better": m.spec.lower_better, "pyiqa": m.spec.pyiqa_name,
                          "note": f"skipped: {m.reason}"}
            continue
        model_vals = [row["model"][label] for row in per_chain]
        failed = sum(1 for v in model_vals if not math.isfinite(v))
        note = m.spec.note + (f"; failed on {failed} chain(s)" if failed else "")
        model_mean, bic_mean = _mean(model_vals), _mean([row[label] for row in bicubic_rows])
        better = None
        if model_mean is not None and bic_mean is not None:
            better = model_mean < bic_mean if m.spec.lower_better else model_mean > bic_mean
        out[label] = {"model": model_mean, "bicubic": bic_mean, "n": len(model_vals) - failed, "skipped": False,
                      "beats_bicubic": better, "lower_better": m.spec.lower_better, "pyiqa": m.spec.pyiqa_name,
                      "note": note.strip("; ")}
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _jsonable(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def to_markdown(report: dict) -> str:
    arrow = lambda lower: "↓" if lower else "↑"
    mode = report["data"]["mode"]
    lines = [
        f"# Evaluation of {report['export']}" + (f" (step {report['step']})" if report["step"] is not None else ""),
        "",
        f"- data: `{report['data']['source']}` ({mode}"
        + (f", split {report['data']['split']}" if mode == "synthetic" else "")
        + f"), {report['num_images']} images x {report['samples_per_image']} chain(s)",
        f"- engine: {report['engine']}{', greedy text' if report['greedy'] else ''}; config `{report['config']}`;"
        f" device {report['device']}; seed {report['seed']}",
        "",
        "## Rewards",
        "",
        "| reward | mean | n | note |",
        "|---|---|---|---|",
    ]
    for part, r in report["rewards"].items():
        lines.append(f"| {part} | {_fmt(r['mean'])} | {r['n']} | {r['note']} |")
    lines += ["", f"## Image metrics (model vs bicubic x{report['scale']})", "",
              "| metric | model | bicubic | beats bicubic | n | note |", "|---|---|---|---|---|---|"]
    for label, m in report["metrics"].items():
        beats = {True: "yes", False: "no"}.get(m.get("beats_bicubic"), "-")
        lines.append(f"| {label}{arrow(m['lower_better'])} | {_fmt(m['model'])} | {_fmt(m['bicubic'])} "
                     f"| {beats} | {m['n']} | {m['note']} |")
    lines += panel_markdown(report.get("panel", {}))
    lines += ["", f"Total time {report['timings']['total_s']:.1f} s.", ""]
    return "\n".join(lines)


def default_out(ckpt) -> Path:
    """runs/<name>/eval/step_N for a checkpoint inside a run (never inside the checkpoint itself), else
    ./eval/<export folder name>."""
    if ckpt.step_dir is not None and ckpt.step_dir.parent.name == "checkpoints":
        return ckpt.step_dir.parent.parent / "eval" / ckpt.step_dir.name
    return Path("eval") / ckpt.export.name


def build_parser() -> argparse.ArgumentParser:
    from tools.inference import model_arguments

    p = model_arguments("python -m tools.eval", __doc__.split("\n\n")[0])
    p.add_argument("--data", default="skimage", help="skimage, an image folder, or a .jsonl manifest")
    p.add_argument("--split", default="eval", choices=("eval", "train", "all"),
                   help="held-out images of --data (default), the training ones, or all of them")
    p.add_argument("--num", type=int, default=None, help="number of images (default: all of the split)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<name>/eval/step_N, else ./eval/<export>)")
    p.add_argument("--samples-per-image", type=int, default=1, help="chains sampled per image (default 1)")
    p.add_argument("--real-lr", action="store_true", help="--data holds real LR images: no synthesis, no HR")
    p.add_argument("--metric-weights", default=None, help="folder with pyiqa weight files (offline metrics)")
    p.add_argument("--batch-size", type=int, default=4, help="images per sampler call")
    p.add_argument("--save-images", action="store_true", help="also write OUT/images/*.png")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from tools.inference import check_at_least, resolve_checkpoint, run_tool

    def work() -> int:
        if args.num is not None:
            check_at_least("--num", args.num, 1)
        check_at_least("--samples-per-image", args.samples_per_image, 1)
        check_at_least("--batch-size", args.batch_size, 1)
        if args.out is None:
            args.out = str(default_out(resolve_checkpoint(args.checkpoint)))
        report = evaluate(args)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(report, indent=1, allow_nan=False))
        (out / "eval.md").write_text(to_markdown(report))
        print(to_markdown(report))
        print(f"wrote {out / 'eval.json'} and {out / 'eval.md'}")
        return 0

    return run_tool("tools.eval", work)


if __name__ == "__main__":
    sys.exit(main())
