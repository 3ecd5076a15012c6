"""lab.text_use_probe end to end on the tiny models: per stage, the output change when a chain's texts are another
photo's and when a stage-aware model is told another stage; bad arguments are named."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lab import text_use_probe
from lab.text_use_probe import psnr


def test_psnr_of_equal_and_of_one_grey_level_apart():
    a = np.full((4, 4, 3), 100, np.uint8)
    assert psnr(a, a) == 100.0
    assert psnr(a, a + 1) == pytest.approx(20 * np.log10(255.0))


def test_the_probe_reports_every_stage_and_hears_the_stage_of_a_stage_aware_model(env, tmp_path):
    out = tmp_path / "use"
    assert text_use_probe.main(["--checkpoint", str(env / "models"), "--num", "4", "--out", str(out)]) == 0
    report = json.loads((out / "text_use.json").read_text())
    assert report["stage_aware"] and report["num_images"] == 4
    rows = report["stages"]
    assert [r["stage"] for r in rows] == ["rough", "middle", "final"]
    assert [r["stage_label"] for r in rows] == ["middle", "final", "rough"]
    for r in rows:
        assert 0 < r["psnr_own"] < 100 and r["text_pixel_change"] >= 0
        assert r["stage_pixel_change"] > 0  # another stage's class embeddings: another image


def test_bad_text_use_probe_arguments_are_named(env, capsys):
    assert text_use_probe.main(["--checkpoint", str(env / "models"), "--num", "1"]) == 2
    assert "--num" in capsys.readouterr().err
    assert text_use_probe.main(["--checkpoint", str(env / "nowhere")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_grey_change_is_the_mean_absolute_difference_over_pairs():
    a = [np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 3), 10, np.uint8)]
    b = [np.full((2, 2, 3), 4, np.uint8), np.full((2, 2, 3), 4, np.uint8)]
    assert text_use_probe.grey_change(a, b) == pytest.approx(5.0)  # (4 + 6) / 2, no uint8 wrap-around
