"""Real-ESRGAN degradation: determinism, replay, output sizes, kernels, and labels consistent with parameters."""

import copy
import json
import math
import time
from collections import Counter
from dataclasses import replace

import cv2
import numpy as np
import pytest

from core.chain import LEVELS, degradation_text, parse_degradation_text
from core.config import DegradationConfig
from data.degradations import (
    ITEMS,
    KERNEL_TYPES,
    LEVEL_RULES,
    apply_params,
    build_kernel,
    degrade,
    kernel_sigma,
    levels_from_measures,
    measures_of,
    sample_params,
)


def _photo_crop(h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    """A textured colour image (smooth gradients plus edges), so blur and noise change it measurably."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 90 * np.sin(xx / 5.0), 128 + 90 * np.cos(yy / 7.0), 128 + 60 * np.sin((xx + yy) / 9.0)], -1)
    base[(xx // 8 + yy // 8) % 2 == 0] += 30.0
    return np.clip(base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8)


# A config with nothing random left that degrades: tiny iso kernel, no sinc, keep size, no noise, no JPEG.
CLEAN = DegradationConfig(
    kernel_list=["iso"], kernel_prob=[1.0], sinc_prob=0.0, blur_sigma=[0.2, 0.2],
    resize_prob=[0.0, 0.0, 1.0], noise_range=[0.0, 0.0], poisson_scale_range=[0.0, 0.0], jpeg_range=[100, 100],
    second_blur_prob=0.0, kernel_list2=["iso"], kernel_prob2=[1.0], sinc_prob2=0.0,
    resize_prob2=[0.0, 0.0, 1.0], noise_range2=[0.0, 0.0], poisson_scale_range2=[0.0, 0.0], jpeg_range2=[100, 100],
    final_sinc_prob=0.0,
)


def test_same_seed_same_output_and_labels_different_seed_differs():
    hr = _photo_crop()
    cfg = DegradationConfig()
    lr1, lab1 = degrade(hr, cfg, 4, np.random.default_rng(7))
    lr2, lab2 = degrade(hr, cfg, 4, np.random.default_rng(7))
    assert np.array_equal(lr1, lr2)
    assert lab1 == lab2
    lr3, lab3 = degrade(hr, cfg, 4, np.random.default_rng(8))
    assert not np.array_equal(lr1, lr3)
    assert lab1.params != lab3.params


def test_params_are_json_and_replay_exactly():
    hr = _photo_crop()
    for seed in range(10):
        lr, labels = degrade(hr, DegradationConfig(), 4, np.random.default_rng(seed))
        params = json.loads(json.dumps(labels.params))  # JSON round trip loses nothing needed
        replay, _ = apply_params(hr, params)
        assert np.array_equal(replay, lr)


@pytest.mark.parametrize("shape,scale", [((64, 64), 4), ((48, 80), 4), ((32, 24), 2), ((20, 20), 1), ((512, 512), 4)])
def test_lr_is_hr_over_scale_exactly(shape, scale):
    hr = _photo_crop(*shape)
    for seed in range(3):
        lr, _ = degrade(hr, DegradationConfig(), scale, np.random.default_rng(seed))
        assert lr.shape == (shape[0] // scale, shape[1] // scale, 3) and lr.dtype == np.uint8


def test_bad_hr_is_rejected():
    with pytest.raises(ValueError, match="not divisible by scale 4"):
        degrade(_photo_crop(66, 64), DegradationConfig(), 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8"):
        degrade(_photo_crop().astype(np.float32), DegradationConfig(), 4, np.random.default_rng(0))


def test_levels_valid_consistent_with_measures_and_text_round_trips():
    hr = _photo_crop(32, 32)
    rng = np.random.default_rng(0)
    for _ in range(100):
        _, labels = degrade(hr, DegradationConfig(), 4, rng)
        assert tuple(labels.levels) == ITEMS
        assert set(labels.levels.values()) <= set(LEVELS)
        assert parse_degradation_text(degradation_text(labels.levels)) == labels.levels
        p = labels.params
        assert labels.levels == levels_from_measures(p["measures"])
        # the measures are the documented functions of the sampled parameters
        assert p["measures"] == measures_of(p, p["noise_measured"], p["measures"]["noise_sigma"])
        factors = [p["stage1"]["resize"]["factor"], p["stage2"]["resize"]["factor"]]
        assert p["measures"]["downscale"] == pytest.approx(math.prod(f for f in factors if f < 1))
        assert p["measures"]["upscale"] == pytest.approx(math.prod(f for f in factors if f > 1))
        assert p["measures"]["jpeg_quality"] == min(p["stage1"]["jpeg_quality"], p["final"]["jpeg_quality"])


def test_default_config_uses_every_level():
    hr = _photo_crop(32, 32)
    rng = np.random.default_rng(1)
    seen = {item: Counter() for item in ITEMS}
    for _ in range(500):  # none of noise and compression are ~1% each
        _, labels = degrade(hr, DegradationConfig(), 4, rng)
        for item, level in labels.levels.items():
            seen[item][level] += 1
    for item in ITEMS:
        assert set(seen[item]) == set(LEVELS), (item, seen[item])


def test_clean_config_gives_none_everywhere_and_a_plain_resize():
    hr = _photo_crop()
    for seed in range(5):
        lr, labels = degrade(hr, CLEAN, 4, np.random.default_rng(seed))
        assert labels.levels == dict.fromkeys(ITEMS, "none")
        assert degradation_text(labels.levels) == (
            "no blur, no downsample, no noise, no compression, no upsample")
        plain = cv2.resize(hr, (16, 16), interpolation=cv2.INTER_AREA).astype(np.float32)
        assert np.abs(lr.astype(np.float32) - plain).mean() < 12  # only the resize mode differs


def test_heavy_settings_give_heavy_levels():
    hr = _photo_crop()
    cases = {
        "noise": replace(CLEAN, gaussian_noise_prob=1.0, noise_range=[40.0, 50.0], gray_noise_prob=0.0),
        "blur": replace(CLEAN, blur_sigma=[4.0, 4.0]),
        "compression": replace(CLEAN, jpeg_range=[25.0, 25.0]),
        "downsample": replace(CLEAN, resize_prob=[0.0, 1.0, 0.0], resize_prob2=[0.0, 1.0, 0.0]),
        "upsample": replace(CLEAN, resize_prob=[1.0, 0.0, 0.0], resize_range=[1.0, 1.5],
                            resize_prob2=[1.0, 0.0, 0.0], resize_range2=[1.0, 1.2]),
    }
    lr_clean, _ = degrade(hr, CLEAN, 4, np.random.default_rng(0))
    for item, cfg in cases.items():
        lr, labels = degrade(hr, cfg, 4, np.random.default_rng(0))
        if item in ("upsample", "downsample"):  # factors are uniform in [1, max] / [min, 1]: check the rule
            measure = labels.params["measures"][LEVEL_RULES[item].measure]
            assert measure != 1 and labels.levels[item] == LEVEL_RULES[item].level(measure)
            levels = {degrade(hr, cfg, 4, np.random.default_rng(s))[1].levels[item] for s in range(30)}
            assert {"light", "heavy"} <= levels, (item, levels)
        else:
            assert labels.levels[item] == "heavy", (item, labels.params["measures"])
        others = {k: v for k, v in labels.levels.items() if k != item}
        assert set(others.values()) == {"none"}, (item, others)
        if item in ("noise", "compression", "blur"):
            assert not np.array_equal(lr, lr_clean)
    blurred, _ = degrade(hr, cases["blur"], 4, np.random.default_rng(0))
    assert blurred.astype(np.float32).std() < lr_clean.astype(np.float32).std()


def test_level_rule_boundaries():
    blur, jpeg = LEVEL_RULES["blur"], LEVEL_RULES["compression"]
    lo, mid, hi = blur.bounds
    assert [blur.level(v) for v in (0.0, lo - 1e-6, lo, mid, hi, 99.0)] == [
        "none", "none", "light", "medium", "heavy", "heavy"]
    q_light, q_medium, q_heavy = jpeg.bounds
    assert [jpeg.level(v) for v in (100, q_light, q_light - 1, q_medium - 1, q_heavy - 1, 1)] == [
        "none", "none", "light", "medium", "heavy", "heavy"]
    for rule in LEVEL_RULES.values():  # bounds are monotone in the rule's direction
        b = list(rule.bounds)
        assert b == sorted(b, reverse=rule.descending)


def test_kernels_are_normalised_symmetric_and_sigma_is_sane():
    for kind in KERNEL_TYPES:
        spec = {"type": kind, "size": 21, "sigma_x": 2.0, "sigma_y": 1.0 if "aniso" in kind else 2.0,
                "theta": 0.7 if "aniso" in kind else 0.0, "beta": 1.5}
        k = build_kernel(spec)
        assert k.shape == (21, 21) and abs(k.sum() - 1) < 1e-5 and np.allclose(k, k[::-1, ::-1], atol=1e-7)
    k = build_kernel({"type": "sinc", "size": 11, "omega_c": 1.0}, pad_to=21)
    assert k.shape == (21, 21) and abs(k.sum() - 1) < 1e-5 and k[0].sum() == 0  # zero padding
    # an iso Gaussian's sigma is its spatial standard deviation
    spec = {"type": "iso", "size": 21, "sigma_x": 2.0, "sigma_y": 2.0, "theta": 0.0, "beta": 1.0}
    k = build_kernel(spec).astype(np.float64)
    xx = np.arange(21) - 10
    assert math.sqrt((k.sum(0) * xx**2).sum()) == pytest.approx(kernel_sigma(spec), rel=0.01)
    # a sinc at the Nyquist frequency counts as no blur, lower cutoffs as more
    sigmas = [kernel_sigma({"type": "sinc", "size": 21, "omega_c": w}) for w in (math.pi, math.pi / 2, math.pi / 5)]
    assert sigmas[0] == 0 and 0 < sigmas[1] < sigmas[2]


def _with_noise(params: dict, **noise) -> dict:
    p = copy.deepcopy(params)
    p["stage1"]["noise"] = {"seed": 3, "gray": False, **noise}
    return p


def test_gray_noise_is_shared_by_the_channels_and_color_noise_is_not():
    hr = np.full((64, 64, 3), 128, np.uint8)  # mid grey: no clipping, so differences are the noise itself
    params = sample_params(CLEAN, 4, np.random.default_rng(0))
    clean, _ = apply_params(hr, params)
    gray, _ = apply_params(hr, _with_noise(params, type="gaussian", sigma=20.0, gray=True))
    color, _ = apply_params(hr, _with_noise(params, type="gaussian", sigma=20.0, gray=False))
    d_gray = gray.astype(np.int16) - clean
    d_color = color.astype(np.int16) - clean
    assert np.abs(d_gray).mean() > 1 and np.abs(d_color).mean() > 1
    assert np.abs(d_gray[..., 0] - d_gray[..., 1]).max() <= 1
    assert np.abs(d_color[..., 0] - d_color[..., 1]).mean() > 1


def test_poisson_noise_grows_with_brightness_and_scale():
    params = sample_params(CLEAN, 4, np.random.default_rng(0))
    rms = {}
    for level in (30, 200):
        for scale in (1.0, 2.0):
            hr = np.full((64, 64, 3), level, np.uint8)
            _, measured = apply_params(hr, _with_noise(params, type="poisson", scale=scale))
            rms[level, scale] = measured["noise_rms1"]
    assert rms[200, 1.0] > rms[30, 1.0] > 0
    assert rms[200, 2.0] == pytest.approx(2 * rms[200, 1.0], rel=0.05)


def test_speed():
    cfg = DegradationConfig()
    small, big = _photo_crop(64, 64), _photo_crop(512, 512)
    rng = np.random.default_rng(0)
    degrade(small, cfg, 4, rng)  # warm-up
    t = time.perf_counter()
    for _ in range(50):
        degrade(small, cfg, 4, rng)
    per_small = (time.perf_counter() - t) / 50
    times = []
    for _ in range(3):
        t = time.perf_counter()
        degrade(big, cfg, 4, rng)
        times.append(time.perf_counter() - t)
    assert per_small < 0.02, f"64 px crop: {per_small * 1e3:.1f} ms"
    assert sorted(times)[1] < 0.5, f"512 px crop: {sorted(times)[1]:.2f} s"
