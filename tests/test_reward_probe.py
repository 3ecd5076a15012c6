"""lab.reward_probe: the residual scaling, the decoupled objective against training's own normalisation, a reward
that one metric games (generation up, decoupled objective down), and the CLI end to end on tiny models."""

from __future__ import annotations

import doctest
import json

import numpy as np
import pytest
import torch

from core.grpo import decoupled_rewards
from lab import reward_probe
from lab.reward_probe import decoupled_scores, probe_rows, scale_residual



def test_doctests():
    assert doctest.testmod(reward_probe).failed == 0


def test_scale_residual_keeps_the_base_and_scales_the_difference():
    rng = np.random.default_rng(0)
    base = rng.integers(60, 190, (8, 8, 3)).astype(np.uint8)
    image = np.clip(base.astype(int) + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
    assert np.array_equal(scale_residual(image, base, 0.0), base)
    assert np.array_equal(scale_residual(image, base, 1.0), image)
    doubled = scale_residual(image, base, 2.0).astype(int) - base
    assert np.array_equal(doubled, 2 * (image.astype(int) - base))
    with pytest.raises(ValueError, match="differ in shape"):
        scale_residual(image, base[:4], 1.0)


def test_the_decoupled_scores_of_the_samplers_own_images_are_trainings_decoupled_rewards():
    rng = np.random.default_rng(1)
    values = rng.random((3, 4, 2))  # 3 inputs x 4 images x 2 metrics
    weights = [1.0, 0.5]
    ours = decoupled_scores(values, values, weights)
    w = torch.tensor(weights) / sum(weights)
    theirs = decoupled_rewards(torch.tensor(values.reshape(12, 2), dtype=torch.float64), w.double(), 4)
    assert np.allclose(ours.reshape(-1), theirs.numpy(), atol=1e-9)


def _gamed_reward():
    """Metric a (weight 1) rises with s and varies a lot within a group; metric b (weight 1) falls with s and
    hardly varies: the mean rises with s, the decoupled objective falls."""
    rng = np.random.default_rng(2)
    noise_a, noise_b = rng.normal(0, 0.1, (5, 6)), rng.normal(0, 0.001, (5, 6))
    values, generation = {}, {}
    for s in (0.5, 1.0, 2.0):
        a, b = 0.5 + 0.1 * (s - 1) + noise_a, 0.5 - 0.01 * (s - 1) + noise_b
        values[s] = np.stack([a, b], axis=2)
        generation[s] = (a + b) / 2
    return values, generation


def test_a_gain_bought_from_a_low_variance_metric_shows_as_a_falling_decoupled_objective():
    values, generation = _gamed_reward()
    rows = {r.scale: r for r in probe_rows(values, values, generation, ["a", "b"], [1.0, 1.0])}
    assert rows[1.0].generation_change == 0.0 and rows[1.0].objective_change == pytest.approx(0.0, abs=1e-12)
    assert rows[2.0].generation_change == pytest.approx(0.045, abs=1e-9)  # (0.1 - 0.01) / 2
    assert rows[2.0].objective_change < -2 * rows[2.0].objective_se < 0  # b's tiny spread makes its loss count
    assert rows[0.5].generation_change < 0 < rows[0.5].objective_change
    assert rows[2.0].raw["a"] == pytest.approx(float(values[2.0][..., 0].mean()))


def test_the_gain_vote_follows_the_reward_along_the_gain():
    """The advantages favour the more detailed images where the reward rises with the gain, the smoother ones
    where it falls, neither where only noise differs; scale 0 is left out (no log-gain)."""
    rng = np.random.default_rng(3)
    noise = rng.normal(0, 0.01, (6, 8))
    rising = {s: 0.5 + 0.05 * np.log(s) + noise for s in (0.5, 1.0, 2.0)}
    up = reward_probe.gain_vote({0.0: noise, **rising}, 0.3, draws=100)
    down = reward_probe.gain_vote({s: 0.5 - 0.05 * np.log(s) + noise for s in (0.5, 1.0, 2.0)}, 0.3, draws=100)
    flat = reward_probe.gain_vote({s: 0.5 + noise for s in (0.5, 1.0, 2.0)}, 0.3, draws=100)
    assert up.mean > 0.1 and up.positive_share == 1.0 and down.mean < -0.1 and down.positive_share == 0.0
    assert abs(flat.mean) < 0.02  # the advantages rank the noise, which the gains do not move
    assert 0 < up.step_se < up.mean
    with pytest.raises(ValueError, match="2 positive scales"):
        reward_probe.gain_vote({0.0: noise, 1.0: noise}, 0.3)


def test_probe_rows_needs_the_samplers_own_images_and_a_group():
    values, generation = _gamed_reward()
    with pytest.raises(ValueError, match="must include 1.0"):
        probe_rows({2.0: values[2.0]}, values, generation, ["a", "b"], [1.0, 1.0])
    one = {s: v[:, :1] for s, v in values.items()}
    with pytest.raises(ValueError, match="G >= 2"):
        probe_rows(one, one, generation, ["a", "b"], [1.0, 1.0])


def test_the_probe_cli_scores_every_scale_with_the_configs_reward(env, tmp_path, fast_model_args):
    out = tmp_path / "probe"
    rc = reward_probe.main(["--checkpoint", str(env / "models"), "--num", "2", "--samples-per-image", "2",
                            "--scales", "0,2", "--out", str(out), *fast_model_args])
    assert rc == 0
    report = json.loads((out / "probe.json").read_text())
    assert report["metrics"] == {"piqe": 1.0, "psnr": 0.5, "ssim": 0.5}  # configs/grpo_local.yaml's reward
    rows = {r["scale"]: r for r in report["rows"]}
    assert sorted(rows) == [0.0, 1.0, 2.0]
    assert rows[1.0]["generation_change"] == 0.0
    assert rows[0.0]["raw"]["psnr"] != rows[2.0]["raw"]["psnr"]  # the scaled images were scored, not the same
    assert "| 2 |" in (out / "probe.md").read_text()
    assert report["vote"]["std"] == 0.3 and -1 < report["vote"]["mean"] < 1  # 0 is left out: scales 1 and 2
    assert "inputs voting for more detail" in (out / "probe.md").read_text()


def test_bad_probe_arguments_are_named(env, capsys):
    assert reward_probe.main(["--checkpoint", str(env / "models"), "--samples-per-image", "1"]) == 2
    assert "--samples-per-image 1 must be >= 2" in capsys.readouterr().err
    assert reward_probe.main(["--checkpoint", str(env / "models"), "--scales", "1,-0.5"]) == 2
    assert "every scale must be >= 0" in capsys.readouterr().err
    assert reward_probe.main(["--checkpoint", str(env / "models"), "--vote-std", "-1"]) == 2
    assert "--vote-std -1.0 must be >= 0" in capsys.readouterr().err
    assert reward_probe.main(["--checkpoint", str(env / "models"), "--scales", "0,1"]) == 2
    assert "needs a positive scale besides 1" in capsys.readouterr().err
