"""Token credit: how a chain's advantages reach its text tokens, as a registry of named rules.

``grpo.token_credit`` names one rule of ``TOKEN_CREDIT`` (``{name: chain}``, the paper's: every sampled token
gets the chain's text advantage; ``{name: section}``: each token gets the advantage of the section it was
written in). Pure torch; tag ids come from the policy's tokenizer through ``ChainTags``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from core.chain import DEGRADATION_ITEMS, TAGS, TEXT_TAGS, item_statements, open_tag
from core.grpo.advantages import registry_entry
from core.records import ChainAdvantage


@dataclass(frozen=True)
class ChainTags:
    """The chain tags' token ids in one tokenizer (each tag is a single token)."""

    section_columns: Mapping[int, int]  # opening-tag id -> 1 + index in TEXT_TAGS; 0 for the image sections
    # token ids -> text (the tokenizer's decode): where each degradation item is stated (degradation item credit)
    decode: Optional[Callable[[Sequence[int]], str]] = field(default=None, compare=False)

    @classmethod
    def from_tokens(cls, tokens: Any) -> "ChainTags":
        """``tokens``: the policy's ``models.chain_tokens.ChainTokens`` (``single_token_id``, ``tokenizer``)."""
        tid = lambda text: tokens.single_token_id(text, "chain tag")  # noqa: E731
        tokenizer = getattr(tokens, "tokenizer", None)
        return cls(
            section_columns={tid(open_tag(t)): TEXT_TAGS.index(t) + 1 if t in TEXT_TAGS else 0 for t in TAGS},
            decode=None if tokenizer is None else (lambda ids: tokenizer.decode(list(ids))),
        )


def token_sections(token_ids: Tensor, tag_columns: Mapping[int, int]) -> Tensor:
    """Which section each position of a completion is in: (T,) long.

    tag_columns maps the id of an opening tag (a single token) to a column; a position takes the column of
    the most recent opening tag at or before it (the tag token itself included), and 0 before any tag. A
    chain's text is sectioned by what the policy actually wrote, so a stray tag starts a new section.
    """
    t = token_ids.numel()
    column = torch.zeros(t, dtype=torch.long)
    is_tag = torch.zeros(t, dtype=torch.bool)
    for tag_id, col in tag_columns.items():
        hit = token_ids == tag_id
        column[hit] = col
        is_tag |= hit
    last = torch.where(is_tag, torch.arange(t), torch.full((t,), -1)).cummax(0).values if t else column
    return torch.where(last >= 0, column[last.clamp(min=0)], torch.zeros_like(column))


def degradation_item_positions(token_ids: Tensor, sections: Tensor,
                               decode: Callable[[Sequence[int]], str]) -> Tensor:
    """Which degradation item each position states: (T,) long, an index into ``core.chain.DEGRADATION_ITEMS``, -1
    elsewhere. Only the first ``<degradation>`` section counts (``sections`` from ``token_sections``: column 1), and
    in it each item's first statement (``core.chain.item_statements``, as the reward reads it); a token is the
    item's when its text overlaps the statement ("medium", " blur" of "medium blur")."""
    out = torch.full((token_ids.numel(),), -1, dtype=torch.long)
    inside = (sections == TEXT_TAGS.index("degradation") + 1).nonzero().flatten().tolist()
    if not inside:
        return out
    run = [inside[0]]
    for pos in inside[1:]:  # the first contiguous run: a later <degradation> is not what the reward reads
        if pos != run[-1] + 1:
            break
        run.append(pos)
    ids = token_ids[run[0]:run[-1] + 1].tolist()
    ends = [len(decode(ids[:k + 1])) for k in range(len(ids))]  # each token's end in the decoded text
    starts = [0, *ends[:-1]]
    for item, (lo, hi) in item_statements(decode(ids)).items():
        for k in range(len(ids)):
            if starts[k] < hi and ends[k] > lo:
                out[run[0] + k] = DEGRADATION_ITEMS.index(item)
    return out


# ------------------------------------------------------------------------------------------ the rules
# A rule maps one completion's token_ids (T,), its sampled mask (T,) bool, the chain's ChainAdvantage and the
# ChainTags to per-token advantages (T,) float32, 0 where the system inserted the tokens.
TokenCredit = Callable[[Tensor, Tensor, ChainAdvantage, "ChainTags | None"], Tensor]


def chain_credit(token_ids: Tensor, sampled: Tensor, advantage: ChainAdvantage, tags: ChainTags | None) -> Tensor:
    """Every sampled token gets the chain's text advantage (the paper)."""
    return torch.full(token_ids.shape, float(advantage.text)) * sampled


def section_credit(token_ids: Tensor, sampled: Tensor, advantage: ChainAdvantage, tags: ChainTags | None,
                   degradation_items: bool = False) -> Tensor:
    """Each sampled token gets the advantage of the text section it was written in (``token_sections`` over the
    tags the policy actually wrote; tokens before any tag or inside an image section keep the text's).

    ``degradation_items``: the tokens stating a degradation item ("heavy noise") get that item's own advantage
    (``ChainAdvantage.items``, from the ``degradation/<item>`` reward part) instead of their section's: the
    degradation reward is a mean of five independent verdicts, and each statement decides only its own."""
    if advantage.sections is None or tags is None:
        raise ValueError("section credit needs per-section advantages (grpo.section_rewards) and ChainTags")
    if len(advantage.sections) != len(TEXT_TAGS):
        raise ValueError(f"section credit: {len(advantage.sections)} section advantages, expected one per "
                         f"section of {list(TEXT_TAGS)}")
    table = torch.tensor([float(advantage.text), *advantage.sections], dtype=torch.float32)
    sections = token_sections(token_ids, tags.section_columns)
    adv = table[sections]
    if degradation_items:
        if advantage.items is None or len(advantage.items) != len(DEGRADATION_ITEMS) or tags.decode is None:
            raise ValueError(f"degradation item credit needs one advantage per item of {list(DEGRADATION_ITEMS)} "
                             "and the tokenizer's decode (ChainTags.decode)")
        item = degradation_item_positions(token_ids, sections, tags.decode)
        items = torch.tensor(advantage.items, dtype=torch.float32)
        adv = torch.where(item >= 0, items[item.clamp(min=0)], adv)
    return adv * sampled


TOKEN_CREDIT: dict[str, Callable[..., Tensor]] = {"chain": chain_credit, "section": section_credit}


def token_credit(spec: Mapping[str, Any] | None = None) -> TokenCredit:
    """The rule a ``grpo.token_credit`` entry names, with its options bound (None: the paper's ``chain``)."""
    fn, options = registry_entry(TOKEN_CREDIT, spec or {"name": "chain"}, "token credit", 4)
    return lambda token_ids, sampled, advantage, tags: fn(token_ids, sampled, advantage, tags, **options)
