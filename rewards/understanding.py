"""Understanding reward: share of the ground-truth content tags the understanding text mentions.

RealSR-R1's released code tests ``tag.lower() in text``: "cat" then matches "category", the tag "lions"
misses the text "lion", and an empty tag list divides by zero. Here tags and text are both cut into words and
reduced to a singular form by a few English rules, and a tag counts as recalled when its word sequence occurs
contiguously in the text: whole words, case-insensitive, plural-tolerant (lion/lions, fox/foxes,
berry/berries, leaf/leaves), multi-word tags ("sea lion") included.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from core.chain import ParsedChain, parse_chain

_WORD_RE = re.compile(r"[a-z0-9]+")
# Irregular plurals common in photo tags; regular ones are handled by the suffix rules in `singular`.
_IRREGULAR = {
    "people": "person",
    "men": "man",
    "women": "woman",
    "children": "child",
    "mice": "mouse",
    "geese": "goose",
    "teeth": "tooth",
    "feet": "foot",
    "leaves": "leaf",
    "wolves": "wolf",
    "knives": "knife",
    "shelves": "shelf",
    "calves": "calf",
    "halves": "half",
    "loaves": "loaf",
    "tomatoes": "tomato",
    "potatoes": "potato",
    "heroes": "hero",
    "cacti": "cactus",
}


def singular(word: str) -> str:
    """A crude singular of a lower-case English word; applied to tags and text alike, so it need only agree.

    >>> [singular(w) for w in ["lions", "foxes", "berries", "skies", "ties", "glass", "leaves", "bus"]]
    ['lion', 'fox', 'berry', 'sky', 'tie', 'glass', 'leaf', 'bus']
    """
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("xes", "ches", "shes", "sses", "zes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def words(text: str) -> list[str]:
    """Lower-case singular words of ``text`` (punctuation and hyphens split words)."""
    return [singular(w) for w in _WORD_RE.findall(text.lower())]


def _contains(haystack: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def tag_recall(text: str, tags: Sequence[str]) -> float | None:
    """Share of distinct tags whose words occur, in order and adjacent, in ``text``; None without usable tags.

    >>> tag_recall("The red fox sat by two sea lions.", ["Foxes", "sea lion", "lion sea", "cat"])
    0.5
    >>> tag_recall("anything", []) is None
    True
    """
    if isinstance(tags, str):
        tags = [tags]
    try:
        wanted = {tuple(words(t)) for t in tags if isinstance(t, str)}
    except TypeError:  # tags is not iterable (None, a number)
        return None
    wanted.discard(())
    if not wanted:
        return None
    have = words(text if isinstance(text, str) else "")
    return sum(_contains(have, list(w)) for w in wanted) / len(wanted)


def understanding_reward(
    chain: ParsedChain | str, tags: Sequence[str], stages: Sequence[str] = ("rough",)
) -> float | None:
    """Tag recall of the <{stage}_understand> text, averaged over ``stages``. Never raises.

    With several stages the reward is the mean of the per-stage recalls, so every rewarded stage must name
    the content (a stage whose section is missing scores 0). None (not applicable, left out of the total)
    when there are no usable tags or no stages. The paper's example (Fig. 2): Lions, Rock, Sky recalled,
    Clouds not:

    >>> text = ("<rough_understand>This image shows the group of lions lying on a large rock, surrounded by "
    ...         "open sky.</rough_understand>")
    >>> understanding_reward(text, ["Lions", "Rock", "Sky", "Clouds"])
    0.75
    >>> understanding_reward(text, ["Lions"], stages=["rough", "middle"])  # middle section missing
    0.5
    >>> understanding_reward(text, []) is None
    True
    """
    parsed = chain if isinstance(chain, ParsedChain) else parse_chain(chain)
    recalls = [tag_recall(parsed.understanding(stage), tags) for stage in stages]
    if not recalls or recalls[0] is None:
        return None
    return sum(recalls) / len(recalls)
