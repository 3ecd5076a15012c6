"""The data section of the experiment config: where the HR images come from and how LR images are synthesised.

Kept apart from ``core.config`` (which imports it) so that the schema module stays readable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class DegradationConfig:
    """Real-ESRGAN second-order degradation (Wang et al. 2021), x4 defaults as in SeeSR/PURE."""

    kernel_size: int = 21
    kernel_list: list[str] = field(
        default_factory=lambda: ["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"]
    )
    kernel_prob: list[float] = field(default_factory=lambda: [0.45, 0.25, 0.12, 0.03, 0.12, 0.03])
    sinc_prob: float = 0.1
    blur_sigma: list[float] = field(default_factory=lambda: [0.2, 3.0])
    betag_range: list[float] = field(default_factory=lambda: [0.5, 4.0])
    betap_range: list[float] = field(default_factory=lambda: [1.0, 2.0])
    resize_prob: list[float] = field(default_factory=lambda: [0.2, 0.7, 0.1])  # up, down, keep
    resize_range: list[float] = field(default_factory=lambda: [0.15, 1.5])
    gaussian_noise_prob: float = 0.5
    noise_range: list[float] = field(default_factory=lambda: [1.0, 30.0])
    poisson_scale_range: list[float] = field(default_factory=lambda: [0.05, 3.0])
    gray_noise_prob: float = 0.4
    jpeg_range: list[float] = field(default_factory=lambda: [30.0, 95.0])
    second_blur_prob: float = 0.8
    kernel_list2: list[str] = field(
        default_factory=lambda: ["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"]
    )
    kernel_prob2: list[float] = field(default_factory=lambda: [0.45, 0.25, 0.12, 0.03, 0.12, 0.03])
    sinc_prob2: float = 0.1
    blur_sigma2: list[float] = field(default_factory=lambda: [0.2, 1.5])
    betag_range2: list[float] = field(default_factory=lambda: [0.5, 4.0])
    betap_range2: list[float] = field(default_factory=lambda: [1.0, 2.0])
    resize_prob2: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.3])
    resize_range2: list[float] = field(default_factory=lambda: [0.3, 1.2])
    gaussian_noise_prob2: float = 0.5
    noise_range2: list[float] = field(default_factory=lambda: [1.0, 25.0])
    poisson_scale_range2: list[float] = field(default_factory=lambda: [0.05, 2.5])
    gray_noise_prob2: float = 0.4
    jpeg_range2: list[float] = field(default_factory=lambda: [30.0, 95.0])
    final_sinc_prob: float = 0.8


@dataclass
class DataConfig:
    source: str = "skimage"  # "skimage" (photos shipped in scikit-image's wheel), a folder, or a .jsonl manifest
    # held-out data (a source as above, or "confirmatory": photos no recipe was chosen on, data/test_photos.py);
    # None: the held-out split of `source`
    eval_source: Optional[str] = None
    held_out_fraction: float = 0.25  # share of the images of `source` kept out of training (by image, not crop)
    hr_size: int = 64  # HR crop side in pixels; LR side = hr_size / scale
    scale: int = 4
    seed: int = 0
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
