"""models.sde: the stochastic DDIM step agrees with diffusers and is a proper, re-scorable Gaussian."""

import subprocess
import sys

import pytest
import torch
from diffusers import DDIMScheduler

from models.sde import (
    check_stochastic_schedule,
    ddim_step_with_logprob,
    gaussian_log_prob,
    logprob_scheduler,
    step_std,
)


def _scheduler(**kw) -> DDIMScheduler:
    base = {
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "set_alpha_to_one": False,
        "steps_offset": 0,
        "timestep_spacing": "trailing",
    }
    base.update(kw)
    return DDIMScheduler(**base)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip_sample", [True, False])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_mean_and_sample_match_diffusers_step(prediction_type, clip_sample, eta):
    sched = _scheduler(prediction_type=prediction_type, clip_sample=clip_sample)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    for t in sched.timesteps:  # every step, the last included
        x = torch.randn(2, 3, 8, 8, generator=g)
        out = torch.randn(2, 3, 8, 8, generator=g)
        noise = torch.randn(2, 3, 8, 8, generator=g)
        ref = sched.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        ref_mean = sched.step(out, t, x, eta=eta, variance_noise=torch.zeros_like(noise)).prev_sample
        ours = ddim_step_with_logprob(sched, out, t, x, eta, variance_noise=noise)
        torch.testing.assert_close(ours.prev_sample, ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours.mean, ref_mean, atol=1e-4, rtol=0)
        assert ours.std.shape == (2, 1, 1, 1) and bool((ours.std > 0).all())
        assert torch.isfinite(ours.log_prob).all()


def test_log_prob_is_the_pixel_mean_gaussian_density_and_rescoring_reproduces_it():
    sched = _scheduler()
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    x, out = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    t = sched.timesteps[4]
    drawn = ddim_step_with_logprob(sched, out, t, x, 1.0, generator=g)
    normal = torch.distributions.Normal(drawn.mean, drawn.std.expand_as(drawn.mean))
    expected = normal.log_prob(drawn.prev_sample).flatten(1).mean(1)
    torch.testing.assert_close(drawn.log_prob, expected, atol=1e-5, rtol=1e-5)
    rescored = ddim_step_with_logprob(sched, out, t, x, 1.0, prev_sample=drawn.prev_sample)
    torch.testing.assert_close(rescored.log_prob, drawn.log_prob, atol=1e-6, rtol=0)
    # a different transition scores lower than the mean itself
    at_mean = ddim_step_with_logprob(sched, out, t, x, 1.0, prev_sample=drawn.mean)
    assert bool((at_mean.log_prob > drawn.log_prob).all())


def test_per_sample_timesteps_equal_one_call_per_timestep():
    sched = _scheduler()
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(2)
    x, out, prev = (torch.randn(4, 3, 8, 8, generator=g) for _ in range(3))
    ts = sched.timesteps[[0, 3, 7, 9]]
    batched = ddim_step_with_logprob(sched, out, ts, x, 1.0, prev_sample=prev).log_prob
    single = torch.cat(
        [
            ddim_step_with_logprob(
                sched, out[i : i + 1], ts[i], x[i : i + 1], 1.0, prev_sample=prev[i : i + 1]
            ).log_prob
            for i in range(4)
        ]
    )
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=0)


def test_gradient_flows_through_model_output_only():
    sched = _scheduler()
    sched.set_timesteps(5)
    g = torch.Generator().manual_seed(3)
    x, prev = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    out = torch.randn(2, 3, 8, 8, generator=g, requires_grad=True)
    step = ddim_step_with_logprob(sched, out, sched.timesteps[2], x, 1.0, prev_sample=prev)
    step.log_prob.sum().backward()
    assert out.grad is not None and out.grad.abs().sum() > 0
    assert not step.prev_sample.requires_grad


