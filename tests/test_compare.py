"""tools.compare: held-out change against its standard error and the training curve's step-to-step noise."""

import json
import math
from statistics import NormalDist

import numpy as np
import pytest

from core.stats import crops_for_power, paired_clustered_se
from tools import compare


def _report(step, per_reward):
    n = len(next(iter(per_reward.values())))
    chains = [{"rewards": {k: v[i] for k, v in per_reward.items()}} for i in range(n)]
    return {"step": step, "per_chain": chains}


def test_step_to_step_noise_ignores_a_steady_trend():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.1, 400)
    flat = compare.step_to_step_noise(noise)
    trending = compare.step_to_step_noise(noise + np.linspace(0, 5, 400))  # +5 over the run
    assert flat == pytest.approx(0.1, rel=0.1)
    assert trending == pytest.approx(flat, rel=0.02)
    with pytest.raises(ValueError, match="at least 3 steps"):
        compare.step_to_step_noise([1.0, float("nan"), 2.0])


def test_compare_reports_change_stderr_and_noise_per_reward():
    before = _report(0, {"format": [0, 0, 0, 1], "total": [1.0, 2.0, 1.0, 2.0]})
    after = _report(30, {"format": [1, 1, 1, 1], "total": [2.5, 2.5, 2.5, 2.6]})
    curves = {"reward/total/mean": [(i, v) for i, v in enumerate([1.0, 1.1, 1.0, 1.1, 1.0])]}
    changes = {c.reward: c for c in compare.compare(before, after, curves)}
    assert set(changes) == {"format", "total"}  # rewards absent from the reports are left out
    fmt, total = changes["format"], changes["total"]
    assert (fmt.before, fmt.after, fmt.delta) == (0.25, 1.0, 0.75)
    assert fmt.stderr == pytest.approx(0.25)  # sqrt(var([0, 0, 0, 1], ddof=1) / 4 + 0)
    assert fmt.step_noise is None and fmt.beyond_noise  # 0.75 > 2 x 0.25
    # total: differences of the curve are +-0.1 -> std(ddof=1) 0.1155 / sqrt 2 = 0.0816
    assert total.step_noise == pytest.approx(np.diff([1.0, 1.1, 1.0, 1.1, 1.0]).std(ddof=1) / math.sqrt(2))
    assert total.delta == pytest.approx(1.025) and total.beyond_noise  # > 2 x 0.29 and > 0.08
    small = compare.compare(before, _report(1, {"total": [1.5, 1.6, 1.5, 1.5]}), curves)[0]
    assert not small.beyond_noise  # +0.025, well inside 2 x std. error


def test_compare_lists_each_sections_format_after_the_chains():
    parts = {"total": [1.0, 2.0], "format/final_understand": [0.0, 1.0], "format": [0.0, 1.0]}
    curves = {"reward/format/final_understand/mean": [(i, v) for i, v in enumerate([0.5, 0.7, 0.6])]}
    changes = compare.compare(_report(0, parts), _report(1, parts), curves)
    assert [c.reward for c in changes] == ["format", "format/final_understand", "total"]
    assert changes[1].step_noise == pytest.approx(np.diff([0.5, 0.7, 0.6]).std(ddof=1) / math.sqrt(2))


def test_cli_writes_the_table_and_names_a_bad_report(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_report(0, {"total": [1.0, 1.2]})))
    b.write_text(json.dumps(_report(5, {"total": [1.5, 1.7]})))
    assert compare.main([str(a), str(b), "--out", str(tmp_path / "t.md")]) == 0
    table = (tmp_path / "t.md").read_text()
    assert "| total | 1.1000 | 1.6000 | +0.5000 |" in table and "after (step 5)" in table
    with pytest.raises(SystemExit, match="cannot read eval report .*missing.json"):
        compare.main([str(a), str(tmp_path / "missing.json")])


