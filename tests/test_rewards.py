"""The pure rewards: format, degradation, understanding, and their combination (no pyiqa, no Ray)."""

import doctest
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from reward_fixtures import LEVELS, make_sample

import rewards.degradation
import rewards.format
import rewards.quality
import rewards.total
import rewards.understanding
from core.chain import DEGRADATION_ITEMS, IMAGE_PLACEHOLDER, TAGS, TEXT_TAGS, parse_chain, render_chain
from core.config import QualityMetricConfig, RewardConfig, RewardWeights
from core.records import DegradationLabels, Rollout
from rewards.degradation import degradation_item_rewards, degradation_reward
from rewards.format import format_reward, section_format_rewards
from rewards.quality import QualityScore, QualityScorer
from rewards.total import score_chain, score_rollouts
from rewards.understanding import tag_recall, understanding_reward

UNDERSTAND = {"rough": "a cat on a sofa", "middle": "a grey cat on a sofa", "final": "fur, whiskers"}
DEG = "medium blur, light downsample, heavy noise, light compression, no upsample"
GOOD = render_chain(DEG, UNDERSTAND, separator="\n")
def make_rollout(prompt_id=0, sample_index=0, text=GOOD, final=None) -> Rollout:
    return Rollout.for_scoring(prompt_id, sample_index, text, None if final is None else {"final": final})