@pytest.mark.parametrize(
    "config",
    [
        {"timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": True},  # diffusers' defaults
        {
            "timestep_spacing": "leading",
            "steps_offset": 0,
            "set_alpha_to_one": False,
        },  # last t = 0: a_t = a_prev
        {"timestep_spacing": "linspace", "steps_offset": 0, "set_alpha_to_one": False},
        {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": True},
    ],
)
def test_zero_variance_schedules_are_rejected_and_fixed(config):
    bad = _scheduler(**config)
    bad.set_timesteps(10)
    assert float(step_std(bad, bad.timesteps[-1], 1.0)) == 0.0
    with pytest.raises(ValueError, match="zero variance"):
        check_stochastic_schedule(bad, 1.0)
    with pytest.raises(ValueError, match="zero-variance"):
        ddim_step_with_logprob(bad, torch.zeros(1, 3, 4, 4), bad.timesteps[-1], torch.zeros(1, 3, 4, 4), 1.0)

    good = logprob_scheduler(bad)
    assert good.config.timestep_spacing == "trailing" and good.config.set_alpha_to_one is False
    for steps in (1, 2, 10, 50, 500):
        good.set_timesteps(steps)
        check_stochastic_schedule(good, 1.0)
        assert int(good.timesteps[0]) == 999  # trailing starts at pure noise
        assert float(step_std(good, good.timesteps, 1.0).min()) > 0


def test_schedule_checks_name_the_problem():
    sched = _scheduler()
    sched.set_timesteps(1000)  # T/S = 1: the last step goes from t=0 to a_0 itself
    with pytest.raises(ValueError, match="timestep_spacing='trailing'"):
        check_stochastic_schedule(sched, 1.0)
    sched.set_timesteps(10)
    with pytest.raises(ValueError, match="eta = 0"):
        check_stochastic_schedule(sched, 0.0)
    with pytest.raises(ValueError, match="too large"):
        check_stochastic_schedule(sched, 3.0)
    assert logprob_scheduler(sched) is sched
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_logprob(_scheduler(), torch.zeros(1, 3, 4, 4), 10, torch.zeros(1, 3, 4, 4), 1.0)


def test_full_chain_has_finite_log_probs_at_every_step():
    sched = _scheduler(clip_sample=True)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 16, 16, generator=g)
    for t in sched.timesteps:
        step = ddim_step_with_logprob(sched, 0.1 * x, t, x, 1.0, generator=g)
        assert torch.isfinite(step.log_prob).all() and torch.isfinite(step.prev_sample).all()
        x = step.prev_sample


def test_gaussian_log_prob_shape_and_value():
    x = torch.zeros(2, 3, 4, 4)
    lp = gaussian_log_prob(x, x, torch.ones(2, 1, 1, 1))
    assert lp.shape == (2,)
    torch.testing.assert_close(lp, torch.full((2,), -0.5 * torch.log(torch.tensor(2 * torch.pi)).item()))


def test_generator_list_gives_batch_invariant_noise():
    """One generator per sample (diffusers' randn_tensor with a list): a sample's step does not depend on the
    batch it is drawn in."""
    sched = _scheduler()
    sched.set_timesteps(4)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t = sched.timesteps[0]
    both = ddim_step_with_logprob(sched, 0.1 * x, t, x, 1.0,
                                  generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
    alone = ddim_step_with_logprob(sched, 0.1 * x[1:], t, x[1:], 1.0, generator=[torch.Generator().manual_seed(6)])
    torch.testing.assert_close(both.prev_sample[1:], alone.prev_sample)
    torch.testing.assert_close(both.log_prob[1:], alone.log_prob)


def test_sde_module_imports_no_ray():
    code = "import sys, models.sde; print('ray' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False"]


def test_gaussian_mean_kl_is_the_exact_kl_of_equal_variance_gaussians():
    from torch.distributions import Normal, kl_divergence

    from models.sde import gaussian_mean_kl

    g = torch.Generator().manual_seed(3)
    mean, ref = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    std = torch.rand(3, 1, 1, 1, generator=g) + 0.1
    exact = kl_divergence(Normal(mean, std.expand_as(mean)), Normal(ref, std.expand_as(ref))).flatten(1).mean(1)
    torch.testing.assert_close(gaussian_mean_kl(mean, ref, std), exact)
    assert torch.equal(gaussian_mean_kl(mean, mean, std), torch.zeros(3))
