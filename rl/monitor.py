"""TensorBoard logging for the driver: scalars, image panels, chain text, and a console progress bar.

Metric names follow ``reward/<part>``, ``grpo/<stat>``, ``learner/<metric>``, ``timing/<phase>``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from core.records import Scores

PANEL_ORDER: tuple[str, ...] = ("lr", "rough", "middle", "final", "hr")
PANEL_LABELS = {"lr": "LR", "rough": "rough", "middle": "middle", "final": "final", "hr": "HR"}
LABEL_HEIGHT = 12  # a strip above each tile with its column's name


def image_panel(images: Mapping[str, Optional[np.ndarray]], height: int) -> np.ndarray:
    """LR | rough | middle | final | HR side by side, each resized (nearest) to ``height`` under a strip naming
    its column; (LABEL_HEIGHT + height, W, 3) uint8.

    Missing images (e.g. no HR for real LR input) become a grey tile so the layout stays comparable.
    """
    from PIL import ImageDraw

    tiles = []
    for key in PANEL_ORDER:
        img = images.get(key)
        if img is None:
            tile = np.full((height, height, 3), 128, np.uint8)
        else:
            h, w = img.shape[:2]
            tile = np.asarray(Image.fromarray(img).resize((max(1, round(w * height / h)), height), Image.NEAREST))
        label = Image.new("RGB", (tile.shape[1], LABEL_HEIGHT), (0, 0, 0))
        ImageDraw.Draw(label).text((2, 0), PANEL_LABELS[key], fill=(255, 255, 255))  # PIL's built-in font
        tiles.append(np.concatenate([np.asarray(label), tile], axis=0))
        tiles.append(np.zeros((LABEL_HEIGHT + height, 2, 3), np.uint8))  # separator
    return np.concatenate(tiles[:-1], axis=1)


class RunMonitor:
    """One TensorBoard run directory plus an optional console progress bar."""

    def __init__(self, log_dir: str | Path, total_steps: int, start_step: int = 0, progress_bar: bool = True,
                 desc: str = "grpo"):
        # a resumed run replaces the points its crashed predecessor logged after the checkpoint
        self.log_dir = str(log_dir)
        self.writer = SummaryWriter(log_dir=self.log_dir, purge_step=start_step + 1 if start_step else None)
        self._bar = None
        if progress_bar:
            from tqdm.auto import tqdm

            from rl.console import stream

            self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True,
                             file=stream())

    def scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            if value is None or (isinstance(value, float) and not math.isfinite(value)):
                continue
            self.writer.add_scalar(name, float(value), step)

    def panel(self, step: int, tag: str, images: Mapping[str, Optional[np.ndarray]], height: int = 128) -> None:
        self.writer.add_image(tag, image_panel(images, height), step, dataformats="HWC")

    def text(self, step: int, tag: str, text: str) -> None:
        # TensorBoard renders markdown: keep the chain's tags visible by quoting them as code.
        self.writer.add_text(tag, "```\n" + text + "\n```", step)

    def progress(self, step: int, postfix: Mapping[str, float]) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in postfix.items()}, refresh=True)

    def rewind(self, step: int) -> None:
        """The run went back to ``step`` (a recovery): later points of every tag are replaced by those logged next
        (TensorBoard's purge_step, which its readers apply)."""
        self.writer.close()
        self.writer = SummaryWriter(log_dir=self.log_dir, purge_step=step + 1)
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
        if self._bar is not None:
            self._bar.close()


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a run directory, read with TensorBoard's own event reader (tests, plots)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def summarize(values: Sequence[float]) -> dict[str, float]:
    """mean / std / min / max of a list (empty -> nan)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "min": float(arr.min()), "max": float(arr.max())}


def reward_metrics(scores: list[Scores], group_size: int) -> dict[str, float]:
    """``reward/<part>/mean`` and ``reward/<part>/group_std`` (mean within-group std) for every scored part."""
    out: dict[str, float] = {}
    parts = sorted({k for s in scores for k in s.parts} | {"total"})
    for part in parts:
        values = np.array([s.total if part == "total" else s.parts.get(part, np.nan) for s in scores], dtype=float)
        if np.all(np.isnan(values)):
            continue
        out[f"reward/{part}/mean"] = float(np.nanmean(values))
        groups = values.reshape(-1, group_size)
        with np.errstate(invalid="ignore"):
            out[f"reward/{part}/group_std"] = float(np.nanmean(np.nanstd(groups, axis=1)))
    out["reward/metric_failures"] = float(sum(len(s.errors) for s in scores))
    return out