def _crop_report(step, crops, shift, spi=2, data="skimage eval 4"):
    """``crops`` crops whose generation and PSNR spread widely between crops; the model adds ``shift`` to each."""
    chains = []
    for k in range(crops):
        for i in range(spi):
            g = 0.1 * k + 0.001 * i + shift
            chains.append({"image_id": f"photo{k % 2}", "prompt_id": k, "sample_index": i,
                           "rewards": {"generation": g}, "model": {"PSNR": 20.0 + 3 * k - 10 * shift, "NIQE": None}})
    return {"step": step, "data": data, "per_chain": chains}


def test_the_same_crops_are_compared_paired_which_resolves_a_shift_the_crops_spread_hides():
    before, after = _crop_report(0, 8, 0.0), _crop_report(20, 8, 0.01)
    gen, psnr = compare.compare(before, after)  # NIQE failed everywhere: left out
    assert gen.paired and (gen.n_before, gen.n_after) == (8, 8)
    assert gen.delta == pytest.approx(0.01) and gen.stderr == pytest.approx(0.0, abs=1e-9) and gen.beyond_noise
    assert psnr.reward == "PSNR" and psnr.delta == pytest.approx(-0.1)
    for c in before["per_chain"] + after["per_chain"]:  # the same values, crops not named: unpaired
        del c["prompt_id"]
    gen = compare.compare(before, after)[0]
    assert not gen.paired and gen.n_after == 16 and not gen.beyond_noise  # 0.01 inside the crops' spread
    other = compare.compare(_crop_report(0, 8, 0.0), _crop_report(20, 8, 0.01, data="skimage train 4"))[0]
    assert not other.paired  # other crops: no pairing
    table = compare.markdown(compare.compare(_crop_report(0, 8, 0.0), _crop_report(20, 8, 0.01)), "a", "b")
    assert "paired by crop, 8 crops" in table and "| generation | 0.3505 | 0.3605 | +0.0100 |" in table
    assert "| PSNR | 30.50 | 30.40 | -0.10 |" in table


# ------------------------------------------------------------------ clustered by photo (core.stats)
def test_paired_clustered_se_matches_a_hand_computation():
    # 3 photos with 2, 2, 1 crops, labels interleaved (grouping is by label, not by position):
    #   A: 0.1, 0.3   B: -0.2, 0.0   C: 0.5          n = 5, mean = 0.7 / 5 = 0.14
    #   deviations A: -0.04, +0.16  B: -0.34, -0.14  C: +0.36
    #   S_A = 0.12, S_B = -0.48, S_C = 0.36 -> sum S_g^2 = 0.0144 + 0.2304 + 0.1296 = 0.3744
    #   clustered = sqrt(3 / 2 * 0.3744) / 5 = sqrt(0.5616) / 5
    #   paired: sum dev^2 = 0.0016 + 0.0256 + 0.1156 + 0.0196 + 0.1296 = 0.292, var = 0.292 / 4 = 0.073,
    #           se = sqrt(0.073 / 5) = sqrt(0.0146)
    got = paired_clustered_se([0.1, -0.2, 0.3, 0.5, 0.0], ["A", "B", "A", "C", "B"])
    assert (got.n_crops, got.n_clusters) == (5, 3)
    assert got.mean == pytest.approx(0.14, abs=1e-12)
    assert got.se_clustered == pytest.approx(math.sqrt(0.5616) / 5, abs=1e-12)
    assert got.se_paired == pytest.approx(math.sqrt(0.0146), abs=1e-12)
    # one crop per photo: CR1 reduces to the plain s.e. (G / (G - 1) * sum dev^2 / n^2 = var / n)
    alone = paired_clustered_se([0.1, -0.2, 0.3, 0.5, 0.0], range(5))
    assert alone.se_clustered == pytest.approx(math.sqrt(0.0146), abs=1e-12) and alone.n_clusters == 5


