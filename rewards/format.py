"""Format reward: is the chain exactly the seven-section VLCoT grammar of core.chain?

Stricter than the released code's ``re.fullmatch`` (RealSR-R1's training code), which accepted any number of images per
image tag and a tag name repeated inside another section's text: here each of the seven tags must appear
exactly once (also counting tag strings written inside another section), in order, each image tag holding
exactly one ``IMAGE_PLACEHOLDER`` and nothing else, and no text outside the sections (whitespace between
sections is allowed).
"""

from __future__ import annotations

import re

from core.chain import IMAGE_PLACEHOLDER, TAGS, TEXT_TAGS, ParsedChain, close_tag, open_tag, parse_chain

_TAG_TEXT_RE = re.compile(r"</?(?:" + "|".join(TAGS) + r")>")


def format_reward(chain: ParsedChain | str) -> float:
    """1.0 when the chain follows the grammar exactly, else 0.0. Never raises.

    >>> from core.chain import render_chain
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


_OPEN_TAG_RE = re.compile(r"<(?:" + "|".join(TAGS) + r")>")


def section_format_rewards(text: str) -> dict[str, float]:
    """Per text section (core.chain.TEXT_TAGS): 1.0 when the text the learner credits to it is exactly one
    ``<tag>body</tag>`` whose body holds no tag and no image, else 0.0. Never raises.

    The learner credits a token to the section of the latest opening tag before it (core.grpo.token_sections),
    so the text is cut at every opening tag the same way here: a stray closing tag, an unclosed section or
    rambling text after the closing tag counts against the section it was written in, and only that one. A
    well-formed chain (``format_reward`` 1) scores 1 in every section.

    >>> from core.chain import render_chain
    >>> good = render_chain("light blur", {"rough": "a cat", "middle": "a cat", "final": "fur"})
    >>> stray = good.replace("a cat</middle_understand>", "a</final_understand> cat</middle_understand>")
    >>> section_format_rewards(stray)
    {'degradation': 1.0, 'rough_understand': 1.0, 'middle_understand': 0.0, 'final_understand': 1.0}
    """
    out = dict.fromkeys(TEXT_TAGS, 0.0)
    if not isinstance(text, str):
        return out
    starts = [m.start() for m in _OPEN_TAG_RE.finditer(text)] + [len(text)]
    segments: dict[str, list[str]] = {}
    for lo, hi in zip(starts, starts[1:]):
        segment = text[lo:hi]
        segments.setdefault(segment[1:segment.index(">")], []).append(segment)
    for tag in TEXT_TAGS:
        found = segments.get(tag, [])
        if len(found) != 1:
            continue
        body = found[0].rstrip()
        head, tail = open_tag(tag), close_tag(tag)
        if body.endswith(tail) and len(body) >= len(head) + len(tail):
            inner = body[len(head):-len(tail)]
            if not _TAG_TEXT_RE.search(inner) and IMAGE_PLACEHOLDER not in inner:
                out[tag] = 1.0
    return out
