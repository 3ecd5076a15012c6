"""Generation-reward metrics: offline pyiqa ones, failures, timeouts, a network metric from a local file."""

import math
import os
import socket
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

if "pyiqa" not in sys.modules:  # pyiqa fixes its weight cache ($TORCH_HOME/hub/pyiqa) at import
    os.environ["TORCH_HOME"] = tempfile.mkdtemp(prefix="torch_home_")

from core.config import QualityMetricConfig
from rewards.quality import QualityScore, QualityScorer, build_quality_scorer, generation_reward

# The offline metrics recommended for configs/grpo_local.yaml (see the rewards report).
PIQE = QualityMetricConfig(name="piqe", weight=1.0, scale=100.0, lower_better=True)
ENTROPY = QualityMetricConfig(name="entropy", weight=0.25, scale=8.0, lower_better=False)


def crops() -> np.ndarray:
    """Three real 64x64 photo crops (scikit-image ships them): (3, 64, 64, 3) uint8."""
    from skimage import data

    return np.stack(
        [
            data.astronaut()[100:164, 180:244],
            data.chelsea()[100:164, 100:164],
            data.coffee()[200:264, 200:264],
        ]
    )


def noisy(images: np.ndarray, sigma: float = 25.0) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.clip(images + rng.normal(0, sigma, images.shape), 0, 255).astype(np.uint8)


