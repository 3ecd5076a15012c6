"""tools.compare: held-out change against its standard error and the training curve's step-to-step noise."""

import json
import math

import numpy as np
import pytest

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
