"""Format reward: is the chain exactly the seven-section VLCoT grammar of rl.chain?

Stricter than the released code's ``re.fullmatch`` (paper.md 4.1), which accepted any number of images per
image tag and a tag name repeated inside another section's text: here each of the seven tags must appear
exactly once (also counting tag strings written inside another section), in order, each image tag holding
exactly one ``IMAGE_PLACEHOLDER`` and nothing else, and no text outside the sections (whitespace between
sections is allowed).
"""

from __future__ import annotations

import re

from rl.chain import TAGS, ParsedChain, parse_chain

_TAG_TEXT_RE = re.compile(r"</?(?:" + "|".join(TAGS) + r")>")


def format_reward(chain: ParsedChain | str) -> float:
    """1.0 when the chain follows the grammar exactly, else 0.0. Never raises.

    >>> from rl.chain import render_chain
    >>> good = render_chain("light blur", {"rough": "a cat", "final": "fur"}, separator="\\n")
    >>> format_reward(good)
    1.0
    >>> format_reward(good.replace("<|image|>", "<|image|><|image|>", 1))  # two images in <rough_image>
    0.0
    >>> format_reward("Sure! " + good)  # text outside the tags
    0.0
    >>> format_reward(None)
    0.0
    """
    parsed = chain if isinstance(chain, ParsedChain) else parse_chain(chain)
    if not parsed.well_formed:
        return 0.0
    # parse_chain matches sections lazily, so a tag string written inside another section's body is not a
    # section of its own; the grammar still forbids it ("each tag appears once").
    for bodies in parsed.sections.values():
        if any(_TAG_TEXT_RE.search(body) for body in bodies):
            return 0.0
    return 1.0
