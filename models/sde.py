"""DDIM with eta > 0 as a Gaussian policy: one step samples x_{t-1} ~ N(mean, std^2) and scores it.

The same function serves the rollout (``prev_sample=None``: draw x_{t-1}) and the learner
(``prev_sample`` = the recorded x_{t-1}: re-score it, gradients flowing through ``model_output``), which is
Flow-GRPO's ``sde_step_with_logprob`` idea in diffusers' output style. Formulas follow diffusers'
``DDIMScheduler.step`` (DDIM paper eqs. 12 and 16) line for line, so the mean and the sample match it.

Zero variance. DDIM's sigma_t^2 = eta^2 (1 - a_prev)/(1 - a_t) (1 - a_t/a_prev) is zero whenever a_prev = 1
(``set_alpha_to_one=True`` at the last step) or a_t = a_prev (last timestep 0 with ``steps_offset=0``, e.g.
"leading" or "linspace" spacing): the log-density is then -inf/NaN. We keep *every* step stochastic rather
than dropping the last one from the loss: ``logprob_scheduler`` switches the scheduler to "trailing" spacing
(timesteps T-1, ..., T/S - 1: the last step starts at t >= 1 and the first at pure noise) and
``set_alpha_to_one=False`` (the last step lands on a_0 = 1 - beta_0 < 1). The last step's std is then small
but positive (~0.01 in [-1, 1] pixel units for the linear schedule and 10 steps), and
``check_stochastic_schedule`` rejects any schedule that still has a zero-variance step, naming the config
keys.

Log-probs are the *mean* over all non-batch elements of the per-element Gaussian log-density: a sum over
64x64x3 values would make the importance ratio exp(sum) overflow. All math runs in float32
(bf16 loses the small differences x - mean that the log-density is made of).

Pure module: torch and diffusers' ``randn_tensor`` (no Ray); the scheduler is used through its attributes
(``alphas_cumprod``, ``final_alpha_cumprod``, ``config``, ``num_inference_steps``, ``timesteps``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

Generator = torch.Generator | list[torch.Generator] | None  # a list: one per sample (batch-invariant noise)
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class SDEStepOutput:
    """One stochastic DDIM transition x_t -> x_{t-1}."""

    prev_sample: torch.Tensor  # (B, C, H, W) x_{t-1}, float32: sampled, or the recorded one passed in
    log_prob: torch.Tensor  # (B,) mean over C,H,W of log N(prev_sample; mean, std^2)
    mean: torch.Tensor  # (B, C, H, W) the deterministic DDIM update (eta-adjusted direction term)
    std: torch.Tensor  # (B, 1, 1, 1) sigma_t(eta), > 0


def logprob_scheduler(scheduler: Any) -> Any:
    """The same scheduler class and betas with a schedule on which every step has variance (module doc).

    Returns ``scheduler`` itself when nothing needs changing, otherwise a new instance from its config with
    ``timestep_spacing="trailing"``, ``steps_offset=0`` and ``set_alpha_to_one=False``.
    """
    cfg = scheduler.config
    wanted = {"timestep_spacing": "trailing", "steps_offset": 0, "set_alpha_to_one": False}
    if all(cfg.get(k) == v for k, v in wanted.items()):
        return scheduler
    return type(scheduler).from_config(cfg, **wanted)


def _alphas(scheduler: Any, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a_t and a_prev as float32 (B,) for integer timesteps (B,), exactly as DDIMScheduler.step picks them."""
    if scheduler.num_inference_steps is None:
        raise ValueError("scheduler.set_timesteps(num_steps) must be called before a DDIM step")
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timestep.device, dtype=torch.float32)  # (T,)
    prev_t = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps  # (B,)
    a_t = alphas_cumprod[timestep]
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32, device=timestep.device)
    a_prev = torch.where(prev_t >= 0, alphas_cumprod[prev_t.clamp(min=0)], final)
    return a_t, a_prev


def step_std(scheduler: Any, timestep: int | torch.Tensor, eta: float) -> torch.Tensor:
    """sigma_t(eta) = eta sqrt((1 - a_prev)/(1 - a_t) (1 - a_t/a_prev)), float32, shaped like ``timestep``."""
    t = torch.as_tensor(timestep, dtype=torch.long)
    a_t, a_prev = _alphas(scheduler, t.reshape(-1))
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    return (eta * variance.clamp(min=0).sqrt()).reshape(t.shape)