def blurred(images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.avg_pool2d(x, 5, 1, 2, count_include_pad=False)
    return x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def offline_scorer() -> QualityScorer:
    return build_quality_scorer([PIQE, ENTROPY], "cpu")


def test_offline_metrics_rank_clean_above_degraded(offline_scorer):
    clean, noise, blur = crops(), noisy(crops()), blurred(crops())
    scores = offline_scorer(list(clean) + list(noise) + list(blur))
    assert all(not s.errors and set(s.values) == {"piqe", "entropy"} for s in scores)
    assert all(0.0 <= v <= 1.0 for s in scores for v in s.values.values())
    piqe = [s.values["piqe"] for s in scores]
    for i in range(3):
        assert piqe[i] > piqe[3 + i] and piqe[i] > piqe[6 + i]  # lower_better -> 1 - raw/100
        assert scores[i].values["piqe"] == pytest.approx(1 - scores[i].raw["piqe"] / 100)
    flat = offline_scorer([np.full((64, 64, 3), 128, np.uint8)])[0]
    assert flat.values["piqe"] == pytest.approx(0.0)  # PIQE 100: a flat output is the worst possible


def test_scores_per_image_do_not_depend_on_batching(offline_scorer):
    images = list(crops())
    together = offline_scorer(images)
    alone = [offline_scorer([img])[0] for img in images]
    for a, b in zip(together, alone):
        assert a.values == pytest.approx(b.values, abs=1e-5)


def test_mixed_sizes_and_a_bad_image_are_scored_separately(offline_scorer):
    small = crops()[:, :32, :32]
    bad = np.zeros((64, 64, 3), np.float32)
    scores = offline_scorer([crops()[0], small[0], bad, crops()[1]])
    assert not scores[0].errors and not scores[1].errors and not scores[3].errors
    assert set(scores[2].errors) == {"piqe", "entropy"} and "uint8" in scores[2].errors["piqe"]
    assert not scores[2].values


def test_a_failing_metric_does_not_sink_the_others():
    # ms_ssim really fails on 64x64 (its five scales need >= 161 px); psnr and piqe work.
    scorer = build_quality_scorer(
        [PIQE],
        "cpu",
        full_reference=[
            QualityMetricConfig(name="psnr", scale=40.0),
            QualityMetricConfig(name="ms_ssim", weight=2.0),
        ],
    )
    hr = crops()
    s = scorer(list(noisy(hr)), list(hr))[0]
    assert set(s.values) == {"piqe", "psnr"} and set(s.errors) == {"ms_ssim"}
    assert "RuntimeError" in s.errors["ms_ssim"]
    assert s.values["psnr"] == pytest.approx(s.raw["psnr"] / 40)
    w = scorer.weights
    assert generation_reward(s, w, "renormalize") == pytest.approx((s.values["piqe"] + s.values["psnr"]) / 2)
    assert generation_reward(s, w, "zero") == pytest.approx((s.values["piqe"] + s.values["psnr"]) / 4)


def test_full_reference_metrics_do_not_apply_without_hr():
    scorer = build_quality_scorer([PIQE], "cpu", full_reference=[QualityMetricConfig(name="ssim")])
    with_hr, without_hr = scorer([crops()[0], crops()[1]], [crops()[0], None])
    assert with_hr.values["ssim"] == pytest.approx(1.0)
    assert "ssim" not in without_hr.values and "ssim" not in without_hr.errors
    assert generation_reward(without_hr, scorer.weights) == pytest.approx(without_hr.values["piqe"])
    mismatch = scorer([crops()[0]], [crops()[0][:32]])[0]
    assert "shape" in mismatch.errors["ssim"] and "piqe" in mismatch.values


def _cfg(name, **kw):
    return QualityMetricConfig(name=name, **kw)


def test_raising_and_non_finite_metrics_are_reported():
    def boom(x):
        raise RuntimeError("kaput")

    def half_nan(x):  # (N, 3, H, W) -> (N, 1)
        out = torch.full((x.shape[0], 1), 0.5)
        out[0] = float("nan")
        return out

    scorer = QualityScorer(
        [(_cfg("ok"), lambda x: x.mean(dim=(1, 2, 3))), (_cfg("boom"), boom), (_cfg("nan"), half_nan)]
    )
    a, b = scorer([np.full((8, 8, 3), 255, np.uint8), np.zeros((8, 8, 3), np.uint8)])
    assert (
        a.values == {"ok": 1.0}
        and a.errors["boom"] == "RuntimeError: kaput"
        and "non-finite" in a.errors["nan"]
    )
    assert b.values == {"ok": 0.0, "nan": 0.5} and set(b.errors) == {"boom"}


def test_slow_metric_is_bounded_by_the_timeout():
    calls = []

    def slow(x):  # stuck on its first call only
        calls.append(1)
        time.sleep(1.5 if len(calls) == 1 else 0.0)
        return torch.ones(x.shape[0])

    scorer = QualityScorer(
        [(_cfg("fast"), lambda x: torch.full((x.shape[0],), 0.7)), (_cfg("slow"), slow)], timeout_s=0.3
    )
    img = [np.zeros((8, 8, 3), np.uint8)]
    start = time.perf_counter()
    first = scorer(img)[0]
    second = scorer(img)[0]  # the timed-out call is still running: fail at once, do not stack threads
    elapsed = time.perf_counter() - start
    assert elapsed < 1.2
    assert "metric_timeout_s = 0.3" in first.errors["slow"] and "still busy" in second.errors["slow"]
    assert first.values == {"fast": pytest.approx(0.7)} and second.values == {"fast": pytest.approx(0.7)}
    time.sleep(1.5)  # the stuck call ends; the metric is called again
    assert scorer(img)[0].values == {"fast": pytest.approx(0.7), "slow": 1.0}


def test_config_mistakes_fail_at_build_naming_the_metric():
    with pytest.raises(ValueError, match="no_such_metric"):
        build_quality_scorer([_cfg("no_such_metric")])
    with pytest.raises(ValueError, match="lower_better"):
        build_quality_scorer([_cfg("piqe", scale=100.0)])  # PIQE is lower-better
    with pytest.raises(ValueError, match="reward.full_reference"):
        build_quality_scorer([_cfg("psnr")])  # a full-reference metric listed as no-reference
    with pytest.raises(ValueError, match="unique"):
        QualityScorer([(_cfg("a"), None), (_cfg("a"), None)])


def test_generation_reward_rules():
    s = QualityScore(values={"a": 1.0}, errors={"b": "x"})
    assert generation_reward(s, {"a": 1.0, "b": 3.0}, "zero") == pytest.approx(0.25)
    assert math.isnan(generation_reward(QualityScore(errors={"a": "x"}), {"a": 1.0}))  # all failed: not scored 0
    assert generation_reward(QualityScore(errors={"a": "x"}), {"a": 1.0}, "zero") == 0.0  # the rule the user chose
    with pytest.raises(ValueError, match="failed_metric"):
        generation_reward(s, {"a": 1.0}, "average")


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_network_metric_loads_local_random_weights_through_pyiqa(tmp_path, no_network):
    """topiq_nr (CFANet, ResNet-50 backbone) from a local checkpoint, the way a cluster config names one."""
    import pyiqa

    # 1. the architecture with no weights at all: nothing to download
    blank = pyiqa.create_metric("topiq_nr", device="cpu", pretrained=False, backbone_pretrain=False)
    gen = torch.Generator().manual_seed(0)
    state = {
        k: (v + 0.01 * torch.randn(v.shape, generator=gen)) if v.is_floating_point() else v
        for k, v in blank.net.state_dict().items()
    }
    path = tmp_path / "cfanet_nr_random.pth"
    torch.save({"params": state}, path)  # pyiqa's checkpoint layout: {"params": state_dict}
    del blank

    # 2. the reward's own path: pyiqa.create_metric(..., pretrained_model_path=<local file>)
    cfg = _cfg("topiq_nr", options={"pretrained_model_path": str(path), "backbone_pretrain": False})
    scorer = build_quality_scorer([cfg], "cpu")
    loaded = scorer.metric_fns["topiq_nr"].net.state_dict()
    assert loaded.keys() == state.keys()  # pyiqa loads CFANet with strict=False: check it really loaded
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    scores = scorer(list(crops()[:2]))
    assert all(not s.errors and 0.0 <= s.values["topiq_nr"] <= 1.0 for s in scores)
    hub = os.path.join(os.environ.get("TORCH_HOME", ""), "hub")
    assert not os.path.isdir(hub) or not any(files for _, _, files in os.walk(hub))  # nothing fetched


def test_known_learnable_sanity_metrics_build_by_name_and_score_what_they_say():
    """rewards.sanity_metrics: brightness (the mean intensity) and detail (the mean neighbour difference), both
    higher better, built by name like a pyiqa metric and checked the same way (a wrong lower_better is named)."""
    scorer = build_quality_scorer([_cfg("brightness", scale=1.0), _cfg("detail", scale=1.0)])
    black, white = np.zeros((16, 16, 3), np.uint8), np.full((16, 16, 3), 255, np.uint8)
    checker = np.indices((16, 16)).sum(0) % 2 * 255
    checker = np.repeat(checker[..., None], 3, axis=2).astype(np.uint8)
    scores = scorer([black, white, checker])
    assert [s.raw["brightness"] for s in scores] == pytest.approx([0.0, 1.0, 0.5])
    assert [s.raw["detail"] for s in scores] == pytest.approx([0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"reward.metrics\[0\] \(name 'brightness'.*lower_better"):
        build_quality_scorer([_cfg("brightness", scale=1.0, lower_better=True)])
