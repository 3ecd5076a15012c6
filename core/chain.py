"""The VLCoT chain: its tags, their order, stage image sizes, the prompt, rendering and parsing.

A chain is seven tagged sections (RealSR-R1, Fig. 2):

    <degradation>..</degradation> <rough_understand>..</rough_understand> <rough_image>IMG</rough_image>
    <middle_understand>..</middle_understand> <middle_image>IMG</middle_image>
    <final_understand>..</final_understand> <final_image>IMG</final_image>

In text form every image is ``IMAGE_PLACEHOLDER``. A rollout is three text turns; each turn ends at the
closing tag of its understanding section, then the system inserts that stage's image section
(``image_section``) as a real image input and the policy continues. ``parse_chain`` never raises: it returns
what it found and a list of problems.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

TAGS: tuple[str, ...] = (
    "degradation",
    "rough_understand",
    "rough_image",
    "middle_understand",
    "middle_image",
    "final_understand",
    "final_image",
)
STAGES: tuple[str, ...] = ("rough", "middle", "final")
PROCESS_STAGES: tuple[str, ...] = STAGES[:-1]  # the stages whose images the chain builds on (stage credit)
IMAGE_TAGS: tuple[str, ...] = tuple(f"{s}_image" for s in STAGES)
UNDERSTAND_TAGS: tuple[str, ...] = tuple(f"{s}_understand" for s in STAGES)
TEXT_TAGS: tuple[str, ...] = ("degradation",) + UNDERSTAND_TAGS  # the sections the policy writes
IMAGE_PLACEHOLDER = "<|image|>"

# The five degradation items of the paper's <degradation> text, in its order, and the level words.
DEGRADATION_ITEMS: tuple[str, ...] = ("blur", "downsample", "noise", "compression", "upsample")
LEVELS: tuple[str, ...] = ("none", "light", "medium", "heavy")

_FORMAT_LINE = " ".join(f"<{t}> ... </{t}>" for t in TAGS)
DEFAULT_PROMPT = (
    "Perceive the degradation, understand the image content, and restore the high-quality image step by step "
    "(simulating the image restoration process from coarse to fine). The low-quality image is as follows: "
    f"{IMAGE_PLACEHOLDER}. The generation format should be as follows: {_FORMAT_LINE}"
)  # the paper's RL prompt (src/realsr-r1/grpo.py::make_conversation)


def open_tag(tag: str) -> str:
    return f"<{tag}>"


def close_tag(tag: str) -> str:
    return f"</{tag}>"


@dataclass(frozen=True)
class Turn:
    """One text turn of a rollout: the sections the policy writes, and where it stops."""

    stage: str  # the stage whose image follows this turn
    tags: tuple[str, ...]  # sections the policy should write in this turn
    stop: str  # generation stops after this string (included in the output)


TURNS: tuple[Turn, ...] = (
    Turn("rough", ("degradation", "rough_understand"), close_tag("rough_understand")),
    Turn("middle", ("middle_understand",), close_tag("middle_understand")),
    Turn("final", ("final_understand",), close_tag("final_understand")),
)


def image_section(stage: str, image_text: str = IMAGE_PLACEHOLDER) -> str:
    """The section the system inserts after a turn: ``<rough_image>IMG</rough_image>``."""
    tag = f"{stage}_image"
    return f"{open_tag(tag)}{image_text}{close_tag(tag)}"


def stage_scales(chain: Any) -> dict[str, int]:
    """Each stage's scale by stage name from a ``ChainConfig``, the form ``stage_sizes`` takes."""
    return {"rough": chain.rough_scale, "middle": chain.middle_scale, "final": chain.final_scale}


