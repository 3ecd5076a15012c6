"""Credit: how a chain's advantages reach its text tokens and its denoising steps, as registries of named rules.

``grpo.token_credit`` names one rule of ``TOKEN_CREDIT`` (``{name: chain}``, the paper's: every sampled token
gets the chain's text advantage; ``{name: section}``: each token gets the advantage of the section it was
written in). ``grpo.image_credit`` names one rule of ``IMAGE_CREDIT`` (``{name: final}``: every stage's steps get
their image branch's final-image advantage; ``{name: stage}``: the rough and middle steps get their own stage
image's). Pure torch; tag ids come from the policy's tokenizer through ``ChainTags``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from core.chain import DEGRADATION_ITEMS, PROCESS_STAGES, TAGS, TEXT_TAGS, item_statements, open_tag
from core.grpo.advantages import registry_entry
from core.records import ChainAdvantage, Rollout


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


# ------------------------------------------------------------------------------------------ image credit
# A rule maps one chain (its ``Rollout.traces``: each image branch's stages in turn, branch 0's first) and its
# ChainAdvantage to one advantage per trace, which every denoising step of that trace gets.
ImageCredit = Callable[[Rollout, ChainAdvantage], list[float]]


def branch_of_traces(r: Rollout, advantage: ChainAdvantage) -> list[float]:
    """Each image branch's final-image advantage (``ChainAdvantage.image_branches``; one branch: ``image``, else
    the text's), checked against the chain's branches and traces."""
    if advantage.image_branches is None:
        return [float(advantage.text if advantage.image is None else advantage.image)]
    m = r.image_branches
    if len(advantage.image_branches) != m or len(r.traces) % m:
        raise ValueError(f"rollout prompt_id={r.prompt_id} sample_index={r.sample_index}: {m} image branches and "
                         f"{len(r.traces)} traces, but {len(advantage.image_branches)} branch advantages")
    return [float(a) for a in advantage.image_branches]


def final_credit(r: Rollout, advantage: ChainAdvantage) -> list[float]:
    """Every stage's steps get their branch's final-image advantage: an outcome reward, as in Flow-GRPO, which is
    the whole trajectory's return because each stage is conditioned on the one before."""
    branches = branch_of_traces(r, advantage)
    return [branches[j * len(branches) // len(r.traces)] for j in range(len(r.traces))]


def stage_credit(r: Rollout, advantage: ChainAdvantage) -> list[float]:
    """The steps of a stage before the final (``PROCESS_STAGES``) get their own image's advantage
    (``ChainAdvantage.stages``, from the ``generation/<stage>`` process reward), the final stage's its branch's
    final-image advantage: each stage is judged by what it made."""
    branches = branch_of_traces(r, advantage)
    stages = advantage.stages
    if stages is None or len(stages) != len(PROCESS_STAGES) or any(len(s) != len(branches) for s in stages):
        raise ValueError(f"rollout prompt_id={r.prompt_id} sample_index={r.sample_index}: stage credit needs "
                         f"{len(branches)} advantages for each of {list(PROCESS_STAGES)} (reward.stage_metrics), "
                         f"got {stages}")
    out = []
    for j, trace in enumerate(r.traces):
        b = j * len(branches) // len(r.traces)
        out.append(float(stages[PROCESS_STAGES.index(trace.stage)][b]) if trace.stage in PROCESS_STAGES
                   else branches[b])
    return out


IMAGE_CREDIT: dict[str, ImageCredit] = {"final": final_credit, "stage": stage_credit}


def image_credit(spec: Mapping[str, Any] | None = None) -> ImageCredit:
    """The rule a ``grpo.image_credit`` entry names, with its options bound (None: ``final``)."""
    fn, options = registry_entry(IMAGE_CREDIT, spec or {"name": "final"}, "image credit", 2)
    return lambda r, advantage: fn(r, advantage, **options)
