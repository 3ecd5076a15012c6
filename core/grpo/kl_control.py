"""The adaptive KL coefficient of PPO's penalty variant (Schulman et al. 2017, section 4): hold a measured KL near a
target by doubling or halving its coefficient, instead of fixing it. A fixed coefficient has one scale for a KL that
can move by orders of magnitude over a run (the SR model's image KL: 1e-5 at image_kl_beta 1, 3e-2 at 0.01)."""

from __future__ import annotations


def adapt_kl_beta(beta: float, kl: float, target: float, tolerance: float = 1.5, factor: float = 2.0) -> float:
    """The next update's coefficient: ``beta * factor`` when ``kl`` is above ``target * tolerance``, ``beta /
    factor`` when below ``target / tolerance``, else ``beta``."""
    if not (beta > 0 and target > 0 and tolerance >= 1 and factor > 1):
        raise ValueError(f"adapt_kl_beta: needs beta > 0, target > 0, tolerance >= 1, factor > 1; got beta={beta}, "
                         f"target={target}, tolerance={tolerance}, factor={factor}")
    if kl > target * tolerance:
        return beta * factor
    if kl < target / tolerance:
        return beta / factor
    return beta