def test_clustering_matters_when_crops_of_one_photo_move_together():
    # 4 photos x 3 crops, the same difference for every crop of a photo: mean 0.2, deviations -0.1, 0.1, -0.3, 0.3
    # clustered: S_g = 3 x deviation -> sum S^2 = 9 x 0.2 = 1.8 -> sqrt(4 / 3 * 1.8) / 12 = sqrt(2.4) / 12 = 0.129
    # paired (12 "independent" crops): sum dev^2 = 3 x 0.2 = 0.6 -> sqrt(0.6 / 11 / 12) = 0.067
    effects = {"p0": 0.1, "p1": 0.3, "p2": -0.1, "p3": 0.5}
    photos = [p for p in effects for _ in range(3)]
    got = paired_clustered_se([effects[p] for p in photos], photos)
    assert got.se_clustered == pytest.approx(math.sqrt(2.4) / 12, abs=1e-12)
    assert got.se_paired == pytest.approx(math.sqrt(0.6 / 11 / 12), abs=1e-12)
    assert got.se_clustered > 1.5 * got.se_paired


def test_one_photo_leaves_the_clustered_se_undefined_and_bad_input_is_refused():
    got = paired_clustered_se([0.1, 0.2, 0.4], ["only"] * 3)
    assert math.isnan(got.se_clustered) and got.n_clusters == 1
    assert got.se_paired == pytest.approx(np.std([0.1, 0.2, 0.4], ddof=1) / math.sqrt(3))
    with pytest.raises(ValueError, match="cluster labels"):
        paired_clustered_se([0.1, 0.2], ["a"])
    with pytest.raises(ValueError, match="non-empty"):
        paired_clustered_se([], [])


# 4 photos x 3 crops x 2 chains. The model moves every crop of a photo by that photo's effect: the crops agree
# within a photo, so the crop-paired s.e. is small while the photos disagree (few, independent units).
PHOTO_EFFECTS = {"astronaut": 0.02, "coffee": 0.06, "chelsea": -0.01, "rocket": 0.05}


def _eval_json(step: int, after: bool, photo_ids: bool = True, photos: dict = PHOTO_EFFECTS) -> dict:
    """An eval.json in tools.eval's format (top-level summary, per-chain records), the crops cut in turn from
    the photos as PairDataset does when --num exceeds them (prompt_id = cursor, image_id = the photo)."""
    names, per_chain = list(photos), []
    for prompt_id in range(3 * len(names)):
        photo = names[prompt_id % len(names)]
        for k in range(2):
            g = 0.3 + 0.05 * prompt_id + 0.01 * k + (photos[photo] if after else 0.0)
            chain = {"image_id": photo, "prompt_id": prompt_id, "sample_index": k, "lr_size": [64, 64],
                     "notes": [], "rewards": {"generation": g, "total": 2 * g}, "reward_errors": {},
                     "model": {"PSNR": 24.0 + prompt_id}, "bicubic": {"PSNR": 23.0 + prompt_id}, "text": "..."}
            if not photo_ids:
                del chain["image_id"]
            per_chain.append(chain)
    return {"checkpoint": "runs/x/checkpoints", "export": "runs/x/export", "step": step, "engine": "hf",
            "data": {"source": "skimage", "mode": "synthetic", "split": "eval", "images": names, "skipped": {}},
            "num_images": 3 * len(names), "samples_per_image": 2, "num_chains": len(per_chain),
            "rewards": {}, "metrics": {}, "per_chain": per_chain}


def _hand_ses(effects: list[float]) -> tuple[float, float]:
    """(paired, clustered) s.e. of the mean difference when each photo's 3 crops all move by its effect."""
    diffs = np.repeat(effects, 3)
    dev = np.asarray(effects) - diffs.mean()
    g, n = len(effects), diffs.size
    return float(diffs.std(ddof=1) / math.sqrt(n)), math.sqrt(g / (g - 1) * np.sum((3 * dev) ** 2)) / n