def stage_sizes(lr_hw: tuple[int, int], scales: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Pixel (height, width) of each stage image from the LR size and the per-stage scale.

    >>> stage_sizes((16, 24), {"rough": 1, "middle": 2, "final": 4})
    {'rough': (16, 24), 'middle': (32, 48), 'final': (64, 96)}
    """
    h, w = lr_hw
    return {s: (h * scales[s], w * scales[s]) for s in STAGES}


# ------------------------------------------------------------------------------------- degradation text
def degradation_text(levels: dict[str, str]) -> str:
    """The degradation sentence the policy should state, from the synthesis labels.

    >>> degradation_text({"blur": "medium", "downsample": "light", "noise": "heavy",
    ...                   "compression": "light", "upsample": "none"})
    'medium blur, light downsample, heavy noise, light compression, no upsample'
    """
    words = []
    for item in DEGRADATION_ITEMS:
        level = levels.get(item, "none")
        words.append(f"no {item}" if level == "none" else f"{level} {item}")
    return ", ".join(words)


_LEVEL_WORD = {"no": "none", "none": "none", "light": "light", "medium": "medium", "heavy": "heavy"}
_ITEM_RE = re.compile(r"\b(no|none|light|medium|heavy)\s+(" + "|".join(DEGRADATION_ITEMS) + r")\b", re.IGNORECASE)


def _first_statements(text: str) -> dict[str, re.Match]:
    """Item -> the match of its first statement ("heavy noise") in ``text``: the one rule of what a degradation
    sentence states, shared by the reward (``parse_degradation_text``) and the item credit (``item_statements``)."""
    first: dict[str, re.Match] = {}
    for m in _ITEM_RE.finditer(text or ""):
        first.setdefault(m.group(2).lower(), m)
    return first


def parse_degradation_text(text: str) -> dict[str, str]:
    """Item -> stated level, for the items the text states (the first statement of an item wins).

    >>> parse_degradation_text("Medium blur, light downsample, heavy noise and no upsample")
    {'blur': 'medium', 'downsample': 'light', 'noise': 'heavy', 'upsample': 'none'}
    """
    found = _first_statements(text)
    return {item: _LEVEL_WORD[found[item].group(1).lower()] for item in DEGRADATION_ITEMS if item in found}


def item_statements(text: str) -> dict[str, tuple[int, int]]:
    """Item -> the character span of its first statement in ``text`` (the one ``parse_degradation_text`` reads).

    >>> item_statements("medium blur, no noise, heavy blur")
    {'blur': (0, 11), 'noise': (13, 21)}
    """
    return {item: m.span() for item, m in _first_statements(text).items()}


# ------------------------------------------------------------------------------------- render / parse
def render_chain(
    degradation: str,
    understand: dict[str, str],
    image_text: str = IMAGE_PLACEHOLDER,
    separator: str = "",
) -> str:
    """A complete, well-formed chain (the SFT target, and the inverse of ``parse_chain``)."""
    parts = [f"{open_tag('degradation')}{degradation}{close_tag('degradation')}"]
    for stage in STAGES:
        tag = f"{stage}_understand"
        parts.append(f"{open_tag(tag)}{understand.get(stage, '')}{close_tag(tag)}")
        parts.append(image_section(stage, image_text))
    return separator.join(parts)


def render_turn(turn: Turn, degradation: str, understand: dict[str, str]) -> str:
    """The text the policy should write in one turn (SFT targets per turn)."""
    out = []
    for tag in turn.tags:
        body = degradation if tag == "degradation" else understand.get(tag.removesuffix("_understand"), "")
        out.append(f"{open_tag(tag)}{body}{close_tag(tag)}")
    return "".join(out)


@dataclass
class ParsedChain:
    """What ``parse_chain`` found. ``sections[tag]`` holds every body found for that tag, in order."""

    sections: dict[str, list[str]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # tags in the order their sections appear
    image_counts: dict[str, int] = field(default_factory=dict)  # image tag -> placeholders inside (first section)
    outside: str = ""  # text found outside any complete section (whitespace stripped)
    problems: list[str] = field(default_factory=list)

    def first(self, tag: str) -> str:
        """The body of the first section of ``tag``, or '' when there is none."""
        bodies = self.sections.get(tag)
        return bodies[0] if bodies else ""

    @property
    def degradation(self) -> str:
        return self.first("degradation")

    def understanding(self, stage: str) -> str:
        return self.first(f"{stage}_understand")

    @property
    def well_formed(self) -> bool:
        return not self.problems


_SECTION_RE = re.compile(r"<(" + "|".join(TAGS) + r")>(.*?)</\1>", re.DOTALL)
_ANY_TAG_RE = re.compile(r"</?(" + "|".join(TAGS) + r")>")


def parse_chain(text: str) -> ParsedChain:
    """Split generated text into sections and list everything that breaks the grammar. Never raises."""
    out = ParsedChain()
    if not isinstance(text, str):
        out.problems.append(f"chain is not text but {type(text).__name__}")
        return out
    outside_parts: list[str] = []
    cursor = 0
    for match in _SECTION_RE.finditer(text):
        outside_parts.append(text[cursor : match.start()])
        tag, body = match.group(1), match.group(2)
        out.sections.setdefault(tag, []).append(body.strip())
        out.order.append(tag)
        cursor = match.end()
    outside_parts.append(text[cursor:])
    outside = "".join(outside_parts)
    stray = _ANY_TAG_RE.findall(outside)
    out.outside = outside.strip()

    for tag in TAGS:
        n = len(out.sections.get(tag, []))
        if n == 0:
            out.problems.append(f"missing <{tag}> section")
        elif n > 1:
            out.problems.append(f"<{tag}> appears {n} times")
    present = [t for t in out.order if t in TAGS]
    dedup = list(dict.fromkeys(present))
    expected = [t for t in TAGS if t in dedup]
    if dedup != expected:
        out.problems.append(f"sections out of order: {dedup}")
    for tag in IMAGE_TAGS:
        bodies = out.sections.get(tag)
        if bodies:
            count = bodies[0].count(IMAGE_PLACEHOLDER)
            out.image_counts[tag] = count
            rest = bodies[0].replace(IMAGE_PLACEHOLDER, "").strip()
            if count != 1:
                out.problems.append(f"<{tag}> holds {count} images, expected exactly 1")
            if rest:
                out.problems.append(f"<{tag}> holds text besides its image: {rest[:40]!r}")
    for tag in ("degradation",) + UNDERSTAND_TAGS:
        for body in out.sections.get(tag, []):
            if IMAGE_PLACEHOLDER in body:
                out.problems.append(f"<{tag}> holds an image")
    for tag, bodies in out.sections.items():
        for body in bodies:
            nested = _ANY_TAG_RE.findall(body)
            if nested:
                out.problems.append(f"<{tag}> holds other tags: {nested[:4]}")
    if stray:
        out.problems.append(f"unmatched tags: {stray[:6]}")
    if out.outside:
        out.problems.append(f"text outside the tags: {out.outside[:40]!r}")
    return out
