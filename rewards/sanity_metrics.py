"""Known-learnable image rewards: metrics an image policy can surely move, for checking that the image gradient
path (rollout, reward pool, learner, weight sync) carries a reward's signal, never for judging quality. DDPO and
Flow-GRPO validate their image RL the same way (compressibility, aesthetic score) before the rewards that matter.

Each entry behaves as a pyiqa no-reference metric (``metric_mode``, ``lower_better``, (N, 3, H, W) in [0, 1] ->
(N,)), so ``rewards.quality.build_quality_scorer`` builds it by name like any other (``reward.metrics``)."""

from __future__ import annotations

import torch
from torch import nn


class Brightness(nn.Module):
    """The mean intensity of the image in [0, 1]."""

    metric_mode = "NR"
    lower_better = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mean(dim=(1, 2, 3))


class Detail(nn.Module):
    """The mean absolute difference between neighbouring pixels (total variation per pixel), higher better: the
    incompressibility reward of DDPO in a dependency-free form. Measured here, a placebo run (advantages shuffled)
    of the tiny SR model smooths its images, so a run that raises detail beyond its placebo has followed the
    reward, against the drift."""

    metric_mode = "NR"
    lower_better = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(1, 2, 3))
        dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(1, 2, 3))
        return (dx + dy) / 2


SANITY_METRICS: dict[str, type[nn.Module]] = {"brightness": Brightness, "detail": Detail}
