"""Shared inputs of the reward tests and the reward-pool benchmark: one set of degradation labels and a
sample that carries them (not a test module: pytest collects only test_*.py)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from core.records import DegradationLabels, Sample

# The labels the chains of these tests state as "medium blur, light downsample, heavy noise, light
# compression, no upsample".
LEVELS = {
    "blur": "medium",
    "downsample": "light",
    "noise": "heavy",
    "compression": "light",
    "upsample": "none",
}


def make_sample(prompt_id: int = 0, tags=("cat", "sofa"), levels: Optional[dict] = LEVELS,
                hr: Optional[np.ndarray] = None, image_id: Optional[str] = None) -> Sample:
    """A 16x16 LR sample with tags and (unless ``levels`` is None) degradation labels."""
    labels = DegradationLabels(levels=dict(levels), params={}) if levels is not None else None
    return Sample(prompt_id=prompt_id, image_id=image_id or f"img{prompt_id}", lr=np.zeros((16, 16, 3), np.uint8),
                  hr=hr, tags=tuple(tags), degradation=labels)
