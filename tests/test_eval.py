"""tools.eval: the report (JSON + markdown) on held-out skimage crops and on real LR images, and the offline
weight checks that keep pyiqa from downloading.

The evaluation runs in this process (``tools.eval.main``) on tiny bootstrap models with the HF engine and a short
chain (8 tokens per turn, 2 denoising steps); TORCH_HOME points at an empty folder so which metrics are
skipped does not depend on what this machine has cached.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from core.chain import TEXT_TAGS

REWARDS = ("format", "degradation", "understanding", "generation", "total")
FR = ("PSNR", "SSIM", "LPIPS", "DISTS")
NR = ("NIQE", "MUSIQ", "MANIQA", "CLIPIQA", "TOPIQ", "PIQE")
PANEL = ["trainer.eval_every=5", "trainer.eval_panel={full_reference: [{name: gmsd, lower_better: true}, "
         "{name: psnry}], metrics: [{name: entropy}]}"]
NEED_WEIGHTS = ("LPIPS", "DISTS", "NIQE", "MUSIQ", "MANIQA", "CLIPIQA", "TOPIQ")


def _run(argv: list[str]) -> int:
    from tools.eval import main

    return main(argv)


@pytest.fixture(scope="module")
def synthetic(env, fast_model_args):
    out = env / "synthetic"
    rc = _run(["--checkpoint", str(env / "models"), "--data", "skimage", "--split", "eval", "--num", "3",
               "--out", str(out), "--metric-weights", str(env / "weights"), "--save-images", *fast_model_args, *PANEL])
    assert rc == 0
    return json.loads((out / "eval.json").read_text()), (out / "eval.md").read_text()


def test_save_images_writes_every_input_and_stage(synthetic, env):
    report, _ = synthetic
    names = {p.name for p in (env / "synthetic" / "images").iterdir()}
    for row in report["per_chain"]:
        base = f"{row['prompt_id']:04d}_{row['image_id']}"
        assert {f"{base}_lr.png", f"{base}_bicubic.png", f"{base}_hr.png"} <= names
        assert {f"{base}_s{row['sample_index']}_{stage}.png" for stage in ("rough", "middle", "final")} <= names


def test_synthetic_report_rewards(synthetic):
    report, _ = synthetic
    assert report["num_images"] == 3 and report["num_chains"] == 3 and report["engine"] == "hf"
    assert report["data"]["mode"] == "synthetic" and report["data"]["split"] == "eval"
    weights = {"format": 1.0, "degradation": 1.0, "understanding": 1.0, "generation": 1.0}  # grpo_random_local.yaml
    for part in REWARDS:
        r = report["rewards"][part]
        assert r["n"] == 3, (part, r)  # synthetic LR with skimage tags: every component applies
        hi = sum(weights.values()) if part == "total" else 1.0
        assert 0.0 <= r["mean"] <= hi, (part, r)
    for row in report["per_chain"]:
        parts = row["rewards"]
        assert all(0.0 <= parts[k] <= 1.0 for k in REWARDS[:-1])
        assert parts["total"] == pytest.approx(sum(weights[k] * parts[k] for k in weights))
        assert row["text"].endswith("<final_image><|image|></final_image>")
        # each text section's own format: 1 everywhere exactly when the chain's format is 1
        sections = [parts[f"format/{tag}"] for tag in TEXT_TAGS]
        assert parts["format"] <= min(sections)
    assert [k for k in report["rewards"] if k.startswith("format/")] == [f"format/{t}" for t in TEXT_TAGS]


def test_synthetic_report_metrics(synthetic):
    report, _ = synthetic
    m = report["metrics"]
    assert set(m) == set(FR + NR)
    for label in ("PSNR", "SSIM", "PIQE"):  # offline metrics: computed for the model and the bicubic baseline
        assert not m[label]["skipped"] and m[label]["n"] == 3, m[label]
        assert math.isfinite(m[label]["model"]) and math.isfinite(m[label]["bicubic"])
        assert isinstance(m[label]["beats_bicubic"], bool)
    assert 0 < m["SSIM"]["bicubic"] <= 1 and m["PSNR"]["bicubic"] > 10  # bicubic of a real LR crop vs its HR
    for label in NEED_WEIGHTS:  # nothing cached: skipped, naming the missing file and where it was looked for
        assert m[label]["skipped"] and m[label]["n"] == 0 and m[label]["model"] is None, m[label]
        assert m[label]["note"].startswith("skipped: ") and "not found in" in m[label]["note"]


def test_synthetic_report_markdown(synthetic):
    report, md = synthetic
    assert "| reward | mean | n | note |" in md
    assert "| metric | model | bicubic | beats bicubic | n | note |" in md
    for part in REWARDS:
        assert f"| {part} | " in md
    rows = {line.split("|")[1].strip().rstrip("↑↓"): line for line in md.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip().rstrip("↑↓") in FR + NR}
    assert set(rows) == set(FR + NR)
    assert "skipped: weights LPIPS_v0.1_alex" in rows["LPIPS"]
    assert f"{report['metrics']['PSNR']['model']:.2f}" in rows["PSNR"] and "skipped" not in rows["PSNR"]


def test_the_held_out_panel_is_reported_beside_the_rewards(synthetic):
    """trainer.eval_panel in tools.eval: every panel metric, raw, on every chain; none of them a reward."""
    report, md = synthetic
    panel = report["panel"]
    assert list(panel) == ["entropy", "gmsd", "psnry"]
    for name, p in panel.items():
        assert p["n"] == report["num_chains"] and math.isfinite(p["mean"]), name
        assert f"quality/{name}" not in report["rewards"]
        per_chain = [row["panel"][name] for row in report["per_chain"]]  # each chain's, for a paired comparison
        assert p["mean"] == pytest.approx(sum(per_chain) / len(per_chain)), name
    assert panel["gmsd"]["lower_better"] and not panel["psnry"]["lower_better"]
    assert 0 < panel["gmsd"]["mean"] < 1 and 3 < panel["psnry"]["mean"] < 60
    assert "## Held-out panel" in md and f"| gmsd↓ | {panel['gmsd']['mean']:.4f} | 3 |" in md


def test_real_lr_report_without_hr(env, fast_model_args):
    src = env / "real"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(src / "a.png")
    Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(src / "b.png")  # padded to 16x24
    (src / "a.txt").write_text("noise, texture")  # tags: the understanding reward applies to a only
    out = env / "real_out"
    rc = _run(["--checkpoint", str(env / "models"), "--data", str(src), "--real-lr",
               "--samples-per-image", "2", "--out", str(out), *fast_model_args])
    assert rc == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["data"]["mode"] == "real-lr" and report["num_images"] == 2 and report["num_chains"] == 4
    r = report["rewards"]
    assert r["format"]["n"] == 4 and r["total"]["n"] == 4
    assert r["degradation"]["n"] == 0 and "no degradation labels" in r["degradation"]["note"]
    assert r["understanding"]["n"] == 2  # the two chains of a
    assert r["generation"]["n"] == 4  # PIQE still applies; PSNR/SSIM terms need HR and drop out
    m = report["metrics"]
    for label in FR:
        assert m[label]["skipped"] and "needs HR" in m[label]["note"]
    assert not m["PIQE"]["skipped"] and m["PIQE"]["n"] == 4 and math.isfinite(m["PIQE"]["bicubic"])
    b = [row for row in report["per_chain"] if row["image_id"] == "b"]
    assert b and b[0]["lr_size"] == [12, 20] and "padded 20x12 -> 24x16" in b[0]["notes"][0]


# ------------------------------------------------------------------------------------------ offline weights
def test_metric_availability_finds_weight_files_in_metric_weights(tmp_path, monkeypatch):
    from rewards.eval_metrics import PAPER_METRICS, metric_availability

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))
    musiq = next(m for m in PAPER_METRICS if m.label == "MUSIQ")
    options, why = metric_availability(musiq.weights, str(tmp_path))
    assert options == {} and "musiq_koniq_ckpt-e95806b9.pth not found in" in why and str(tmp_path) in why
    (tmp_path / "musiq_koniq_ckpt-e95806b9.pth").write_bytes(b"x")
    options, why = metric_availability(musiq.weights, str(tmp_path))
    assert why == "" and options == {"pretrained_model_path": str(tmp_path / "musiq_koniq_ckpt-e95806b9.pth")}


def test_no_downloads_fails_at_once_and_restores(tmp_path):
    import torch.hub

    from rewards.eval_metrics import DownloadBlocked, no_downloads

    original = torch.hub.download_url_to_file
    with no_downloads(), pytest.raises(DownloadBlocked, match="would download https://example.invalid/w.pth"):
        torch.hub.download_url_to_file("https://example.invalid/w.pth", str(tmp_path / "w.pth"))
    assert torch.hub.download_url_to_file is original
    assert not (tmp_path / "w.pth").exists()
