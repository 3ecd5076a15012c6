"""Generation reward: image-quality metrics (pyiqa) on the final image, each normalised to [0, 1].

Built once, called many times (flow_grpo's closure idea, as a small class): ``build_quality_scorer`` creates
the pyiqa metrics from config; ``QualityScorer.__call__`` scores a batch of uint8 images and returns one
``QualityScore`` per image; ``generation_reward`` folds one ``QualityScore`` into the reward.

Normalisation: ``clamp(raw / scale, 0, 1)``, then ``1 - x`` for lower-is-better metrics, so 1 is always best.
The paper's released trainer uses raw TOPIQ, MUSIQ/100, MANIQA and CLIPIQA with equal weights: scale 1, 100, 1, 1.

Failures are per metric and never sink the others: a metric that raises, returns a non-finite value, or runs
longer than ``timeout_s`` is reported in ``QualityScore.errors`` and scored by RewardConfig.failed_metric:
"renormalize" takes the weighted mean over the metrics that worked, "zero" counts the failed one as 0.
Full-reference metrics (RewardConfig.full_reference) join the same weighted mean when the sample has an HR
image and are not applicable (neither scored nor failed) when it has none.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from dataclasses import dataclass, field

import numpy as np
import torch

from core.config import EvalPanelConfig, PanelMetricConfig, QualityMetricConfig, RewardConfig
from core.images import to_tensor
from rewards.sanity_metrics import SANITY_METRICS

# A metric maps (N, 3, H, W) float images in [0, 1] (and, full-reference, references of the same shape) to
# (N,) or (N, 1) scores. pyiqa's InferenceModel has this signature.
MetricFn = Callable[..., torch.Tensor]
FAILED_METRIC_RULES = ("renormalize", "zero")


@dataclass(frozen=True)
class QualityScore:
    """The quality metrics of one image. A metric in neither dict was not applicable to it."""

    values: dict[str, float] = field(default_factory=dict)  # metric -> normalised score in [0, 1]
    raw: dict[str, float] = field(default_factory=dict)  # metric -> the metric's own score (for logging)
    errors: dict[str, str] = field(default_factory=dict)  # metric -> why it failed


def normalize_score(raw: float, scale: float, lower_better: bool) -> float:
    """Map a metric's score to [0, 1], 1 best.

    >>> normalize_score(62.0, 100.0, False)  # MUSIQ / 100
    0.62
    >>> round(normalize_score(19.6, 100.0, True), 3)  # PIQE: 0 is best, 100 worst
    0.804
    >>> normalize_score(1.3, 1.0, False)  # clamped
    1.0
    """
    x = min(max(raw / scale, 0.0), 1.0)
    return 1.0 - x if lower_better else x


def generation_reward(
    score: QualityScore, weights: Mapping[str, float], failed_metric: str = "renormalize"
) -> float | None:
    """Weighted mean of the normalised metrics; failed metrics follow ``failed_metric``.

    None when no weighted metric applies (none configured, or only full-reference ones without HR).
    NaN when every applicable metric failed under "renormalize" (nothing left to average): the chain cannot be
    scored, and the driver leaves it out of its group (``rl.advantages.step_advantages``) instead of scoring it 0.

    >>> s = QualityScore(values={"a": 0.8}, errors={"b": "TimeoutError"})
    >>> generation_reward(s, {"a": 1.0, "b": 1.0}, "renormalize")
    0.8
    >>> generation_reward(s, {"a": 1.0, "b": 1.0}, "zero")
    0.4
    >>> generation_reward(QualityScore(), {"a": 1.0}) is None
    True
    """
    if failed_metric not in FAILED_METRIC_RULES:
        raise ValueError(f"reward.failed_metric = {failed_metric!r}: must be one of {FAILED_METRIC_RULES}")
    applicable = [m for m in weights if m in score.values or m in score.errors]
    total_weight = sum(weights[m] for m in applicable)
    if not applicable or total_weight <= 0:
        return None
    worked = [m for m in applicable if m in score.values]
    weighted = sum(weights[m] * score.values[m] for m in worked)
    denominator = sum(weights[m] for m in worked) if failed_metric == "renormalize" else total_weight
    return weighted / denominator if denominator > 0 else float("nan")


@dataclass(frozen=True)
class _Metric:
    cfg: QualityMetricConfig
    fn: MetricFn
    full_reference: bool


class QualityScorer:
    """Scores batches of uint8 images with several metrics; one metric's failure is recorded, not raised.

    ``timeout_s`` bounds each metric call: the call runs in a daemon thread and, if it has not finished in
    time, the metric is reported failed for that batch. Python cannot stop the thread, so until it ends the
    metric is reported failed at once ("still busy") instead of piling up more stuck calls.
    """

    def __init__(
        self,
        metrics: Sequence[tuple[QualityMetricConfig, MetricFn]],
        full_reference: Sequence[tuple[QualityMetricConfig, MetricFn]] = (),
        timeout_s: float | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self._metrics = [_Metric(c, f, False) for c, f in metrics] + [
            _Metric(c, f, True) for c, f in full_reference
        ]
        names = [m.cfg.name for m in self._metrics]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"reward.metrics / reward.full_reference: metric names must be unique, got {duplicates}"
            )
        self.timeout_s = timeout_s
        self.device = torch.device(device)
        self._busy: dict[str, threading.Thread] = {}  # metric -> a timed-out call that is still running

    @property
    def weights(self) -> dict[str, float]:
        return {m.cfg.name: m.cfg.weight for m in self._metrics}

    @property
    def metric_fns(self) -> dict[str, MetricFn]:
        """The metric objects by name (pyiqa InferenceModels when built by ``build_quality_scorer``)."""
        return {m.cfg.name: m.fn for m in self._metrics}

    def __call__(
        self, images: Sequence[np.ndarray], references: Sequence[np.ndarray | None] | None = None
    ) -> list[QualityScore]:
        """images[i]: (H, W, 3) uint8; references[i]: HR (H, W, 3) uint8 or None -> one QualityScore each."""
        n = len(images)
        refs = list(references) if references is not None else [None] * n
        if len(refs) != n:
            raise ValueError(f"{n} images but {len(refs)} references")
        out = [QualityScore() for _ in range(n)]
        groups: dict[tuple[int, ...], list[int]] = {}  # image shape -> indices; a batch needs one shape
        for i, img in enumerate(images):
            problem = _image_problem(img)
            if problem:
                for m in self._metrics:
                    if not m.full_reference or refs[i] is not None:
                        out[i].errors[m.cfg.name] = f"image {i}: {problem}"
            else:
                groups.setdefault(img.shape, []).append(i)
        for idx in groups.values():
            x = to_tensor(np.stack([images[i] for i in idx])).to(self.device)  # (N, 3, H, W) in [0, 1]
            for m in self._metrics:
                if m.full_reference:
                    self._score_full_reference(m, idx, x, images, refs, out)
                else:
                    self._score(m, idx, x, None, out)
        return out

    # ------------------------------------------------------------------------------------------ internals
    def _score_full_reference(self, m: _Metric, idx: list[int], x: torch.Tensor, images, refs, out) -> None:
        have = [k for k, i in enumerate(idx) if refs[i] is not None]
        usable = []
        for k in have:
            i = idx[k]
            problem = _image_problem(refs[i])
            if not problem and refs[i].shape != images[i].shape:
                problem = f"shape {refs[i].shape} differs from the image's {images[i].shape}"
            if problem:
                out[i].errors[m.cfg.name] = f"reference {i}: {problem}"
            else:
                usable.append(k)
        if usable:
            y = to_tensor(np.stack([refs[idx[k]] for k in usable])).to(self.device)  # (M, 3, H, W)
            self._score(m, [idx[k] for k in usable], x[usable], y, out)

    def _score(self, m: _Metric, idx: list[int], x: torch.Tensor, y: torch.Tensor | None, out) -> None:
        name = m.cfg.name
        try:
            result = self._call(name, m.fn, (x,) if y is None else (x, y))
            raw = torch.as_tensor(result).detach().float().cpu().reshape(-1)  # (N,)
            if raw.numel() != len(idx):
                raise ValueError(f"returned {raw.numel()} scores for {len(idx)} images")
        except Exception as exc:  # noqa: BLE001 - a metric failure is data for the failed_metric rule
            message = f"{type(exc).__name__}: {exc}"[:300]
            for i in idx:
                out[i].errors[name] = message
            return
        for i, r in zip(idx, raw.tolist()):
            if math.isfinite(r):
                out[i].raw[name] = r
                out[i].values[name] = normalize_score(r, m.cfg.scale, m.cfg.lower_better)
            else:
                out[i].errors[name] = f"non-finite score {r}"

    def _call(self, name: str, fn: MetricFn, args: tuple) -> torch.Tensor:
        if self.timeout_s is None:
            with torch.no_grad():
                return fn(*args)
        busy = self._busy.get(name)
        if busy is not None and busy.is_alive():
            raise TimeoutError(f"still busy with a call that exceeded {self.timeout_s} s")
        box: dict[str, object] = {}

        def run() -> None:
            try:
                with torch.no_grad():  # grad mode is per thread
                    box["out"] = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller's thread
                box["err"] = exc

        thread = threading.Thread(target=run, name=f"quality-{name}", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if thread.is_alive():
            self._busy[name] = thread
            raise TimeoutError(f"exceeded metric_timeout_s = {self.timeout_s} s")
        if "err" in box:
            raise box["err"]  # type: ignore[misc]
        return box["out"]  # type: ignore[return-value]


def _image_problem(img: object) -> str:
    if not isinstance(img, np.ndarray):
        return f"not a numpy array but {type(img).__name__}"
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        return f"expected (H, W, 3) uint8, got {img.shape} {img.dtype}"
    return ""


def _create_metric(pyiqa: Any, cfg: QualityMetricConfig, device: str | torch.device) -> MetricFn:
    """A known-learnable sanity metric (``rewards.sanity_metrics``) by its name, else pyiqa's."""
    if cfg.name in SANITY_METRICS:
        return SANITY_METRICS[cfg.name](**dict(cfg.options)).to(device)
    return pyiqa.create_metric(cfg.name, device=torch.device(device), **dict(cfg.options))