@pytest.mark.parametrize(
    "module", [rewards.format, rewards.degradation, rewards.understanding, rewards.quality]
)
def test_doctests(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_reward_modules_import_without_ray_or_pyiqa():
    code = (
        "import sys, rewards.format, rewards.degradation, rewards.understanding\n"
        "import rewards.quality, rewards.total\n"
        "print('ray' in sys.modules, 'pyiqa' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False"]


# ------------------------------------------------------------------------------------------------ format
@pytest.mark.parametrize("text", [GOOD, render_chain(DEG, UNDERSTAND), "\n  " + GOOD + "\n\n"])
def test_format_accepts_the_grammar(text):
    assert format_reward(text) == 1.0
    assert format_reward(parse_chain(text)) == 1.0


def _drop(text, tag):
    start, end = text.index(f"<{tag}>"), text.index(f"</{tag}>") + len(f"</{tag}>")
    return text[:start] + text[end:]


MALFORMED = {
    "missing tag": _drop(GOOD, "middle_understand"),
    "missing image tag": _drop(GOOD, "final_image"),
    "duplicated tag": GOOD + "\n<final_understand>again</final_understand>",
    "wrong order": GOOD.replace("<degradation>", "<x>", 1).replace(  # move degradation to the end
        f"<x>{DEG}</degradation>", ""
    )
    + f"<degradation>{DEG}</degradation>",
    "two images in one tag": GOOD.replace(IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER * 2, 1),
    "no image in an image tag": GOOD.replace(IMAGE_PLACEHOLDER, "", 1),
    "text beside the image": GOOD.replace(IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER + " here", 1),
    "image in understanding text": GOOD.replace("a cat on a sofa", "a cat " + IMAGE_PLACEHOLDER),
    "text before": "Sure, here it is: " + GOOD,
    "text after": GOOD + " Done.",
    "text between sections": GOOD.replace("\n", "\nand then\n", 1),
    "tag written inside a section": GOOD.replace("a cat on a sofa", "a cat <final_image>"),
    "nested section": GOOD.replace("a cat on a sofa", "a cat <degradation>x</degradation>"),
    "unclosed tag": GOOD.replace("</middle_understand>", ""),
    "empty": "",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_format_rejects_malformed_chains(name):
    assert format_reward(MALFORMED[name]) == 0.0


@pytest.mark.parametrize("value", [None, 3, b"<degradation>", ["<degradation>"], {"text": GOOD}])
def test_format_of_non_text_is_zero(value):
    assert format_reward(value) == 0.0


ALL_SECTIONS_OK = dict.fromkeys(TEXT_TAGS, 1.0)


def _sections_ok_except(*bad: str) -> dict[str, float]:
    return {tag: 0.0 if tag in bad else 1.0 for tag in TEXT_TAGS}


@pytest.mark.parametrize("text", [GOOD, render_chain(DEG, UNDERSTAND), "\n  " + GOOD + "\n\n"])
def test_section_format_of_a_well_formed_chain_is_one_everywhere(text):
    assert section_format_rewards(text) == ALL_SECTIONS_OK


SECTION_FAULTS = {  # the fault, and the only section the learner would credit it to
    "stray closing tag": (GOOD.replace("a grey cat", "a grey</final_understand> cat"), ("middle_understand",)),
    "unclosed section": (GOOD.replace("</final_understand>", ""), ("final_understand",)),
    "rambling after the closing tag": (GOOD.replace("</rough_understand>", "</rough_understand> and so on"),
                                       ("rough_understand",)),
    "section written twice": (GOOD.replace("<middle_understand>", "<final_understand>x</final_understand>"
                                           "<middle_understand>"), ("final_understand",)),
    "missing section": (MALFORMED["missing tag"], ("middle_understand",)),
    "image in the text": (MALFORMED["image in understanding text"], ("rough_understand",)),
    "stray opening tag": (GOOD.replace("fur, whiskers", "fur <degradation>, whiskers"),
                          ("degradation", "final_understand")),  # a second <degradation>; final unclosed
}


@pytest.mark.parametrize("name", sorted(SECTION_FAULTS))
def test_section_format_blames_only_the_section_the_fault_is_in(name):
    text, bad = SECTION_FAULTS[name]
    assert format_reward(text) == 0.0
    assert section_format_rewards(text) == _sections_ok_except(*bad)


def test_section_format_leaves_text_before_any_tag_to_the_chain_format():
    """Tokens before the first opening tag belong to no section (core.grpo.token_sections column 0)."""
    assert section_format_rewards(MALFORMED["text before"]) == ALL_SECTIONS_OK
    assert format_reward(MALFORMED["text before"]) == 0.0


@pytest.mark.parametrize("value", [None, 3, b"<degradation>"])
def test_section_format_of_non_text_is_zero(value):
    assert section_format_rewards(value) == dict.fromkeys(TEXT_TAGS, 0.0)


def test_wrong_order_case_really_is_only_reordered():
    parsed = parse_chain(MALFORMED["wrong order"])
    assert sorted(parsed.order) == sorted(TAGS) and parsed.order != list(TAGS)


# ------------------------------------------------------------------------------------------- degradation
PAPER_PREDICTED = "medium blur, light downsample, heavy noise, light compression, no upsample"
PAPER_TRUTH = {
    "blur": "light",
    "downsample": "light",
    "noise": "medium",
    "compression": "light",
    "upsample": "none",
}


def test_degradation_paper_example_is_0_6():
    chain = render_chain(PAPER_PREDICTED, UNDERSTAND)
    assert degradation_reward(chain, DegradationLabels(levels=PAPER_TRUTH, params={})) == pytest.approx(0.6)


def test_degradation_all_right_all_wrong_and_partial():
    assert degradation_reward(GOOD, LEVELS) == 1.0
    wrong = render_chain("light blur, heavy downsample, light noise, heavy compression, light upsample", {})
    assert degradation_reward(wrong, LEVELS) == 0.0
    two_stated = render_chain("medium blur and heavy noise", {})
    assert degradation_reward(two_stated, LEVELS) == pytest.approx(0.4)


def test_degradation_unstated_none_item_is_wrong():
    # "upsample" is truly none; saying nothing about it earns nothing
    chain = render_chain("medium blur, light downsample, heavy noise, light compression", {})
    assert degradation_reward(chain, LEVELS) == pytest.approx(0.8)
    assert degradation_reward(render_chain("", {}), LEVELS) == 0.0


def test_degradation_items_are_the_rewards_verdicts_one_by_one():
    truth = DegradationLabels(levels=PAPER_TRUTH, params={})
    for text in (PAPER_PREDICTED, "medium blur and heavy noise", "", "heavy noise, light noise"):
        items = degradation_item_rewards(render_chain(text, {}), truth)
        assert set(items) == {"blur", "downsample", "noise", "compression", "upsample"}
        assert sum(items.values()) / 5 == pytest.approx(degradation_reward(render_chain(text, {}), truth))
    assert degradation_item_rewards(GOOD, None) is None


def test_degradation_not_applicable_without_labels():
    assert degradation_reward(GOOD, None) is None


@pytest.mark.parametrize("value", [None, 7, b"x"])
def test_degradation_never_raises_on_bad_chains(value):
    assert degradation_reward(value, LEVELS) == 0.0


# ----------------------------------------------------------------------------------------- understanding
PAPER_TEXT = "This image shows the group of lions lying on a large rock, surrounded by open sky."


def test_understanding_paper_example_is_0_75():
    chain = render_chain(DEG, {"rough": PAPER_TEXT})
    assert understanding_reward(chain, ["Lions", "Rock", "Sky", "Clouds"]) == pytest.approx(0.75)


@pytest.mark.parametrize(
    "tag, text",
    [
        ("lion", "two lions"),
        ("lions", "a lion"),
        ("fox", "three foxes"),
        ("foxes", "a fox"),
        ("berry", "some berries"),
        ("berries", "one berry"),
        ("Sea Lion", "a SEA-LION basking"),
        ("sea lions", "two sea lion pups"),
        ("leaf", "autumn leaves"),
        ("glass", "a glass of water"),
    ],
)
def test_understanding_matches_plurals_case_and_multiword(tag, text):
    assert tag_recall(text, [tag]) == 1.0


@pytest.mark.parametrize(
    "tag, text",
    [
        ("cat", "a category of things"),
        ("rock", "rocket launch"),
        ("sea lion", "a lion by the sea"),
        ("sky", "skyline"),
        ("sea lion", "sea and lion"),
    ],
)
def test_understanding_needs_whole_words_in_order(tag, text):
    assert tag_recall(text, [tag]) == 0.0


def test_understanding_not_applicable_without_tags():
    assert understanding_reward(GOOD, []) is None
    assert understanding_reward(GOOD, ("", " ,")) is None
    assert understanding_reward(GOOD, None) is None


def test_understanding_duplicate_tags_count_once():
    assert tag_recall("a lion", ["lion", "Lions", "rock"]) == 0.5


def test_understanding_reads_only_the_configured_stages():
    chain = render_chain(DEG, {"rough": "a cat", "middle": "a sofa", "final": "a cat on a sofa"})
    assert understanding_reward(chain, ["cat", "sofa"]) == 0.5
    assert understanding_reward(chain, ["cat", "sofa"], stages=["final"]) == 1.0
    # several stages: the mean of the per-stage recalls
    assert understanding_reward(chain, ["cat", "sofa"], stages=["rough", "middle", "final"]) == pytest.approx(
        2 / 3
    )


def test_understanding_of_malformed_or_non_text_chain():
    assert understanding_reward(None, ["cat"]) == 0.0
    assert understanding_reward("a cat without tags", ["cat"]) == 0.0  # no <rough_understand> section


# ------------------------------------------------------------------------------------------------- total
def test_total_is_the_weighted_sum_of_all_parts():
    cfg = RewardConfig(
        weights=RewardWeights(format=1.0, degradation=2.0, understanding=0.5, generation=3.0),
        metrics=[QualityMetricConfig(name="a", weight=1.0), QualityMetricConfig(name="b", weight=3.0)],
    )
    chain = render_chain(PAPER_PREDICTED, {"rough": "a cat"})
    sample = make_sample(tags=("cat", "sofa"), levels=PAPER_TRUTH)
    q = QualityScore(values={"a": 0.2, "b": 0.6}, raw={"a": 20.0, "b": 0.6})
    s = score_chain(chain, sample, q, cfg, sample_index=3)
    assert (s.prompt_id, s.sample_index) == (0, 3)
    assert s.parts == pytest.approx(
        {
            "format": 1.0,
            "degradation": 0.6,
            "understanding": 0.5,
            "generation": 0.5,
            "quality/a": 0.2,
            "quality/b": 0.6,
            **{f"format/{tag}": 1.0 for tag in TEXT_TAGS},  # details: not in the total
            # each degradation item's verdict (item credit): blur and noise wrong, as in the paper's figure
            **{"degradation/blur": 0.0, "degradation/downsample": 1.0, "degradation/noise": 0.0,
               "degradation/compression": 1.0, "degradation/upsample": 1.0},
        }
    )
    assert s.total == pytest.approx(1.0 + 2 * 0.6 + 0.5 * 0.5 + 3 * 0.5)
    assert s.errors == {}


def test_total_leaves_out_parts_that_do_not_apply():
    cfg = RewardConfig()  # no metrics: generation does not apply
    s = score_chain(GOOD, make_sample(tags=(), levels=None), None, cfg)
    assert s.parts == {"format": 1.0, **{f"format/{tag}": 1.0 for tag in TEXT_TAGS}} and s.total == 1.0


def test_total_keeps_metric_errors_and_applies_the_failed_metric_rule():
    metrics = [QualityMetricConfig(name="a", weight=1.0), QualityMetricConfig(name="b", weight=1.0)]
    q = QualityScore(values={"a": 0.8}, errors={"b": "TimeoutError: slow"})
    for rule, generation in (("renormalize", 0.8), ("zero", 0.4)):
        s = score_chain(GOOD, make_sample(), q, RewardConfig(metrics=metrics, failed_metric=rule))
        assert s.parts["generation"] == pytest.approx(generation)
        assert s.errors == {"b": "TimeoutError: slow"} and "quality/b" not in s.parts


def test_total_without_final_image_scores_generation_zero():
    cfg = RewardConfig(metrics=[QualityMetricConfig(name="a")])
    s = score_chain(GOOD, make_sample(), None, cfg)
    assert s.parts["generation"] == 0.0 and "generation" in s.errors
    assert s.total == pytest.approx(3.0)  # format + degradation + understanding


def test_total_of_garbage_text_is_zero_not_an_error():
    s = score_chain(None, make_sample(), None, RewardConfig())
    assert s.parts == {"format": 0.0, "degradation": 0.0, "understanding": 0.0,
                       **{f"format/{tag}": 0.0 for tag in TEXT_TAGS},
                       **{f"degradation/{item}": 0.0 for item in DEGRADATION_ITEMS}} and s.total == 0.0


def _brightness_scorer() -> tuple[RewardConfig, QualityScorer, list[int]]:
    """A reward config whose one metric is the mean brightness, its scorer, and the batch sizes it was called with."""
    calls: list[int] = []

    def brightness(x):  # (N, 3, H, W) in [0, 1] -> (N,)
        calls.append(x.shape[0])
        return x.mean(dim=(1, 2, 3))

    cfg = RewardConfig(metrics=[QualityMetricConfig(name="bright")])
    return cfg, QualityScorer([(cfg.metrics[0], brightness)]), calls


def _grey(v: int) -> np.ndarray:
    return np.full((8, 8, 3), v, np.uint8)


def test_score_rollouts_batches_final_images_through_the_scorer():
    cfg, scorer, calls = _brightness_scorer()
    img = _grey
    rollouts = [
        make_rollout(0, 0, final=img(255)),
        make_rollout(0, 1, final=None),
        make_rollout(1, 0, final=img(51)),
    ]
    samples = [make_sample(0), make_sample(0), make_sample(1)]
    scores = score_rollouts(rollouts, samples, cfg, scorer)
    assert calls == [2]  # one batch of the two final images
    assert [(s.prompt_id, s.sample_index) for s in scores] == [(0, 0), (0, 1), (1, 0)]
    assert [s.parts["generation"] for s in scores] == pytest.approx([1.0, 0.0, 0.2])
    with pytest.raises(ValueError, match="prompt 1"):
        score_rollouts(rollouts, [make_sample(0)] * 3, cfg, scorer)
    with pytest.raises(ValueError, match="no QualityScorer"):
        score_rollouts(rollouts, samples, cfg, None)


def test_stage_metrics_score_each_branchs_rough_and_middle_images_against_the_hr_at_their_size():
    def closeness(x, ref):  # full-reference: 1 - mean absolute difference, (N, 3, H, W) in [0, 1] -> (N,)
        assert x.shape == ref.shape  # the HR was brought to the stage image's size
        return 1 - (x - ref).abs().mean(dim=(1, 2, 3))

    cfg, scorer, _ = _brightness_scorer()
    cfg.stage_metrics = [QualityMetricConfig(name="close")]
    stage_scorer = QualityScorer([], [(cfg.stage_metrics[0], closeness)])
    hr = np.full((8, 8, 3), 200, np.uint8)
    grey = lambda v, n: np.full((n, n, 3), v, np.uint8)  # noqa: E731
    r = Rollout.for_scoring(0, 0, GOOD, {"rough": grey(200, 2), "middle": grey(100, 4), "final": grey(255, 8)})
    r.branch_images = ({"rough": grey(0, 2), "middle": grey(200, 4), "final": grey(51, 8)},)
    scores = score_rollouts([r], [make_sample(0, hr=hr)], cfg, scorer, stage_scorer)[0]
    expected = [{"rough": 1.0, "middle": 1 - 100 / 255}, {"rough": 1 - 200 / 255, "middle": 1.0}]
    for branch, want in zip(scores.branches, expected):
        assert {s: branch[f"generation/{s}"] for s in want} == pytest.approx(want)
    assert scores.parts["generation/rough"] == pytest.approx((1 + 1 - 200 / 255) / 2)  # the branches' mean
    plain = score_rollouts([r], [make_sample(0, hr=hr)], replace(cfg, stage_metrics=[]), scorer)[0]
    assert scores.total == pytest.approx(plain.total)  # a process reward is a detail, never a term of the total
    no_hr = score_rollouts([r], [make_sample(0)], cfg, scorer, stage_scorer)[0]
    assert not any(k.startswith("generation/") for k in no_hr.parts)  # real LR: nothing to compare a stage with
    with pytest.raises(ValueError, match="reward.stage_metrics are configured but no stage QualityScorer"):
        score_rollouts([r], [make_sample(0, hr=hr)], cfg, scorer)


def test_score_rollouts_scores_every_image_branch_and_averages_them():
    cfg, scorer, calls = _brightness_scorer()
    img = _grey
    two = make_rollout(0, 0, final=img(255))
    two.branch_images = ({"final": img(51)},)  # a second image of the same chain: its texts, other noise
    one = make_rollout(0, 1, final=None)
    one.branch_images = ({"final": img(102)},)  # branch 0 failed, branch 1 did not
    scores = score_rollouts([two, one], [make_sample(0), make_sample(0)], cfg, scorer)
    assert calls == [3]  # every final image of every chain in one metric pass
    assert [b["generation"] for b in scores[0].branches] == pytest.approx([1.0, 0.2])
    assert scores[0].parts["generation"] == pytest.approx(0.6)  # the chain's: the mean over its branches
    assert scores[0].parts["quality/bright"] == pytest.approx(0.6)
    assert scores[0].total == pytest.approx(scores[0].parts["format"] + 0.6 + sum(
        scores[0].parts[k] for k in ("degradation", "understanding")))
    assert [b["generation"] for b in scores[1].branches] == pytest.approx([0.0, 0.4])
    assert scores[1].parts["generation"] == pytest.approx(0.2)
    assert "generation" in scores[1].errors and "quality/bright" not in scores[1].parts  # not every branch has it
    single = score_rollouts([make_rollout(0, 0, final=img(255))], [make_sample(0)], cfg, scorer)[0]
    assert single.branches == ()  # one image per chain: nothing more is kept
