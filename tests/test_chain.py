"""The VLCoT chain module: tag order, stage sizes, render/parse round trip, malformed text never raises."""

import doctest
import random

import pytest

import core.chain as chain
from core.chain import (
    DEGRADATION_ITEMS,
    IMAGE_PLACEHOLDER,
    TAGS,
    TURNS,
    degradation_text,
    image_section,
    parse_chain,
    parse_degradation_text,
    render_chain,
    render_turn,
    stage_sizes,
)

UNDERSTAND = {"rough": "a cat on a sofa", "middle": "a grey cat with green eyes", "final": "fur, whiskers, eyes"}
DEG = "medium blur, light downsample, heavy noise, light compression, no upsample"


def test_doctests():
    assert doctest.testmod(chain).failed == 0


def test_tag_order_matches_the_paper():
    assert TAGS == (
        "degradation", "rough_understand", "rough_image", "middle_understand",
        "middle_image", "final_understand", "final_image",
    )


def test_stage_sizes_follow_scales():
    assert stage_sizes((16, 16), {"rough": 1, "middle": 2, "final": 4}) == {
        "rough": (16, 16), "middle": (32, 32), "final": (64, 64)}
    assert stage_sizes((10, 20), {"rough": 2, "middle": 3, "final": 4})["middle"] == (30, 60)


@pytest.mark.parametrize("separator", ["", "\n", " "])
def test_render_parse_round_trip(separator):
    text = render_chain(DEG, UNDERSTAND, separator=separator)
    parsed = parse_chain(text)
    assert parsed.well_formed, parsed.problems
    assert parsed.order == list(TAGS)
    assert parsed.degradation == DEG
    for stage, body in UNDERSTAND.items():
        assert parsed.understanding(stage) == body
    assert parsed.image_counts == {"rough_image": 1, "middle_image": 1, "final_image": 1}


def test_turns_concatenate_to_the_chain():
    text = ""
    for turn in TURNS:
        written = render_turn(turn, DEG, UNDERSTAND)
        assert written.endswith(turn.stop)
        text += written + image_section(turn.stage)
    assert text == render_chain(DEG, UNDERSTAND)


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (lambda t: t.replace("<degradation>", "", 1), "degradation"),
        (lambda t: t + "<final_image><|image|></final_image>", "appears 2 times"),
        (lambda t: "hello " + t, "outside"),
        (lambda t: t.replace("<rough_image><|image|>", "<rough_image><|image|><|image|>"), "2 images"),
        (lambda t: t.replace("<middle_image><|image|>", "<middle_image>"), "0 images"),
        (lambda t: t.replace("</final_understand>", ""), "final_understand"),
        (lambda t: t.replace(f"<degradation>{DEG}</degradation>", "") + f"<degradation>{DEG}</degradation>", "order"),
        (lambda t: t.replace("a cat on a sofa", "a cat " + IMAGE_PLACEHOLDER), "holds an image"),
        (lambda t: t.replace("a cat on a sofa", "a cat <final_image>"), "holds other tags"),
    ],
)
def test_malformed_chains_report_problems(mutate, problem):
    parsed = parse_chain(mutate(render_chain(DEG, UNDERSTAND)))
    assert not parsed.well_formed
    assert any(problem in p for p in parsed.problems), parsed.problems


def test_parser_never_raises_on_garbage():
    rng = random.Random(0)
    alphabet = list("<>/ abc_\n|") + [f"<{t}>" for t in TAGS] + [f"</{t}>" for t in TAGS] + [IMAGE_PLACEHOLDER]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        parsed = parse_chain(text)
        assert isinstance(parsed.problems, list)
    for bad in (None, 123, b"<degradation>", ""):
        parsed = parse_chain(bad)
        assert not parsed.well_formed
        assert parsed.degradation == ""


def test_degradation_text_round_trip():
    levels = {"blur": "heavy", "downsample": "medium", "noise": "none", "compression": "light", "upsample": "none"}
    assert parse_degradation_text(degradation_text(levels)) == levels
    assert parse_degradation_text("nothing here") == {}
    assert set(parse_degradation_text(DEG)) == set(DEGRADATION_ITEMS)