def build_quality_scorer(
    metrics: Sequence[QualityMetricConfig],
    device: str | torch.device = "cpu",
    full_reference: Sequence[QualityMetricConfig] = (),
    timeout_s: float | None = None,
    keys: tuple[str, str] = ("reward.metrics", "reward.full_reference"),
) -> QualityScorer:
    """Create the pyiqa metrics once. Config mistakes fail here, naming the metric, not at scoring time.

    ``options`` go to ``pyiqa.create_metric`` (e.g. ``pretrained_model_path`` for offline weights). The
    configured ``lower_better`` must agree with pyiqa's: a sign slip would reward worse images.
    """
    import pyiqa  # heavy (timm, CLIP helpers); only reward workers need it

    built: dict[bool, list[tuple[QualityMetricConfig, MetricFn]]] = {False: [], True: []}
    for fr, key, configs in ((False, keys[0], metrics), (True, keys[1], full_reference)):
        for i, cfg in enumerate(configs):
            where = f"{key}[{i}] (name {cfg.name!r}, options {dict(cfg.options)!r})"
            try:
                fn = _create_metric(pyiqa, cfg, device)
            except Exception as exc:
                raise ValueError(f"{where}: pyiqa could not create it: {type(exc).__name__}: {exc}") from exc
            mode = getattr(fn, "metric_mode", None)
            if mode != ("FR" if fr else "NR"):
                wanted = keys[1] if mode == "FR" else keys[0]
                raise ValueError(f"{where}: pyiqa metric_mode is {mode!r}; list it under {wanted}")
            if bool(getattr(fn, "lower_better", False)) != bool(cfg.lower_better):
                raise ValueError(
                    f"{where}: lower_better = {cfg.lower_better} but pyiqa says {fn.lower_better}"
                )
            built[fr].append((cfg, fn))
    return QualityScorer(built[False], built[True], timeout_s=timeout_s, device=device)


