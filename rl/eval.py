"""Held-out evaluation of a trained checkpoint: rewards and the paper's image metrics, against bicubic x4.

    python -m rl.eval --checkpoint runs/grpo_local/checkpoints --data skimage [--split eval] [--num N]
                      [--samples-per-image K] [--out DIR] [--config FILE] [--engine vllm|hf] [--greedy]
                      [--real-lr] [--metric-weights DIR] [--save-images] [--threads T] [key=value ...]

Synthetic mode (default): LR images are synthesised from HR crops by the training degradation pipeline
(``PairDataset`` with the config's data section, ``source`` = ``--data``), so every reward applies and the
full-reference metrics have their HR (``--split all`` takes every image of a folder of held-out HR images).
``--real-lr``: ``--data`` is a folder of real LR images, used as they are (no HR, no degradation labels): only
the format / understanding (if tags exist) / no-reference terms apply; sizes the SR model cannot take are
reflect-padded and every stage image cropped back (``rl.inference.fit_lr``).

Writes ``OUT/eval.json`` (summary + per-chain values) and ``OUT/eval.md`` (two tables). Reward means are over
all chains (``--samples-per-image`` per image); the bicubic baseline is computed once per image.

Metrics (paper.md 7.1): with HR, PSNR and SSIM on the Y channel (``test_y_channel=True, color_space='ycbcr'``),
LPIPS, DISTS; on every image NIQE, MUSIQ, MANIQA (pipal), CLIPIQA, TOPIQ (topiq_nr, the reward's KonIQ
variant), plus PIQE (classical, offline). Network metrics need weight files; each is looked up on disk BEFORE
the metric is created (pyiqa would otherwise try to download, which fails or hangs offline), and a metric
whose files are missing is listed as skipped with the file it lacks; any other download pyiqa attempts while
a metric is created fails at once (``no_downloads``) and skips that metric, naming the URL. Every metric is also computed for the
bicubic x4 upsampling of the same LR image, the baseline column.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from rl.chain import TEXT_TAGS

log = logging.getLogger("rl.eval")

REWARD_PARTS: tuple[str, ...] = ("format", "degradation", "understanding", "generation", "total")
REWARD_NOTES = {  # why a component is missing for every chain (rewards/total.py's applicability rules)
    "degradation": "not applicable: no degradation labels (real LR)",
    "understanding": "not applicable: the images have no content tags",
    "generation": "not applicable: no reward metric configured or usable",
}
# Metrics that pyiqa computes without any weight file (environment.md).
OFFLINE_METRICS = frozenset({"psnr", "ssim", "ms_ssim", "piqe", "fsim", "gmsd", "vif", "vsi", "nlpd", "mad",
                             "cw_ssim", "entropy", "psnry", "ssimc"})


# ============================================================================================ weight files
@dataclass(frozen=True)
class WeightFile:
    """A file a metric loads. ``kind`` says where its loader looks:

    pyiqa: pyiqa's cache (``<torch hub>/pyiqa``) or ``--metric-weights``; found -> passed as ``option``.
    torchvision: ``<torch hub>/checkpoints`` (torchvision's fixed place; the backbone weights of LPIPS/DISTS).
    clip: ``<torch hub>/clip`` or ``--metric-weights``; found -> passed as ``option`` (pyiqa's CLIP loader).
    hf: a timm backbone in the Hugging Face cache (repo id in ``name``; looked up without network).
    """

    name: str
    kind: str = "pyiqa"
    option: Optional[str] = "pretrained_model_path"


@dataclass(frozen=True)
class MetricSpec:
    """One image metric of the report."""

    label: str  # column name in the report (the paper's)
    pyiqa_name: str
    full_reference: bool
    lower_better: bool
    options: dict[str, Any] = field(default_factory=dict)  # always passed to pyiqa.create_metric
    weights: tuple[WeightFile, ...] = ()
    note: str = ""


PAPER_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("PSNR", "psnr", True, False, {"test_y_channel": True, "color_space": "ycbcr"}, note="Y channel"),
    MetricSpec("SSIM", "ssim", True, False, {"test_y_channel": True, "color_space": "ycbcr"}, note="Y channel"),
    MetricSpec("LPIPS", "lpips", True, True, weights=(
        WeightFile("LPIPS_v0.1_alex-df73285e.pth"), WeightFile("alexnet-owt-7be5be79.pth", "torchvision", None))),
    MetricSpec("DISTS", "dists", True, True, weights=(
        WeightFile("DISTS_weights-f5e65c96.pth"), WeightFile("vgg16-397923af.pth", "torchvision", None))),
    MetricSpec("NIQE", "niqe", False, True, weights=(WeightFile("niqe_modelparameters.mat"),)),
    MetricSpec("MUSIQ", "musiq", False, False, weights=(WeightFile("musiq_koniq_ckpt-e95806b9.pth"),)),
    MetricSpec("MANIQA", "maniqa-pipal", False, False, weights=(
        WeightFile("MANIQA_PIPAL-ae6d356b.pth"),
        WeightFile("timm/vit_base_patch8_224.augreg2_in21k_ft_in1k", "hf", None))),
    MetricSpec("CLIPIQA", "clipiqa", False, False, weights=(WeightFile("RN50.pt", "clip", "backbone"),)),
    MetricSpec("TOPIQ", "topiq_nr", False, False, {"backbone_pretrain": False},
               weights=(WeightFile("cfanet_nr_koniq_res50-9a73138b.pth"),), note="topiq_nr (KonIQ)"),
    MetricSpec("PIQE", "piqe", False, True, note="classical, offline"),
)
_WEIGHTS_BY_NAME = {m.pyiqa_name: m.weights for m in PAPER_METRICS}


def search_dirs(kind: str, metric_weights: Optional[str] = None) -> list[Path]:
    """Where a weight file of ``kind`` is looked for, in order."""
    import torch.hub

    hub = Path(torch.hub.get_dir())
    extra = [Path(metric_weights)] if metric_weights else []
    if kind == "pyiqa":
        dirs = extra + [hub / "pyiqa"]
        if os.environ.get("TORCH_HOME"):
            dirs.append(Path(os.environ["TORCH_HOME"]) / "hub" / "pyiqa")
        loaded = sys.modules.get("pyiqa.utils.download_util")  # pyiqa fixes its cache dir at import
        if loaded is not None:
            dirs.append(Path(loaded.DEFAULT_CACHE_DIR))
        return list(dict.fromkeys(dirs))
    if kind == "clip":
        return extra + [hub / "clip"]
    if kind == "torchvision":
        return [hub / "checkpoints"]
    return []


def _find_hf(repo: str) -> Optional[str]:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str) and Path(found).is_file():
            return found
    return None


def metric_availability(weights: Sequence[WeightFile],
                        metric_weights: Optional[str] = None) -> tuple[dict[str, str], str]:
    """(options pointing at the weight files found, '' ) or ({}, why the metric cannot run offline).

    Only looks at the filesystem: never imports pyiqa or creates a model.
    """
    options: dict[str, str] = {}
    for w in weights:
        if w.kind == "hf":
            found = _find_hf(w.name)
            if found is None:
                return {}, f"backbone {w.name} is not in the Hugging Face cache"
            continue
        dirs = search_dirs(w.kind, metric_weights)
        found = next((d / w.name for d in dirs if (d / w.name).is_file()), None)
        if found is None:
            return {}, f"weights {w.name} not found in {', '.join(str(d) for d in dirs)}"
        if w.option:
            options[w.option] = str(found)
    return options, ""


class DownloadBlocked(RuntimeError):
    """A metric asked for a file that is not on disk (rl.eval never downloads)."""


@contextlib.contextmanager
def no_downloads():
    """Make any weight download inside the block fail at once, naming the URL, instead of trying the network
    (which hangs or fails slowly on an offline machine). The file checks above catch the known weights; this
    catches the ones a pyiqa version adds."""
    import torch.hub

    def refuse(url, dst, *args, **kwargs):
        raise DownloadBlocked(f"would download {url} (not found offline; put it in {Path(dst).parent})")

    targets = [torch.hub]
    loaded = sys.modules.get("pyiqa.utils.download_util")
    if loaded is None:
        import pyiqa.utils.download_util as loaded
    targets.append(loaded)
    saved = [(t, t.download_url_to_file) for t in targets if hasattr(t, "download_url_to_file")]
    for t, _ in saved:
        t.download_url_to_file = refuse
    try:
        yield
    finally:
        for t, fn in saved:
            t.download_url_to_file = fn


# ============================================================================================ metrics
@dataclass
class ImageMetric:
    """A metric ready to run (``fn`` set) or skipped (``reason``)."""

    spec: MetricSpec
    fn: Any = None
    reason: str = ""


def build_image_metrics(specs: Sequence[MetricSpec], have_hr: bool, device: str,
                        metric_weights: Optional[str] = None) -> list[ImageMetric]:
    """Create every runnable metric once; the others carry the reason they are skipped."""
    out = []
    for spec in specs:
        if spec.full_reference and not have_hr:
            out.append(ImageMetric(spec, reason="needs HR images (real LR has none)"))
            continue
        options, why = metric_availability(spec.weights, metric_weights)
        if why:
            out.append(ImageMetric(spec, reason=why))
            continue
        import pyiqa
        import torch

        try:
            with no_downloads():
                fn = pyiqa.create_metric(spec.pyiqa_name, device=torch.device(device), **spec.options, **options)
        except Exception as exc:  # noqa: BLE001 - one metric must not sink the report
            out.append(ImageMetric(spec, reason=f"pyiqa could not create it: {type(exc).__name__}: {exc}"[:300]))
            continue
        out.append(ImageMetric(spec, fn=fn))
    return out


def _tensor(image: np.ndarray, device: str):
    import torch

    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div(255).to(device)


def score_image(metric: ImageMetric, image: np.ndarray, hr: Optional[np.ndarray], device: str) -> float:
    """One (H, W, 3) uint8 image (and its HR) -> the metric's raw score; nan when it fails."""
    import torch

    try:
        with torch.no_grad():
            args = (_tensor(image, device),) + ((_tensor(hr, device),) if metric.spec.full_reference else ())
            value = float(torch.as_tensor(metric.fn(*args)).float().reshape(-1)[0])
    except Exception as exc:  # noqa: BLE001 - a failed image is counted (nan), not fatal
        log.warning("%s failed on an image: %s: %s", metric.spec.label, type(exc).__name__, exc)
        return math.nan
    return value


def bicubic_upscale(lr: np.ndarray, scale: int) -> np.ndarray:
    """The baseline: (h, w, 3) uint8 -> (h*scale, w*scale, 3) uint8, bicubic."""
    import cv2

    h, w = lr.shape[:2]
    return cv2.resize(lr, (w * scale, h * scale), interpolation=cv2.INTER_CUBIC)


# ============================================================================================ reward metrics
def usable_reward_metrics(reward_cfg, metric_weights: Optional[str] = None):
    """The config's reward section with metrics that cannot run offline dropped; returns (cfg, {name: why})."""
    dropped: dict[str, str] = {}

    def keep(items):
        kept = []
        for m in items:
            opts = dict(m.options)
            if m.name in OFFLINE_METRICS or any(str(v).startswith("/") and Path(v).is_file() for v in opts.values()):
                kept.append(m)
                continue
            weights = _WEIGHTS_BY_NAME.get(m.name)
            if weights is None:
                dropped[m.name] = "weight files unknown to rl.eval (give its file in the metric's options)"
                continue
            found, why = metric_availability(weights, metric_weights)
            if why:
                dropped[m.name] = why
            else:
                kept.append(replace(m, options={**found, **opts}))
        return kept

    cfg = replace(reward_cfg, metrics=keep(reward_cfg.metrics), full_reference=keep(reward_cfg.full_reference))
    return cfg, dropped


# ============================================================================================ data
def load_samples(cfg, data: str, split: str, num: Optional[int], real_lr: bool) -> tuple[list, dict]:
    """The evaluation samples and a description of where they came from."""
    from rl.data.dataset import PairDataset, list_source
    from rl.data.images import BadImageError, load_rgb
    from rl.records import Sample

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
            raise SystemExit(f"rl.eval: no usable image in {data}")
        return samples, {"source": data, "mode": "real-lr", "skipped": skipped}
    dcfg = replace(cfg.data, source=data, eval_source=data if split == "all" else None)
    ds = PairDataset(dcfg, "train" if split == "train" else "eval")
    # default: one crop of each usable image (sample() moves past skipped files to the next usable one)
    n = num if num is not None else max(1, len(ds) - sum(ds.stats.values()))
    samples = ds.batch(0, n)
    return samples, {"source": data, "mode": "synthetic", "split": split,
                     "images": list(dict.fromkeys(s.image_id for s in samples)),
                     "skipped": {k: v for k, v in ds.stats.items() if v}}


# ============================================================================================ run
def _mean(values: Sequence[float]) -> Optional[float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def evaluate(args: argparse.Namespace) -> dict:
    import torch

    from rewards.quality import build_quality_scorer
    from rewards.total import metric_weights, score_rollouts
    from rl.env import configure_process
    from rl.inference import (
        build_sampler,
        crop_output,
        default_device,
        fit_lr,
        load_inference_config,
        lr_multiple,
        resolve_checkpoint,
    )
    from rl.records import Sample

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
    # Real LR of any size: the UNet needs multiples of its downsampling factor. Pad (keeps every pixel), run,
    # crop every stage image back; synthetic LR (hr_size / scale) is already fine and passes unchanged.
    multiple = lr_multiple(sampler.pipeline, sampler.scales)
    fitted = {}
    for s in samples:
        fitted[s.prompt_id] = f = fit_lr(s.lr, multiple)
        for note in f.notes:
            print(f"note: {s.image_id}: {note}", file=sys.stderr)
    spi = args.samples_per_image

    # 1. chains, batched by LR size (one sampler call needs one size); samples_per_image chains per image
    t0 = time.perf_counter()
    rollouts: dict[tuple[int, int], Any] = {}
    by_shape: dict[tuple, list[Sample]] = {}
    for s in samples:
        by_shape.setdefault(fitted[s.prompt_id].lr.shape, []).append(s)
    for group in by_shape.values():
        for i in range(0, len(group), args.batch_size):
            batch = [replace(s, lr=fitted[s.prompt_id].lr) for s in group[i:i + args.batch_size]]
            with torch.no_grad():  # sampling only: no autograd graph for the chain
                rollouts_batch = sampler.sample(batch, group_size=spi, seed=args.seed)
            for r in rollouts_batch:
                f = fitted[r.prompt_id]
                r.images = {k: crop_output(v, f, sampler.scales[k]) for k, v in r.images.items()}
                rollouts[(r.prompt_id, r.sample_index)] = r
    chain_samples = [s for s in samples for _ in range(spi)]
    ordered = [rollouts[(s.prompt_id, k)] for s in samples for k in range(spi)]
    timings["chains_s"] = time.perf_counter() - t0

    # 2. rewards, exactly as in training (rewards/), with metrics that cannot run offline left out
    t0 = time.perf_counter()
    reward_cfg, dropped = usable_reward_metrics(cfg.reward, args.metric_weights)
    scorer = None
    if metric_weights(reward_cfg):
        with no_downloads():
            scorer = build_quality_scorer(reward_cfg.metrics, device, reward_cfg.full_reference,
                                          timeout_s=reward_cfg.metric_timeout_s)
    scores = score_rollouts(ordered, chain_samples, reward_cfg, scorer)
    timings["rewards_s"] = time.perf_counter() - t0

    # 3. image metrics, model (every chain) and bicubic (once per image)
    t0 = time.perf_counter()
    have_hr = all(s.hr is not None for s in samples)
    scale = cfg.chain.final_scale
    metrics = build_image_metrics(PAPER_METRICS, have_hr, device, args.metric_weights)
    bicubic_rows: dict[int, dict[str, float]] = {}
    per_chain = []
    for s, r, sc in zip(chain_samples, ordered, scores):
        final = r.images.get("final")
        first = s.prompt_id not in bicubic_rows
        bicubic = bicubic_upscale(s.lr, scale)
        row = {"image_id": s.image_id, "prompt_id": s.prompt_id, "sample_index": r.sample_index,
               "lr_size": list(s.lr.shape[:2]), "notes": list(fitted[s.prompt_id].notes),
               "rewards": {k: v for k, v in sc.parts.items()} | {"total": sc.total},
               "reward_errors": dict(sc.errors), "model": {}, "bicubic": {}, "text": r.text}
        for m in metrics:
            if m.fn is None:
                continue
            row["model"][m.spec.label] = (score_image(m, final, s.hr, device) if final is not None
                                          else math.nan)
            if first:
                row["bicubic"][m.spec.label] = score_image(m, bicubic, s.hr, device)
        if first:
            bicubic_rows[s.prompt_id] = row["bicubic"]
        else:
            row["bicubic"] = bicubic_rows[s.prompt_id]
        per_chain.append(row)
        if args.save_images:
            from rl.data.images import save_png

            base = Path(args.out) / "images" / f"{s.prompt_id:04d}_{_safe(s.image_id)}"
            if first:
                save_png(f"{base}_lr.png", s.lr)
                save_png(f"{base}_bicubic.png", bicubic)
                if s.hr is not None:
                    save_png(f"{base}_hr.png", s.hr)
            for stage, image in r.images.items():
                save_png(f"{base}_s{r.sample_index}_{stage}.png", image)
    timings["metrics_s"] = time.perf_counter() - t0

    # 4. summary
    rewards_summary = {}
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
        rewards_summary[part] = {"mean": _mean(vals), "n": len(vals), "note": note}
    metrics_summary = {}
    for m in metrics:
        label = m.spec.label
        if m.fn is None:
            metrics_summary[label] = {"model": None, "bicubic": None, "n": 0, "skipped": True,
                                      "lower_better": m.spec.lower_better, "pyiqa": m.spec.pyiqa_name,
                                      "note": f"skipped: {m.reason}"}
            continue
        model_vals = [row["model"][label] for row in per_chain]
        bic_vals = [row[label] for row in bicubic_rows.values()]
        failed = sum(1 for v in model_vals if not math.isfinite(v))
        note = m.spec.note + (f"; failed on {failed} chain(s)" if failed else "")
        model_mean, bic_mean = _mean(model_vals), _mean(bic_vals)
        better = None
        if model_mean is not None and bic_mean is not None:
            better = model_mean < bic_mean if m.spec.lower_better else model_mean > bic_mean
        metrics_summary[label] = {"model": model_mean, "bicubic": bic_mean,
                                  "n": len(model_vals) - failed, "skipped": False, "beats_bicubic": better,
                                  "lower_better": m.spec.lower_better, "pyiqa": m.spec.pyiqa_name,
                                  "note": note.strip("; ")}
    timings["total_s"] = time.perf_counter() - start
    report = {
        "checkpoint": str(args.checkpoint), "export": str(ckpt.export), "step": ckpt.step,
        "config": str(config_path), "overrides": list(getattr(args, "overrides", ())),
        "engine": getattr(sampler, "engine_name", args.engine), "greedy": bool(args.greedy),
        "seed": args.seed,
        "device": device, "scale": scale, "data": data_info, "num_images": len(samples),
        "samples_per_image": spi, "num_chains": len(per_chain),
        "rewards": rewards_summary, "metrics": metrics_summary, "per_chain": _jsonable(per_chain),
        "timings": timings,
    }
    return report


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
    lines += ["", f"Total time {report['timings']['total_s']:.1f} s.", ""]
    return "\n".join(lines)


def default_out(ckpt) -> Path:
    """runs/<name>/eval/step_N for a checkpoint inside a run (never inside the checkpoint itself), else
    ./eval/<export folder name>."""
    if ckpt.step_dir is not None and ckpt.step_dir.parent.name == "checkpoints":
        return ckpt.step_dir.parent.parent / "eval" / ckpt.step_dir.name
    return Path("eval") / ckpt.export.name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rl.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="a step_N dir, an export dir (policy/ + diffusion/), or a run's checkpoints root (latest)")
    p.add_argument("--data", default="skimage", help="skimage, an image folder, or a .jsonl manifest")
    p.add_argument("--split", default="eval", choices=("eval", "train", "all"),
                   help="held-out images of --data (default), the training ones, or all of them")
    p.add_argument("--num", type=int, default=None, help="number of images (default: all of the split)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<name>/eval/step_N, else ./eval/<export>)")
    p.add_argument("--config", default=None, help="default: the run's config.yaml, else configs/grpo_local.yaml")
    p.add_argument("--engine", default="vllm", choices=("vllm", "hf"))
    p.add_argument("--samples-per-image", type=int, default=1, help="chains sampled per image (default 1)")
    p.add_argument("--greedy", action="store_true", help="greedy text decoding (temperature 0)")
    p.add_argument("--real-lr", action="store_true", help="--data holds real LR images: no synthesis, no HR")
    p.add_argument("--metric-weights", default=None, help="folder with pyiqa weight files (offline metrics)")
    p.add_argument("--batch-size", type=int, default=4, help="images per sampler call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--save-images", action="store_true", help="also write OUT/images/*.png")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. data.hr_size=256 diffusion.num_steps=20")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.num is not None and args.num < 1:
        print(f"rl.eval: --num {args.num} must be >= 1", file=sys.stderr)
        return 2
    if args.samples_per_image < 1:
        print(f"rl.eval: --samples-per-image {args.samples_per_image} must be >= 1", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print(f"rl.eval: --batch-size {args.batch_size} must be >= 1", file=sys.stderr)
        return 2
    from rl.checkpoint import CheckpointError
    from rl.config import ConfigError
    from rl.data.dataset import DataSourceError
    from rl.inference import resolve_checkpoint

    try:
        if args.out is None:
            args.out = str(default_out(resolve_checkpoint(args.checkpoint)))
        report = evaluate(args)
    except (CheckpointError, ConfigError, DataSourceError) as exc:
        print(f"rl.eval: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=1, allow_nan=False))
    (out / "eval.md").write_text(to_markdown(report))
    print(to_markdown(report))
    print(f"wrote {out / 'eval.json'} and {out / 'eval.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