def test_compare_end_to_end_shows_the_clustered_se_and_judges_by_it(tmp_path, capsys):
    a, b, out = tmp_path / "start.json", tmp_path / "end.json", tmp_path / "compare.md"
    a.write_text(json.dumps(_eval_json(0, after=False)))
    b.write_text(json.dumps(_eval_json(40, after=True)))
    assert compare.main([str(a), str(b), "--out", str(out)]) == 0
    table = out.read_text()
    assert table == capsys.readouterr().out
    paired_se, clustered_se = _hand_ses(list(PHOTO_EFFECTS.values()))
    delta = float(np.mean(list(PHOTO_EFFECTS.values())))  # 0.03
    assert 2 * paired_se < delta < 2 * clustered_se  # paired alone would call it real; clustered does not
    gen = next(c for c in compare.compare(json.loads(a.read_text()), json.loads(b.read_text()))
               if c.reward == "generation")
    assert gen.paired and gen.n_photos == 4 and gen.delta == pytest.approx(delta)
    assert gen.stderr == pytest.approx(paired_se) and gen.se_clustered == pytest.approx(clustered_se)
    assert not gen.beyond_noise
    assert "2 x std. error (paired by crop, 12 crops)" in table and "clustered by photo, 4 photos" in table
    row = next(line for line in table.splitlines() if line.startswith("| generation |"))
    assert row.split(" | ")[4:7] == [f"{2 * paired_se:.4f}", f"{2 * clustered_se:.4f}", "-"]
    assert row.endswith("| no |")
    psnr = next(line for line in table.splitlines() if line.startswith("| PSNR |"))
    assert psnr.endswith("| no |") and "n/a" not in psnr  # no change at all: both s.e. 0


def test_a_report_without_photo_ids_still_compares_with_the_clustered_se_unavailable():
    before, after = _eval_json(0, after=False, photo_ids=False), _eval_json(40, after=True, photo_ids=False)
    gen = next(c for c in compare.compare(before, after) if c.reward == "generation")
    paired_se, _ = _hand_ses(list(PHOTO_EFFECTS.values()))
    assert gen.paired and gen.se_clustered is None and gen.n_photos is None
    assert gen.stderr == pytest.approx(paired_se) and gen.beyond_noise  # judged by the paired s.e.: 0.03 > 0.0165
    row = next(line for line in compare.markdown(compare.compare(before, after), "a", "b").splitlines()
               if line.startswith("| generation |"))
    assert "n/a (no photo ids)" in row and row.endswith("| yes |")
    one = {"rocket": 0.0}  # every crop from one photo: clustered undefined, shown so, never 0
    shifted = _eval_json(1, after=True, photos={"rocket": 0.03})
    gen = next(c for c in compare.compare(_eval_json(0, after=False, photos=one), shifted)
               if c.reward == "generation")
    assert gen.n_photos == 1 and math.isnan(gen.se_clustered) and gen.delta == pytest.approx(0.03)
    assert gen.verdict_stderr == gen.stderr  # the verdict falls back on the paired s.e.
    assert "n/a (1 photo)" in compare.markdown([gen], "a", "b")


def test_crops_for_power_matches_a_hand_computation():
    # sd 0.03 per crop, effect 0.006, beyond 2 s.e. with 80% power: z_0.8 = 0.841621; (2.841621 * 5)^2 = 201.87
    assert crops_for_power(0.03, 0.006) == 202
    assert crops_for_power(0.03, -0.006) == 202  # a fall is as hard to see as a rise
    assert crops_for_power(0.03, 0.006, design_effect=2.5) == math.ceil(2.5 * 201.8703)  # clustering costs crops
    assert crops_for_power(0.03, 0.012) == math.ceil(201.8703 / 4)
    with pytest.raises(ValueError, match="sd > 0"):
        crops_for_power(0.0, 0.006)


