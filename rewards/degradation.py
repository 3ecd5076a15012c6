"""Degradation reward: how many of the five degradation items the policy stated at the right level.

The paper's Fig. 2 compares the predicted items one by one with the degradation actually applied when the LR
image was synthesised and shows 3 of 5 correct as "Reward 0.6" (RealSR-R1's degradation reward; its released code has no such
reward). An item the text does not state counts as wrong, even when its true level is "none": otherwise an
empty <degradation> section would earn the "none" items for free.
"""

from __future__ import annotations

from collections.abc import Mapping

from core.chain import DEGRADATION_ITEMS, ParsedChain, parse_chain, parse_degradation_text
from core.records import DegradationLabels


def degradation_reward(
    chain: ParsedChain | str, labels: DegradationLabels | Mapping[str, str] | None
) -> float | None:
    """Fraction of ``core.chain.DEGRADATION_ITEMS`` whose stated level equals the label level. Never raises.

    Returns None (not applicable, left out of the total) when there are no labels: real LR images carry no
    synthesis record. A label level missing from ``labels`` means "none", as in ``core.chain.degradation_text``.
    The first <degradation> section is read; a malformed chain is the format reward's business.

    The paper's example (Fig. 2): blur and noise levels wrong, the other three right:

    >>> chain = ("<degradation>medium blur, light downsample, heavy noise, light compression, "
    ...          "no upsample</degradation>")
    >>> truth = {"blur": "light", "downsample": "light", "noise": "medium", "compression": "light",
    ...          "upsample": "none"}
    >>> degradation_reward(chain, truth)
    0.6
    >>> degradation_reward(chain, None) is None
    True
    >>> degradation_reward("no degradation section", truth)
    0.0
    """
    items = degradation_item_rewards(chain, labels)
    return None if items is None else sum(items.values()) / len(items)


def degradation_item_rewards(
    chain: ParsedChain | str, labels: DegradationLabels | Mapping[str, str] | None
) -> dict[str, float] | None:
    """Item -> 1.0 when the text states it at its label level, else 0.0 (``degradation_reward`` is their mean),
    for every item of ``core.chain.DEGRADATION_ITEMS``. Scored as ``degradation/<item>`` parts, so a statement's
    tokens can learn from their own item alone (``grpo.token_credit: {name: section, degradation_items: true}``).

    >>> degradation_item_rewards("<degradation>heavy blur, no noise</degradation>", {"blur": "heavy", "noise": "light"})
    {'blur': 1.0, 'downsample': 0.0, 'noise': 0.0, 'compression': 0.0, 'upsample': 0.0}
    """
    if labels is None:
        return None
    levels = labels.levels if isinstance(labels, DegradationLabels) else labels
    if not isinstance(levels, Mapping):
        return None
    parsed = chain if isinstance(chain, ParsedChain) else parse_chain(chain)
    stated = parse_degradation_text(parsed.degradation)
    return {item: float(stated.get(item) == levels.get(item, "none")) for item in DEGRADATION_ITEMS}