def check_stochastic_schedule(scheduler: Any, eta: float) -> None:
    """Raise ValueError unless every step of the current ``scheduler.timesteps`` is a proper Gaussian."""
    if eta <= 0:
        raise ValueError(f"eta = {eta!r}: must be > 0, a deterministic DDIM step has no log-prob")
    t = torch.as_tensor(scheduler.timesteps, dtype=torch.long)
    std = step_std(scheduler, t, eta)
    _, a_prev = _alphas(scheduler, t)
    bad = (std <= 0).nonzero().flatten().tolist()
    if bad:
        cfg = scheduler.config
        raise ValueError(
            f"DDIM steps {bad} (timesteps {t[bad].tolist()}) have zero variance with timestep_spacing="
            f"{cfg.get('timestep_spacing')!r}, steps_offset={cfg.get('steps_offset')!r}, set_alpha_to_one="
            f"{cfg.get('set_alpha_to_one')!r}: the log-prob would be NaN; use models.sde.logprob_scheduler"
        )
    if (1 - a_prev - std**2 < 0).any():
        raise ValueError(
            f"eta = {eta!r} is too large: sigma_t^2 exceeds 1 - a_prev at some step (use eta <= 1)"
        )


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Mean over non-batch elements of log N(x; mean, std^2): x, mean (B, ...), std broadcastable -> (B,)."""
    x, mean, std = x.float(), mean.float(), std.float()
    log_density = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _HALF_LOG_2PI
    return log_density.flatten(1).mean(dim=1)


def gaussian_mean_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(reference_mean, std^2)) per element, averaged over non-batch elements -> (B,).
    Exact for two Gaussians of the same std (a DDIM transition's sigma_t does not depend on the weights)."""
    diff = mean.float() - reference_mean.float()
    return (diff**2 / (2 * std.float() ** 2)).flatten(1).mean(dim=1)


def ddim_step_with_logprob(
    scheduler: Any,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: Generator = None,
    variance_noise: torch.Tensor | None = None,
) -> SDEStepOutput:
    """One DDIM step x_t -> x_{t-1} as a Gaussian with its log-prob.

    model_output, sample: (B, C, H, W); timestep: an int or a (B,) tensor (per-sample timesteps, all on the
    schedule set by ``scheduler.set_timesteps``). With ``prev_sample=None`` x_{t-1} is drawn with
    ``generator`` (or taken as mean + std * ``variance_noise``); otherwise the given x_{t-1} is scored.
    Gradients flow through ``model_output`` into ``mean`` and ``log_prob``.
    """
    cfg = scheduler.config
    eps_or_v = model_output.float()  # (B, C, H, W)
    x_t = sample.float()
    B = x_t.shape[0]
    t = torch.as_tensor(timestep, dtype=torch.long, device=x_t.device).reshape(-1).expand(B)  # (B,)

    # 1-2. alphas of t and of the previous timestep t - T/S, as diffusers picks them
    a_t, a_prev = (a.view(B, 1, 1, 1) for a in _alphas(scheduler, t))
    beta_t = 1 - a_t

    # 3. predicted x_0 and epsilon
    if cfg.prediction_type == "epsilon":
        x0 = (x_t - beta_t.sqrt() * eps_or_v) / a_t.sqrt()
        eps = eps_or_v
    elif cfg.prediction_type == "sample":
        x0 = eps_or_v
        eps = (x_t - a_t.sqrt() * x0) / beta_t.sqrt()
    elif cfg.prediction_type == "v_prediction":
        x0 = a_t.sqrt() * x_t - beta_t.sqrt() * eps_or_v
        eps = a_t.sqrt() * eps_or_v + beta_t.sqrt() * x_t
    else:
        raise ValueError(
            f"scheduler.config.prediction_type = {cfg.prediction_type!r}: not epsilon|sample|v_prediction"
        )

    # 4. clip or threshold x_0 (x_0 only; eps stays the model's, as with use_clipped_model_output=False)
    if cfg.get("thresholding", False):
        x0 = scheduler._threshold_sample(x0)
    elif cfg.get("clip_sample", False):
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)

    # 5. sigma_t(eta), formula (16)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.clamp(min=0).sqrt()  # (B, 1, 1, 1)
    if (std <= 0).any():
        raise ValueError(
            f"zero-variance DDIM step at timesteps {t[(std <= 0).flatten()].tolist()} (eta = {eta!r}): "
            "the log-prob is undefined; build the scheduler with models.sde.logprob_scheduler"
        )

    # 6-7. mean = sqrt(a_prev) x_0 + sqrt(1 - a_prev - sigma^2) eps, formula (12)
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps

    if prev_sample is None:
        if variance_noise is None:
            variance_noise = randn_tensor(tuple(x_t.shape), generator, x_t.device, torch.float32)
        elif generator is not None:
            raise ValueError("pass either generator or variance_noise, not both")
        prev_sample = mean + std * variance_noise.float()
    prev_sample = prev_sample.float()
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std)  # (B,)
    return SDEStepOutput(prev_sample=prev_sample.detach(), log_prob=log_prob, mean=mean, std=std)