def test_compare_prints_the_crops_a_confirmatory_evaluation_needs(tmp_path, capsys):
    a, b = tmp_path / "start.json", tmp_path / "end.json"
    a.write_text(json.dumps(_eval_json(0, after=False)))
    b.write_text(json.dumps(_eval_json(40, after=True)))
    assert compare.main([str(a), str(b), "--effect", "0.01"]) == 0
    out = capsys.readouterr().out
    paired_se, clustered_se = _hand_ses(list(PHOTO_EFFECTS.values()))
    sd, deff = paired_se * math.sqrt(12), (clustered_se / paired_se) ** 2  # the pilot: 12 crops, 4 photos
    expected = math.ceil(deff * ((2 + NormalDist().inv_cdf(0.8)) * sd / 0.01) ** 2)
    assert f"- generation: {expected}" in out and "crops needed to see a change of 0.01" in out
    assert "- PSNR:" not in out  # no spread in the pilot: nothing to extrapolate from


# ------------------------------------------------------------------ several seeds pooled; the panel paired by crop
def test_pooled_seeds_compare_each_crops_mean_over_the_seeds_with_a_hand_computation(tmp_path, capsys):
    """Three 'seeds' of the same 8 crops: pooled, each crop's after-value is the mean of its three chains, so the
    paired change and its s.e. are those of the crops' seed-averaged differences (computed by hand here)."""
    before = _crop_report(0, 8, 0.0, spi=1)
    seeds = [_crop_report(16, 8, shift, spi=1) for shift in (0.01, 0.02, 0.06)]
    for k, r in enumerate(seeds):  # a crop-specific wobble per seed, so the pooled s.e. is not 0
        for c in r["per_chain"]:
            c["rewards"]["generation"] += 0.005 * ((c["prompt_id"] * (k + 1)) % 3 - 1)
    gen = next(c for c in compare.compare(before, compare.pool(seeds)) if c.reward == "generation")
    per_crop = np.array([[r["per_chain"][i]["rewards"]["generation"] - before["per_chain"][i]["rewards"]["generation"]
                          for r in seeds] for i in range(8)]).mean(axis=1)
    assert gen.paired and gen.n_after == 8 and gen.delta == pytest.approx(per_crop.mean())
    assert gen.stderr == pytest.approx(per_crop.std(ddof=1) / math.sqrt(8))
    paths = []
    for k, r in enumerate([before, *seeds]):
        paths.append(tmp_path / f"r{k}.json")
        paths[-1].write_text(json.dumps(r))
    assert compare.main([str(paths[0]), ",".join(str(p) for p in paths[1:])]) == 0
    assert f"| generation | {gen.before:.4f} | {gen.after:.4f} | {gen.delta:+.4f} |" in capsys.readouterr().out
    other = _crop_report(16, 8, 0.0, spi=1, data="skimage train 4")
    with pytest.raises(ValueError, match="same crops"):
        compare.pool([seeds[0], other])
    with pytest.raises(SystemExit, match="same crops"):
        other_path = tmp_path / "other.json"
        other_path.write_text(json.dumps(other))
        compare.main([str(paths[0]), f"{paths[1]},{other_path}"])


def test_the_held_out_panel_per_chain_is_compared_paired_by_crop():
    before, after = _crop_report(0, 8, 0.0), _crop_report(20, 8, 0.01)
    for r, shift in ((before, 0.0), (after, -0.25)):
        for c in r["per_chain"]:
            c["panel"] = {"psnry": 25.0 + c["prompt_id"] + shift, "gmsd": 0.2}
    rows = {c.reward: c for c in compare.compare(before, after)}
    assert list(rows)[-2:] == ["psnry", "gmsd"]  # after the model's metrics, in the report's order
    assert rows["psnry"].paired and rows["psnry"].delta == pytest.approx(-0.25)
    assert rows["psnry"].stderr == pytest.approx(0.0, abs=1e-9) and rows["gmsd"].delta == pytest.approx(0.0)
