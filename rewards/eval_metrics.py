"""The image metrics of an evaluation (the paper's table, section 7.1), offline: which pyiqa metrics can run
here, with which weight files, and a guard that no metric downloads anything.

With HR: PSNR and SSIM on the Y channel (``test_y_channel=True, color_space='ycbcr'``), LPIPS, DISTS; on every
image NIQE, MUSIQ, MANIQA (pipal), CLIPIQA, TOPIQ (topiq_nr, the reward's KonIQ variant), plus PIQE (classical,
offline). Network metrics need weight files; each is looked up on disk BEFORE the metric is created (pyiqa would
otherwise try to download, which fails or hangs offline), and a metric whose files are missing is listed as
skipped with the file it lacks; any other download pyiqa attempts while a metric is created fails at once
(``no_downloads``) and skips that metric, naming the URL. The metrics that can run are scored by the rewards'
batched ``QualityScorer`` (``metric_scorer``), the same runner the generation reward uses.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from core.config import QualityMetricConfig
from rewards.quality import QualityScorer

OFFLINE_METRICS = frozenset({"psnr", "ssim", "ms_ssim", "piqe", "fsim", "gmsd", "vif", "vsi", "nlpd", "mad",
                             "cw_ssim", "entropy", "psnry", "ssimc"})


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
    """A metric asked for a file that is not on disk (tools.eval never downloads)."""


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

def metric_scorer(metrics: Sequence[ImageMetric], device: str) -> QualityScorer:
    """The runnable metrics as one batched scorer (``QualityScore.raw`` keyed by the report's labels)."""
    runnable = [m for m in metrics if m.fn is not None]
    as_cfg = lambda m: QualityMetricConfig(name=m.spec.label, lower_better=m.spec.lower_better)  # noqa: E731
    return QualityScorer([(as_cfg(m), m.fn) for m in runnable if not m.spec.full_reference],
                         [(as_cfg(m), m.fn) for m in runnable if m.spec.full_reference], device=device)


def bicubic_upscale(lr: np.ndarray, scale: int) -> np.ndarray:
    """The baseline: (h, w, 3) uint8 -> (h*scale, w*scale, 3) uint8, bicubic."""
    import cv2

    h, w = lr.shape[:2]
    return cv2.resize(lr, (w * scale, h * scale), interpolation=cv2.INTER_CUBIC)


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
                dropped[m.name] = "weight files unknown to tools.eval (give its file in the metric's options)"
                continue
            found, why = metric_availability(weights, metric_weights)
            if why:
                dropped[m.name] = why
            else:
                kept.append(replace(m, options={**found, **opts}))
        return kept

    cfg = replace(reward_cfg, metrics=keep(reward_cfg.metrics), full_reference=keep(reward_cfg.full_reference),
                  stage_metrics=keep(reward_cfg.stage_metrics))
    return cfg, dropped


def panel_report(panel_cfg: Any, finals: Sequence[Optional[np.ndarray]],
                 hrs: Sequence[Optional[np.ndarray]], device: str = "cpu") -> tuple[list[dict[str, float]], dict]:
    """``trainer.eval_panel`` (held-out-only metrics, never a reward) for ``tools.eval``: each chain's finite raw
    scores (so that a comparison can pair the panel by crop as it pairs the rewards) and ``panel_summary`` of them.
    ([], {}) when the config has no panel; HR-referenced metrics need HR."""
    from rewards.quality import build_panel_scorer

    cfg = panel_cfg if all(h is not None for h in hrs) else replace(panel_cfg, full_reference=[])
    specs = list(cfg.metrics) + list(cfg.full_reference)
    if not specs:
        return [], {}
    per_chain = [{name: float(v) for name, v in raw.items() if math.isfinite(v)}
                 for raw in panel_per_chain(build_panel_scorer(cfg, device), finals, hrs)]
    return per_chain, panel_summary(specs, per_chain)


def panel_summary(specs: Sequence[Any], per_chain: Sequence[dict[str, float]]) -> dict[str, dict]:
    """Per panel metric: the mean raw score over the chains that have one, how many, and its direction."""
    out = {}
    for m in specs:
        values = [c[m.name] for c in per_chain if m.name in c]
        out[m.name] = {"mean": float(np.mean(values)) if values else None, "n": len(values),
                       "lower_better": m.lower_better}
    return out


def panel_per_chain(scorer: QualityScorer, finals: Sequence[Optional[np.ndarray]],
                    hrs: Sequence[Optional[np.ndarray]]) -> list[dict[str, float]]:
    """The panel's raw scores of each chain's final image, in the chains' order: {} for a missing final image, and a
    metric that failed on one is absent."""
    ok = [i for i, img in enumerate(finals) if img is not None]
    results = scorer([finals[i] for i in ok], [hrs[i] for i in ok])
    per_chain: list[dict[str, float]] = [{} for _ in finals]
    for i, r in zip(ok, results):
        per_chain[i] = {name: r.raw[name] for name in scorer.weights if name in r.raw}
    return per_chain


def panel_scores(scorer: QualityScorer, finals: Sequence[Optional[np.ndarray]],
                 hrs: Sequence[Optional[np.ndarray]]) -> dict[str, list[float]]:
    """The panel's raw scores by metric over the final images there are (a missing final image, or a metric that
    failed on one, gives no value): what the run's held-out evaluation reports."""
    per_chain = panel_per_chain(scorer, finals, hrs)
    return {name: [c[name] for c in per_chain if name in c] for name in scorer.weights}


def panel_markdown(panel: dict[str, dict]) -> list[str]:
    """The panel's lines of ``eval.md``."""
    if not panel:
        return []
    lines = ["", "## Held-out panel (trainer.eval_panel: evaluation only, never a reward)", "",
             "| metric | model | n |", "|---|---|---|"]
    for name, p in panel.items():
        mean = "-" if p["mean"] is None else f"{p['mean']:.4f}"
        lines.append(f"| {name}{'↓' if p['lower_better'] else '↑'} | {mean} | {p['n']} |")
    return lines