def build_panel_scorer(panel: EvalPanelConfig, device: str | torch.device = "cpu") -> QualityScorer:
    """The held-out evaluation panel (``trainer.eval_panel``): the same scorer, metrics reported raw."""
    def as_metric(m: PanelMetricConfig) -> QualityMetricConfig:
        return QualityMetricConfig(name=m.name, lower_better=m.lower_better, options=dict(m.options))

    return build_quality_scorer([as_metric(m) for m in panel.metrics], device,
                                [as_metric(m) for m in panel.full_reference],
                                keys=("trainer.eval_panel.metrics", "trainer.eval_panel.full_reference"))


def build_reward_scorers(cfg: RewardConfig, device: str | torch.device = "cpu",
                         ) -> tuple[QualityScorer | None, QualityScorer | None]:
    """The reward's two scorers: the final images' (``reward.metrics`` + ``full_reference``) and the stage images'
    (``reward.stage_metrics``, full-reference only); None where nothing is configured."""
    final = (build_quality_scorer(cfg.metrics, device, cfg.full_reference, cfg.metric_timeout_s)
             if cfg.metrics or cfg.full_reference else None)
    stages = (build_quality_scorer([], device, cfg.stage_metrics, cfg.metric_timeout_s,
                                   keys=("reward.stage_metrics", "reward.stage_metrics"))
              if cfg.stage_metrics else None)
    return final, stages
