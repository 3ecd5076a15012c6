"""Small statistics for held-out comparisons: the standard error of a mean paired difference, plain and
clustered (pure: numpy only, no I/O).

Why clustered: an evaluation cuts several crops from each source photo, and crops of one photo share its content
(texture, lighting, what the model finds hard), so their before/after differences move together. Treating them as
independent understates the standard error of a claim about new photos; the cluster-robust standard error, with
the photos as clusters, does not. With G photos it has only G - 1 degrees of freedom: with few photos (say 4) the
usual "change > 2 s.e." rule is optimistic (the t quantile for 3 degrees of freedom is 3.18, not 2), so report G
beside it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


@dataclass(frozen=True)
class ClusteredMean:
    """The mean of per-crop differences and two standard errors of it."""

    mean: float
    se_paired: float  # std(ddof=1) / sqrt(n): crops taken as independent; nan for a single crop
    se_clustered: float  # cluster-robust (CR1), photos as clusters; nan with fewer than 2 clusters
    n_crops: int
    n_clusters: int


def paired_clustered_se(diffs: Sequence[float], clusters: Sequence[Hashable]) -> ClusteredMean:
    """Mean of ``diffs`` (one per crop: after - before) with its plain and cluster-robust standard errors.

    ``clusters[i]`` names the photo crop i was cut from. With n crops, mean d, G clusters and S_g the sum of
    (d_i - d) over the crops of cluster g: se_clustered = sqrt(G / (G - 1) * sum_g S_g^2) / n (CR1; with one
    crop per cluster it equals se_paired). Fewer than 2 clusters: se_clustered is nan (undefined, not 0).
    """
    d = np.asarray(diffs, dtype=float)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"need a non-empty 1-d sequence of differences, got shape {d.shape}")
    if len(clusters) != d.size:
        raise ValueError(f"{d.size} differences but {len(clusters)} cluster labels")
    if not np.all(np.isfinite(d)):
        raise ValueError("the differences must be finite")
    n = int(d.size)
    mean = float(d.mean())
    se_paired = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    sums: dict[Hashable, float] = {}
    for value, cluster in zip(d - mean, clusters):
        sums[cluster] = sums.get(cluster, 0.0) + float(value)
    g = len(sums)
    if g < 2:
        se_clustered = math.nan
    else:
        se_clustered = math.sqrt(g / (g - 1) * sum(s * s for s in sums.values())) / n
    return ClusteredMean(mean, se_paired, se_clustered, n, g)


def crops_for_power(sd: float, effect: float, design_effect: float = 1.0, z_alpha: float = 2.0,
                    power: float = 0.8) -> int:
    """How many crops an evaluation needs to see a mean paired difference of ``effect`` beyond ``z_alpha`` standard
    errors with probability ``power``: n = deff * ((z_alpha + z_power) * sd / effect)^2, rounded up.

    ``sd``: the spread of one crop's difference (a pilot comparison's paired s.e. x sqrt(its crops));
    ``design_effect``: what clustering by photo multiplies the variance by ((clustered s.e. / paired s.e.)^2 in the
    pilot; 1: crops independent). Written down before a run, it fixes the number of crops (and, with the crops per
    photo, of photos) instead of stopping when the curve looks good."""
    if not (sd > 0 and effect != 0 and design_effect > 0 and 0 < power < 1):
        raise ValueError(f"need sd > 0, effect != 0, design_effect > 0, 0 < power < 1; got sd={sd}, effect={effect}, "
                         f"design_effect={design_effect}, power={power}")
    z_power = NormalDist().inv_cdf(power)
    return math.ceil(design_effect * ((z_alpha + z_power) * sd / abs(effect)) ** 2)
