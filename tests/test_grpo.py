"""core.grpo against hand-computed values (the arithmetic is in the comments)."""

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from core import grpo
from core.chain import DEGRADATION_ITEMS, TEXT_TAGS
from core.records import ChainAdvantage, DiffusionTrace, Rollout, Scores

ROOT = Path(__file__).resolve().parents[1]

LN = math.log


# ------------------------------------------------------------------------------------------ advantages
def test_group_advantages_hand_computed_and_all_equal_group_is_zero():
    rewards = torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = grpo.group_advantages(rewards, group_size=4)
    # group 0: mean 0.5, deviations -0.5 -0.5 +0.5 +0.5
    #          unbiased var = 4 * 0.25 / (4 - 1) = 1/3, std = 0.5773503
    #          A = +-0.5 / (0.5773503 + 1e-6) = +-0.8660239
    # group 1: all 2.0 -> deviations 0 -> A = 0 / (0 + eps) = 0 exactly
    expected = [-0.8660239, -0.8660239, 0.8660239, 0.8660239, 0.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(adv, torch.tensor(expected), atol=1e-6, rtol=0)
    assert torch.all(adv[4:] == 0)


def test_group_advantages_uses_unbiased_std_for_pairs():
    # G = 2, rewards 1 and 3: mean 2, deviations -1 +1, unbiased var = (1 + 1) / 1 = 2, std = 1.4142136
    # A = +-1 / 1.4142136 = +-0.7071068 (a biased std of 1 would give +-1)
    adv = grpo.group_advantages(torch.tensor([1.0, 3.0]), group_size=2, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-0.7071068, 0.7071068]))


def test_group_advantages_mean_only_dr_grpo():
    # groups (1, 2, 6) mean 3 -> (-2, -1, 3);  (0, 0, 3) mean 1 -> (-1, -1, 2)
    adv = grpo.group_advantages(torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0]), 3, scale_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([-2.0, -1.0, 3.0, -1.0, -1.0, 2.0]))


def test_group_advantages_group_of_one_and_integer_rewards():
    assert torch.equal(grpo.group_advantages(torch.tensor([3.0, 7.0]), 1), torch.zeros(2))
    # integer rewards are promoted: (0, 2) -> mean 1, std sqrt(2) -> +-0.7071
    adv = grpo.group_advantages(torch.tensor([0, 2]), 2, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-0.7071068, 0.7071068]))


@pytest.mark.parametrize(
    "rewards, group_size, message",
    [
        (torch.ones(5), 2, "not a multiple of group_size=2"),
        (torch.ones(2, 2), 2, "must be 1-D"),
        (torch.tensor([1.0, float("nan"), 0.0, 1.0]), 2, "not finite at indices [1]"),
        (torch.ones(4), 0, "group_size must be a positive int"),
    ],
)
def test_group_advantages_bad_input(rewards, group_size, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        grpo.group_advantages(rewards, group_size)


def test_zero_variance_groups_counts_and_keep_mask():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5 + 1e-7, 0.5], dtype=torch.float64)
    f = grpo.zero_variance_groups(rewards, group_size=3, atol=1e-6)
    # spreads: 0 (filtered), 1 (kept), 1e-7 <= atol (filtered)
    assert f.zero_variance.tolist() == [True, False, True]
    assert f.keep.tolist() == [False] * 3 + [True] * 3 + [False] * 3
    assert (f.num_groups, f.num_filtered) == (3, 2)
    # with atol 0 the 1e-7 spread counts as signal
    assert grpo.zero_variance_groups(rewards, 3, atol=0.0).num_filtered == 1


def test_group_order_sorts_records_and_rejects_incomplete_groups():
    def s(pid, idx):
        return Scores(prompt_id=pid, sample_index=idx, parts={}, total=float(10 * pid + idx))

    records = [s(7, 1), s(3, 0), s(7, 0), s(3, 1)]
    order = grpo.group_order(records, group_size=2)
    assert order == [2, 0, 1, 3]  # prompt 7 first seen first: (7,0) (7,1) (3,0) (3,1)
    assert [records[i].total for i in order] == [70.0, 71.0, 30.0, 31.0]
    with pytest.raises(ValueError, match="prompt_id=3 has sample_index \\[0\\], expected 0..1"):
        grpo.group_order([s(7, 0), s(7, 1), s(3, 0)], 2)
    with pytest.raises(ValueError, match="duplicate chain prompt_id=7 sample_index=0"):
        grpo.group_order([s(7, 0), s(7, 0)], 2)


# ------------------------------------------------------------------------------------------ surrogate
def test_clipped_surrogate_hand_computed_both_sides():
    # clip_low 0.2 -> lower bound 0.8; clip_high 0.28 -> upper bound 1.28 (DAPO clip-higher)
    # token  ratio  A   ratio*A  clip(ratio)*A  min     loss   clipped?
    #   1    1.5   +1   1.5      1.28           1.28   -1.28   high (grad 0)
    #   2    0.5   -1  -0.5     -0.8           -0.8     0.8    low  (grad 0)
    #   3    1.5   -1  -1.5     -1.28          -1.5     1.5    no (pessimistic side keeps the grad)
    #   4    0.5   +1   0.5      0.8            0.5    -0.5    no
    #   5    1.1   +2   2.2      2.2            2.2    -2.2    no (inside the range)
    #   6    masked: log-probs are garbage (-inf / nan) -> loss 0, no grad
    ratios = [1.5, 0.5, 1.5, 0.5, 1.1]
    logp = torch.tensor([[LN(r) for r in ratios] + [float("-inf")]], requires_grad=True)
    old = torch.tensor([[0.0] * 5 + [float("nan")]])
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, 2.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    out = grpo.clipped_surrogate(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    torch.testing.assert_close(out.loss, torch.tensor([[-1.28, 0.8, 1.5, -0.5, -2.2, 0.0]]))

    out.loss.sum().backward()
    # d(-ratio*A)/dlogp = -ratio*A on unclipped tokens: token 3: 1.5, token 4: -0.5, token 5: -2.2
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, 1.5, -0.5, -2.2, 0.0]]))

    m = {k: float(v) for k, v in out.metrics.items()}
    assert m["clip_fraction_high"] == pytest.approx(1 / 5)  # token 1
    assert m["clip_fraction_low"] == pytest.approx(1 / 5)  # token 2
    assert m["clip_fraction"] == pytest.approx(2 / 5)
    # k3(old||new) per token = (r - 1) - ln r:
    #   1.5 -> 0.5 - 0.4054651 = 0.0945349 (twice);  0.5 -> -0.5 + 0.6931472 = 0.1931472 (twice)
    #   1.1 -> 0.1 - 0.0953102 = 0.0046898;  mean over 5 = 0.5800537 / 5 = 0.1160107
    assert m["approx_kl"] == pytest.approx(sum((r - 1) - LN(r) for r in ratios) / 5, rel=1e-5)
    assert m["approx_kl"] == pytest.approx(0.1160107, rel=1e-5)
    assert m["ratio_mean"] == pytest.approx(5.1 / 5, rel=1e-6)  # (1.5+0.5+1.5+0.5+1.1)/5
    assert (m["ratio_min"], m["ratio_max"], m["tokens"]) == (pytest.approx(0.5), pytest.approx(1.5), 5.0)


def test_component_rewards_sum_only_the_named_weighted_parts():
    weights = {"format": 1.0, "degradation": 0.5, "understanding": 1.0, "generation": 2.0}
    parts = [{"format": 1.0, "degradation": 0.4, "generation": 0.25, "quality/piqe": 0.9},
             {"format": 0.0, "generation": 0.5}]  # no degradation labels: left out, as in the total
    torch.testing.assert_close(grpo.component_rewards(parts, weights, ["generation"]), torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(grpo.component_rewards(parts, weights, ["format", "degradation"]),
                               torch.tensor([1.2, 0.0]))
    with pytest.raises(ValueError, match="quality"):
        grpo.component_rewards(parts, weights, ["quality"])


def test_component_rewards_weigh_a_detail_part_as_its_component():
    weights = {"format": 2.0, "degradation": 1.0}
    parts = [{"format": 0.0, "format/final_understand": 1.0, "degradation": 0.5},
             {"format": 1.0, "format/final_understand": 0.0}]
    torch.testing.assert_close(grpo.component_rewards(parts, weights, ["format/final_understand", "degradation"]),
                               torch.tensor([2.5, 0.0]))


def test_clipped_surrogate_reports_the_sampled_tokens_mean_log_prob():
    # masked positions (NaN here) are left out: (-0.5 - 2.0 - 0.1) / 3
    old = torch.tensor([[-0.5, -2.0, float("nan")], [-0.1, float("nan"), float("nan")]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    logp = torch.where(mask.bool(), old, torch.zeros(()))
    out = grpo.clipped_surrogate(logp, old, torch.tensor([1.0, -1.0]), mask, 0.2, 0.28)
    assert float(out.metrics["old_logp_mean"]) == pytest.approx(-2.6 / 3)


def test_clipped_surrogate_per_chain_advantages_broadcast_and_shape_errors():
    logp = torch.tensor([[LN(1.5), 0.0], [LN(0.5), 0.0]])
    adv = torch.tensor([1.0, -1.0])
    out = grpo.clipped_surrogate(logp, torch.zeros(2, 2), adv, torch.ones(2, 2), 0.2, 0.28)
    # row 0 A=+1: (1.28 clipped, 1.0) ; row 1 A=-1: (0.8 clipped, 1.0)
    torch.testing.assert_close(out.loss, torch.tensor([[-1.28, -1.0], [0.8, 1.0]]))
    with pytest.raises(ValueError, match="shape mismatch"):
        grpo.clipped_surrogate(logp, torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 2), 0.2, 0.2)
    with pytest.raises(ValueError, match="clip_low must be in"):
        grpo.clipped_surrogate(logp, logp, torch.zeros(2), torch.ones(2, 2), 1.0, 0.2)


def test_clipped_surrogate_all_masked_is_zero_and_finite():
    logp = torch.full((2, 3), float("nan"), requires_grad=True)
    out = grpo.clipped_surrogate(logp, torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3), 0.2, 0.2)
    assert torch.equal(out.loss, torch.zeros(2, 3))
    out.loss.sum().backward()
    assert torch.equal(logp.grad, torch.zeros(2, 3))
    assert float(out.metrics["clip_fraction"]) == 0.0 and float(out.metrics["tokens"]) == 0.0


def test_image_surrogate_shares_the_chain_advantage_over_all_steps():
    # 2 chains x 4 steps (rough 2, middle 1, final 1), old log-probs 0, A = (+1, -2),
    # chain 1's last step padded
    # chain 0 (A=+1): r 1.5 -> min(1.5, 1.28) = 1.28 -> -1.28;  r 1 -> -1;  r 0.9 -> -0.9;
    #                 r 1.3 -> 1.28 -> -1.28
    # chain 1 (A=-2): r 0.5 -> min(-1.0, 0.8*-2 = -1.6) = -1.6 -> 1.6;  r 1.1 -> -2.2 -> 2.2;
    #                 r 1 -> 2.0;  pad -> 0
    new = torch.tensor([[LN(1.5), 0.0, LN(0.9), LN(1.3)], [LN(0.5), LN(1.1), 0.0, 123.0]])
    step_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -2.0])
    out = grpo.image_surrogate(new, torch.zeros(2, 4), adv, 0.2, 0.28, step_mask)
    torch.testing.assert_close(out.loss, torch.tensor([[-1.28, -1.0, -0.9, -1.28], [1.6, 2.2, 2.0, 0.0]]))
    # clipped: chain 0 steps 1 and 4 (high), chain 1 step 1 (low) -> 3 of 7 real steps
    assert float(out.metrics["clip_fraction"]) == pytest.approx(3 / 7)
    assert float(out.metrics["clip_fraction_low"]) == pytest.approx(1 / 7)
    # the same as the text surrogate with the chain advantage written on every step
    per_step_adv = adv[:, None].expand(2, 4)
    text_style = grpo.clipped_surrogate(new, torch.zeros(2, 4), per_step_adv, step_mask, 0.2, 0.28)
    torch.testing.assert_close(out.loss, text_style.loss)
    # one advantage per step (image branches) is the same as the chain's written on every step
    per_step = grpo.image_surrogate(new, torch.zeros(2, 4), per_step_adv.clone(), 0.2, 0.28, step_mask)
    torch.testing.assert_close(per_step.loss, out.loss)
    with pytest.raises(ValueError, match="advantages must be \\(N,\\) or \\(N, S\\)"):
        grpo.image_surrogate(new, torch.zeros(2, 4), torch.zeros(2, 3), 0.2, 0.2, step_mask)


# ------------------------------------------------------------------------------------------ off-policy (TIS)
def test_truncated_importance_weights_hand_computed_and_one_on_policy():
    # behaviour log-probs 0; proximal ln 0.5, ln 1.5, ln 3 (masked in), ln 9 (masked out); cap 2
    # ratios 0.5, 1.5, 3 -> weights 0.5, 1.5, min(3, 2) = 2; the masked position gets 1
    prox = torch.tensor([[LN(0.5), LN(1.5), LN(3.0), LN(9.0)]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    iw = grpo.truncated_importance_weights(prox, torch.zeros(1, 4), mask, cap=2.0)
    torch.testing.assert_close(iw.weights, torch.tensor([[0.5, 1.5, 2.0, 1.0]]))
    assert iw.ratio_sum == pytest.approx(0.5 + 1.5 + 3.0)
    assert (iw.truncated, iw.count) == (1.0, 3.0)
    # on-policy: proximal == behaviour -> every weight exactly 1, nothing truncated
    behaviour = torch.randn(3, 5)
    same = grpo.truncated_importance_weights(behaviour.clone(), behaviour, torch.ones(3, 5, dtype=torch.bool), 2.0)
    assert torch.equal(same.weights, torch.ones(3, 5)) and same.truncated == 0 and same.ratio_sum == 15.0
    with pytest.raises(ValueError, match="cap must be >= 1"):
        grpo.truncated_importance_weights(prox, torch.zeros(1, 4), mask, cap=0.5)


def test_surrogate_weights_scale_the_loss_not_the_clip_or_the_metrics():
    new = torch.tensor([[LN(1.5), LN(0.9)]], requires_grad=True)
    old, adv, mask = torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool)
    plain = grpo.clipped_surrogate(new, old, adv, mask, 0.2, 0.28)
    weighted = grpo.clipped_surrogate(new, old, adv, mask, 0.2, 0.28, weights=torch.tensor([[2.0, 0.5]]))
    # losses -1.28 (clipped) and -0.9, times 2 and 0.5
    torch.testing.assert_close(weighted.loss, torch.tensor([[-2.56, -0.45]]))
    assert {k: float(v) for k, v in weighted.metrics.items()} == {k: float(v) for k, v in plain.metrics.items()}
    weights_one = grpo.image_surrogate(new, old, adv, 0.2, 0.28, mask, weights=torch.ones(1, 2))
    torch.testing.assert_close(weights_one.loss, plain.loss)
    with pytest.raises(ValueError, match="weights"):
        grpo.clipped_surrogate(new, old, adv, mask, 0.2, 0.28, weights=torch.ones(2, 2))


# ------------------------------------------------------------------------------------------ aggregation
def test_token_mean_over_micro_batches_equals_full_batch_token_mean():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    # full batch: masked sum = (1+2) + (5+6+7+8) + 9 = 38 over 2+4+1 = 7 tokens -> 38/7 = 5.4285714
    full = grpo.token_mean(values, mask)
    assert float(full) == pytest.approx(38 / 7)
    # micro-batches {row 0, row 1} and {row 2} with the global count 7: 29/7 + 9/7 = 38/7
    parts = [grpo.token_mean(values[:2], mask[:2], 7), grpo.token_mean(values[2:], mask[2:], 7)]
    assert float(parts[0]) == pytest.approx(29 / 7) and float(parts[1]) == pytest.approx(9 / 7)
    assert float(sum(parts)) == pytest.approx(38 / 7)
    # dividing by the local counts would be wrong: (29/6 + 9/1) / 2 = 6.9166667
    naive = (grpo.token_mean(values[:2], mask[:2]) + grpo.token_mean(values[2:], mask[2:])) / 2
    assert float(naive) == pytest.approx(6.9166667) and abs(float(naive) - 38 / 7) > 1
    with pytest.raises(ValueError, match="token count must be > 0"):
        grpo.token_mean(values, torch.zeros_like(mask))


def test_gradient_accumulation_over_split_train_batch_matches_full_batch():
    """Bigram policy theta (V, V): micro-batches with the global token count give the full-batch gradient."""
    torch.manual_seed(0)
    v = 11
    rollouts = [_rollout(pid, s, prompt_len=2 + s, text_len=3 + 2 * pid + s, steps=(2, 1, 1), vocab=v)
                for pid in range(2) for s in range(2)]
    batch = grpo.build_train_batch(rollouts, torch.tensor([0.5, -0.5, 1.0, -1.0]))
    theta0 = torch.randn(v, v)

    def loss_of(b, count):
        theta = theta_param
        logits = theta[b.input_ids]  # (B, L, V): logits for the next token depend on the current token
        logp = grpo.gather_token_log_probs(logits, b.input_ids)
        out = grpo.clipped_surrogate(logp, b.old_log_probs, b.advantages, b.loss_mask, 0.2, 0.28)
        return grpo.token_mean(out.loss, b.loss_mask, count)

    theta_param = theta0.clone().requires_grad_(True)
    loss_of(batch, None).backward()
    full_grad = theta_param.grad.clone()

    theta_param = theta0.clone().requires_grad_(True)
    micro = batch.split(micro_batch_size=3)
    assert [len(m) for m in micro] == [3, 1]
    assert sum(m.num_tokens for m in micro) == batch.num_tokens
    for m in micro:
        loss_of(m, batch.num_tokens).backward()
    torch.testing.assert_close(theta_param.grad, full_grad)
    assert full_grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ KL
def test_k3_kl_hand_computed_and_zero_when_equal():
    logp = torch.tensor([[0.0, 0.0, -1.3]], requires_grad=True)
    ref = torch.tensor([[LN(2.0), -LN(2.0), -1.3]])
    kl = grpo.k3_kl(logp, ref)
    # d = ref - logp:  ln2 -> 2 - ln2 - 1 = 0.3068528;  -ln2 -> 0.5 + ln2 - 1 = 0.1931472;  0 -> 1 - 0 - 1 = 0
    torch.testing.assert_close(kl, torch.tensor([[1 - LN(2), LN(2) - 0.5, 0.0]]))
    kl.sum().backward()
    # d kl / d logp = 1 - exp(d):  1 - 2 = -1;  1 - 0.5 = 0.5;  1 - 1 = 0
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, 0.5, 0.0]]))
    x = torch.randn(3, 5)
    assert torch.equal(grpo.k3_kl(x, x.clone()), torch.zeros(3, 5))
    assert torch.all(grpo.k3_kl(x, torch.randn(3, 5)) >= 0)


def test_needs_reference():
    assert grpo.needs_reference(0.0) is False and grpo.needs_reference(0) is False
    assert grpo.needs_reference(0.04) is True
    with pytest.raises(ValueError, match="kl beta must be a number >= 0, got -0.1"):
        grpo.needs_reference(-0.1)


def test_gather_token_log_probs_alignment_and_temperature():
    logits = torch.randn(2, 4, 6)
    ids = torch.tensor([[1, 2, 3, 4], [5, 0, 1, 2]])
    out = grpo.gather_token_log_probs(logits, ids, temperature=0.5)
    ref = torch.log_softmax(logits / 0.5, dim=-1)
    assert out.shape == (2, 4) and torch.all(out[:, 0] == 0)
    # entry t is predicted by position t - 1
    torch.testing.assert_close(out[1, 2], ref[1, 1, 1])
    torch.testing.assert_close(out[0, 3], ref[0, 2, 4])


# ------------------------------------------------------------------------------------------ train batch
def _rollout(pid, sidx, prompt_len, text_len, steps=(2, 2, 2), image_span=None, vocab=50):
    g = torch.Generator().manual_seed(100 * pid + sidx)
    text_mask = torch.ones(text_len, dtype=torch.bool)
    if image_span is not None:
        text_mask[image_span[0] : image_span[1]] = False  # an inserted image block
    log_probs = torch.where(text_mask, -torch.rand(text_len, generator=g), torch.zeros(()))
    traces = tuple(
        DiffusionTrace(
            stage=stage, latents=torch.zeros(n + 1, 3, 4, 4), log_probs=-torch.rand(n, generator=g) - 10 * k,
            timesteps=torch.arange(n), condition=torch.zeros(3, 4, 4),
            text_ids=torch.zeros(2, dtype=torch.long),
            noise_level=20,
        )
        for k, (stage, n) in enumerate(zip(("rough", "middle", "final"), steps))
    )
    return Rollout(
        prompt_id=pid, sample_index=sidx, policy_version=0, diffusion_version=0,
        prompt_ids=torch.randint(1, vocab, (prompt_len,), generator=g),
        token_ids=torch.randint(1, vocab, (text_len,), generator=g),
        text_mask=text_mask, log_probs=log_probs, text="", images={}, context_images=[], traces=traces,
    )


def test_build_train_batch_pads_masks_and_attaches_advantages():
    rollouts = [
        _rollout(0, 0, prompt_len=3, text_len=5, steps=(2, 2, 2)),
        _rollout(0, 1, prompt_len=3, text_len=5, steps=(2, 2, 2)),
        _rollout(1, 0, prompt_len=4, text_len=6, image_span=(2, 4), steps=(2, 1, 3)),
        _rollout(1, 1, prompt_len=2, text_len=3, steps=(1, 1, 0)),
    ]
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0])  # group 0 all equal -> filtered
    filt = grpo.zero_variance_groups(rewards, 2)
    adv = grpo.group_advantages(rewards, 2)
    batch = grpo.build_train_batch(rollouts, adv, filt.keep, pad_token_id=-7)

    assert len(batch) == 2 and batch.rows == (2, 3) and batch.keys == ((1, 0), (1, 1))
    # lengths: row 0 = 4 + 6 = 10, row 1 = 2 + 3 = 5 -> L = 10; steps: 2+1+3 = 6, 1+1+0 = 2 -> S = 6
    assert batch.input_ids.shape == (2, 10) and batch.step_old_log_probs.shape == (2, 6)
    r2, r3 = rollouts[2], rollouts[3]
    assert torch.equal(batch.input_ids[0], torch.cat([r2.prompt_ids, r2.token_ids]))
    assert torch.equal(batch.input_ids[1, :5], torch.cat([r3.prompt_ids, r3.token_ids]))
    assert batch.input_ids[1, 5:].tolist() == [-7] * 5
    assert batch.attention_mask.sum(1).tolist() == [10, 5]
    # loss tokens: row 0 completion columns 4..9 minus the image block at completion 2..3 (columns 6, 7)
    assert batch.loss_mask[0].tolist() == [False] * 4 + [True, True, False, False, True, True]
    assert batch.loss_mask[1].tolist() == [False] * 2 + [True] * 3 + [False] * 5
    assert batch.num_tokens == 4 + 3 and batch.num_steps == 6 + 2
    # advantages (G=2, rewards 0 and 1): -0.7071 and +0.7071 on every loss token, 0 elsewhere
    a = adv[2:]
    real_steps = torch.arange(6)[None, :] < batch.step_lengths[:, None]
    torch.testing.assert_close(batch.step_advantages, a[:, None] * real_steps)  # every real step, padding 0
    torch.testing.assert_close(batch.advantages, a[:, None] * batch.loss_mask)
    assert float(batch.step_advantages[0, 0]) == pytest.approx(-0.7071, abs=1e-4)
    sampled_lp = torch.where(r2.text_mask, r2.log_probs, torch.zeros(()))
    torch.testing.assert_close(batch.old_log_probs[0, 4:], sampled_lp)
    # diffusion steps: the three stages concatenated in trace order, padding masked
    torch.testing.assert_close(batch.step_old_log_probs[0], torch.cat([t.log_probs for t in r2.traces]))
    assert batch.step_mask[1].tolist() == [True, True] + [False] * 4
    assert batch.prompt_lengths.tolist() == [4, 2]

    # selecting the short row trims columns nobody uses
    short = batch.select([1])
    assert short.input_ids.shape == (1, 5) and short.step_mask.shape == (1, 2) and short.rows == (3,)


def test_build_train_batch_empty_and_bad_records():
    rollouts = [_rollout(0, 0, 2, 3), _rollout(0, 1, 2, 3)]
    empty = grpo.build_train_batch(rollouts, torch.zeros(2), torch.tensor([False, False]))
    assert len(empty) == 0 and empty.num_tokens == 0 and empty.input_ids.shape == (0, 0)
    bad = _rollout(5, 1, 2, 3)
    bad.log_probs = torch.zeros(4)
    with pytest.raises(ValueError, match="prompt_id=5 sample_index=1: log_probs has shape \\(4,\\)"):
        grpo.build_train_batch([bad], torch.zeros(1))
    bad2 = _rollout(6, 0, 2, 3)
    bad2.log_probs = torch.tensor([0.0, float("nan"), 0.0])
    with pytest.raises(ValueError, match="prompt_id=6 sample_index=0: log_probs are not finite"):
        grpo.build_train_batch([bad2], torch.zeros(1))
    with pytest.raises(ValueError, match="advantages must be \\(N,\\) with N = 2"):
        grpo.build_train_batch(rollouts, torch.zeros(3))


def test_build_train_batch_gives_the_diffusion_steps_their_own_advantages():
    rollouts = [_rollout(0, 0, 2, 3, steps=(1, 1, 1)), _rollout(0, 1, 2, 3, steps=(1, 1, 1)),
                _rollout(1, 0, 2, 3, steps=(1, 1, 1)), _rollout(1, 1, 2, 3, steps=(1, 1, 1))]
    text, image = [1.0, -1.0, 0.5, -0.5], [-2.0, 2.0, 0.0, 0.0]
    advantages = [ChainAdvantage(text=t, image=i) for t, i in zip(text, image)]
    batch = grpo.build_train_batch(rollouts, advantages, torch.tensor([False, False, True, True]))
    torch.testing.assert_close(batch.step_advantages, torch.zeros(2, 3))  # the image's, kept rows
    torch.testing.assert_close(batch.advantages, torch.tensor([0.5, -0.5])[:, None] * batch.loss_mask)
    with pytest.raises(ValueError, match="2 advantages for 4 rollouts"):
        grpo.build_train_batch(rollouts, advantages[:2])


def test_end_to_end_rewards_to_batch_in_group_order():
    """Scores arrive in any order; group_order aligns them with the rollouts before the advantages."""
    rollouts = [_rollout(pid, s, 2, 3) for pid in (4, 9) for s in range(3)]
    scores = [Scores(r.prompt_id, r.sample_index, {}, float(r.sample_index == 2)) for r in rollouts]
    rng = np.random.default_rng(0)
    shuffled = [scores[i] for i in rng.permutation(len(scores))]
    order = grpo.group_order(shuffled, 3)
    rewards = torch.tensor([shuffled[i].total for i in order])
    by_key = {(r.prompt_id, r.sample_index): r for r in rollouts}
    ordered = [by_key[(shuffled[i].prompt_id, shuffled[i].sample_index)] for i in order]
    batch = grpo.build_train_batch(ordered, grpo.group_advantages(rewards, 3))
    # each group (0, 0, 1): mean 1/3, unbiased std = sqrt((2*(1/9) + 4/9) / 2) = sqrt(1/3) = 0.5773503
    # -> A(sample 2) = (2/3) / 0.5773503 = 1.1547005, A(others) = -(1/3) / 0.5773503 = -0.5773503
    for key, a in zip(batch.keys, batch.step_advantages[:, 0].tolist()):
        assert a == pytest.approx(1.1547005 if key[1] == 2 else -0.5773503, abs=1e-5)


# ------------------------------------------------------------------------------------------ section credit
def test_token_sections_follow_the_tags_the_policy_wrote():
    # ids: 100 <degradation>, 101 <rough_understand>, 102 <rough_image> (column 0: the text's own)
    cols = {100: 1, 101: 2, 102: 0}
    ids = torch.tensor([7, 100, 5, 5, 101, 6, 102, 9, 100, 3])  # text before a tag; a stray second <degradation>
    assert grpo.token_sections(ids, cols).tolist() == [0, 1, 1, 1, 2, 2, 0, 0, 1, 1]
    assert grpo.token_sections(torch.zeros(0, dtype=torch.long), cols).tolist() == []


def test_column_advantages_normalise_each_column_and_filter_only_all_flat_groups():
    # group 0: text flat, image varies -> kept; group 1: both flat -> dropped
    rewards = torch.tensor([[1.0, 0.2], [1.0, 0.4], [0.5, 0.3], [0.5, 0.3]])
    adv, groups = grpo.column_advantages(rewards, 2)
    torch.testing.assert_close(adv[:, 0], torch.zeros(4))
    torch.testing.assert_close(adv[:, 1], grpo.group_advantages(rewards[:, 1].contiguous(), 2))
    assert groups.zero_variance.tolist() == [False, True] and groups.keep.tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="\\(N, C\\)"):
        grpo.column_advantages(torch.zeros(4), 2)


# two groups of G=2; group 1 ties on format and on the section's own format
CHAIN_PARTS = [{"format": 1.0, "format/final_understand": 1.0, "degradation": 0.2, "generation": 0.3},
               {"format": 0.0, "format/final_understand": 0.0, "degradation": 0.6, "generation": 0.5},
               {"format": 1.0, "format/final_understand": 1.0, "degradation": 0.4, "generation": 0.1},
               {"format": 1.0, "format/final_understand": 1.0, "degradation": 0.4, "generation": 0.2}]
CHAIN_TOTALS = [sum(p[k] for k in ("format", "degradation", "generation")) for p in CHAIN_PARTS]
UNIT = {"format": 1.0, "degradation": 1.0, "generation": 1.0}


def _step(parts=CHAIN_PARTS, totals=CHAIN_TOTALS, group_size=2, **kw):
    return grpo.StepRewards(parts, totals, UNIT, group_size, **kw)


def _col(name, components=None, estimator="grpo", **options):
    """A column of the plan: ``components`` None for the total, ``estimator`` an ADV_ESTIMATORS name."""
    return grpo.AdvantageColumn(name, None if components is None else tuple(components), {"name": estimator, **options})


def _advantages(*columns, step=None, transforms=(), generator=None):
    plan = grpo.AdvantagePlan(tuple(columns), tuple(transforms))
    return grpo.estimate_advantages(step if step is not None else _step(), plan, generator)


def test_estimated_advantages_default_is_the_papers_one_total_per_chain():
    adv = _advantages(_col("text"))
    torch.testing.assert_close(adv.text, grpo.group_advantages(torch.tensor(CHAIN_TOTALS), 2))
    assert adv.image is None and adv.sections is None  # the images and every token share it
    assert adv.groups.keep.tolist() == [True] * 4


def test_estimated_advantages_give_each_part_its_own_column():
    adv = _advantages(_col("text", ["format"]), _col("image", ["generation"]),
                      _col("section/degradation", ["format"]),  # not named in section_rewards: the text's
                      _col("section/final_understand", ["format/final_understand"]))
    a = 1 / (2 ** 0.5 + 1e-6)  # G=2: +-1/sqrt(2) around the mean, unbiased std
    torch.testing.assert_close(adv.text, torch.tensor([a, -a, 0.0, 0.0]))
    torch.testing.assert_close(adv.image, torch.tensor([-a, a, -a, a]))
    # degradation is not named: it takes the text's column; final_understand its own format
    torch.testing.assert_close(adv.sections[:, 0], adv.text)
    torch.testing.assert_close(adv.sections[:, 1], torch.tensor([a, -a, 0.0, 0.0]))
    assert adv.groups.keep.tolist() == [True] * 4  # group 1's images still differ


def test_without_an_image_column_a_frozen_sr_models_reward_keeps_no_group_alive():
    adv = _advantages(_col("text", ["format"]))  # the plan of a frozen SR model: no image column
    assert adv.image is None
    assert adv.groups.zero_variance.tolist() == [False, True]  # only generation differed in group 1


def test_an_advantage_plan_names_its_columns():
    for columns in ([_col("image")], [_col("text"), _col("text")], [_col("text"), _col("pixels")],
                    [_col("text"), _col("image"), _col("image_branches", estimator="image_branches")]):
        with pytest.raises(ValueError, match="need one text column"):
            grpo.AdvantagePlan(tuple(columns))
    with pytest.raises(ValueError, match="one per core.chain.DEGRADATION_ITEMS item"):
        grpo.AdvantagePlan((_col("text"), _col("item/blur")))
    with pytest.raises(ValueError, match="3 chains' parts but 4 totals"):
        _step(parts=CHAIN_PARTS[:3])


def test_advantage_estimators_are_registered_by_name_behind_one_signature():
    assert sorted(grpo.ADV_ESTIMATORS) == ["decoupled", "grpo", "image_branches"]
    with pytest.raises(ValueError, match="'grpo' is registered already"):
        grpo.register_adv_est("grpo")(lambda step, components: None)

    @grpo.register_adv_est("test_rank")
    def rank(step, components, scale=1.0):  # a new estimator: registered, then named in a plan; nothing else
        r = grpo.joint_rewards(step, components)
        ranks = r.view(-1, step.group_size).argsort(1).argsort(1).float()
        adv = (ranks - ranks.mean(1, keepdim=True)) * scale
        return grpo.Estimate(adv.reshape(-1, 1), grpo.zero_variance_groups(r, step.group_size).zero_variance)

    try:
        adv = _advantages(_col("text", ["format"]), _col("image", ["generation"], "test_rank", scale=2.0))
        assert adv.image.tolist() == [-1.0, 1.0, -1.0, 1.0] and adv.groups.keep.tolist() == [True] * 4
    finally:
        del grpo.ADV_ESTIMATORS["test_rank"]
    with pytest.raises(ValueError, match=r"advantage estimator 'gae' is not one of \['decoupled', 'grpo', 'image_"):
        _advantages(_col("text", estimator="gae"))
    with pytest.raises(ValueError, match=r"advantage estimator 'grpo': unknown option\(s\) \['decoupled'\]"):
        _advantages(_col("text", decoupled=True))


# ------------------------------------------------------------------------------------------ image branches
def test_branch_advantages_centre_on_the_chain_and_scale_by_the_group():
    # one group of G=2 chains x M=2 images; chain 1's images are better overall (its text), chain 0's differ more
    rewards = torch.tensor([[0.2, 0.6], [0.9, 1.1]])
    adv, zero = grpo.branch_advantages(rewards, 2)
    residual = torch.tensor([[-0.2, 0.2], [-0.1, 0.1]])  # the chain's own mean removed: the text's share is gone
    torch.testing.assert_close(adv, residual / (residual.flatten().std() + 1e-6))
    assert zero.tolist() == [False]
    assert float(adv.sum()) == pytest.approx(0.0, abs=1e-6)
    # a group whose images tie within every chain teaches the SR model nothing, however its texts differ
    adv2, zero2 = grpo.branch_advantages(torch.tensor([[0.3, 0.3], [0.9, 0.9], [0.1, 0.5], [0.2, 0.2]]), 2)
    assert zero2.tolist() == [True, False] and adv2[:2].abs().max() == 0
    raw, _ = grpo.branch_advantages(rewards, 2, scale_by_std=False)
    torch.testing.assert_close(raw, residual)
    with pytest.raises(ValueError, match="\\(N, M\\)"):
        grpo.branch_advantages(torch.zeros(4), 2)


def test_estimated_advantages_with_image_branches():
    branches = [[{"generation": 0.3}, {"generation": 0.5}], [{"generation": 0.5}, {"generation": 0.3}],
                [{"generation": 0.1}, {"generation": 0.1}], [{"generation": 0.2}, {"generation": 0.2}]]
    columns = (_col("text", ["format"]), _col("image_branches", ["generation"], "image_branches"))
    adv = _advantages(*columns, step=_step(branches=branches))
    expected, zero = grpo.branch_advantages(torch.tensor([[0.3, 0.5], [0.5, 0.3], [0.1, 0.1], [0.2, 0.2]]), 2)
    torch.testing.assert_close(adv.image_branches, expected)
    torch.testing.assert_close(adv.image, expected[:, 0])  # branch 0 is the chain's own image
    assert adv.groups.zero_variance.tolist() == [False, True]  # group 1: format tied, its images tied per chain
    records = adv.per_chain()
    assert records[1].image_branches == pytest.approx(tuple(expected[1].tolist()))
    # the placebo moves whole rows, the branches with their chain
    placebo = _advantages(*columns, step=_step(branches=branches), transforms=[{"name": "placebo_shuffle"}],
                          generator=torch.Generator().manual_seed(1))
    rows = {tuple(r) for r in torch.cat([placebo.text[:, None], placebo.image_branches], 1).tolist()}
    assert rows == {tuple(r) for r in torch.cat([adv.text[:, None], adv.image_branches], 1).tolist()}
    with pytest.raises(ValueError, match="needs 2 image branches"):
        _advantages(_col("text"), _col("image_branches", ["generation"], "image_branches"),
                    step=_step(branches=branches[:3] + [branches[3][:1]]))


def test_build_train_batch_gives_each_image_branch_its_own_steps_advantage():
    r = _rollout(0, 0, 2, 3, steps=(1, 2, 1))
    r.traces = r.traces + r.traces  # branch 1: the same three stages again
    r.branch_images = ({"final": np.zeros((4, 4, 3), np.uint8)},)
    batch = grpo.build_train_batch([r], [ChainAdvantage(text=1.0, image=0.5, image_branches=(0.5, -2.0))])
    assert batch.step_advantages.tolist() == [[0.5] * 4 + [-2.0] * 4]
    with pytest.raises(ValueError, match="2 image branches and 6 traces, but 3 branch advantages"):
        grpo.build_train_batch([r], [ChainAdvantage(text=1.0, image_branches=(0.5, -2.0, 1.0))])


def test_stage_credit_gives_each_stage_its_own_images_advantage():
    r = _rollout(0, 0, 2, 3, steps=(1, 2, 1))
    r.traces = r.traces + r.traces  # branch 1: the same three stages again
    r.branch_images = ({"rough": np.zeros((1, 1, 3), np.uint8), "final": np.zeros((4, 4, 3), np.uint8)},)
    adv = ChainAdvantage(text=1.0, image=0.5, image_branches=(0.5, -2.0), stages=((0.1, 0.2), (0.3, 0.4)))
    # final credit (the default): every stage of a branch takes that branch's final-image advantage
    assert grpo.build_train_batch([r], [adv]).step_advantages.tolist() == [[0.5] * 4 + [-2.0] * 4]
    staged = grpo.build_train_batch([r], [adv], image_credit=grpo.image_credit({"name": "stage"}))
    # rough (1 step), middle (2), final (1), branch 0 then branch 1: each stage its own image's advantage
    torch.testing.assert_close(staged.step_advantages, torch.tensor([[0.1, 0.3, 0.3, 0.5, 0.2, 0.4, 0.4, -2.0]]))
    with pytest.raises(ValueError, match="stage credit needs 2 advantages for each of"):
        grpo.build_train_batch([r], [replace(adv, stages=None)], image_credit=grpo.stage_credit)
    with pytest.raises(ValueError, match="image credit 'process' is not one of"):
        grpo.image_credit({"name": "process"})


def test_estimated_stage_advantages_are_each_stages_branch_advantages():
    rough, middle = [[0.3, 0.1], [0.2, 0.2], [0.5, 0.9], [0.4, 0.1]], [[0.6, 0.6], [0.1, 0.3], [0.2, 0.2], [0.5, 0.5]]
    branches = [[{"generation": 0.3 + b, "generation/rough": rough[i][b], "generation/middle": middle[i][b]}
                 for b in range(2)] for i in range(4)]
    stage = lambda s: _col(f"stage/{s}", [f"generation/{s}"], "image_branches")  # noqa: E731
    columns = (_col("text", ["format"]), _col("image_branches", ["generation"], "image_branches"),
               stage("rough"), stage("middle"))
    adv = _advantages(*columns, step=_step(branches=branches))
    for k, values in enumerate((rough, middle)):
        expected, _ = grpo.branch_advantages(torch.tensor(values), 2)
        torch.testing.assert_close(adv.stages[:, k], expected)
    assert adv.stages.shape == (4, 2, 2)
    assert adv.per_chain()[2].stages == tuple(map(tuple, adv.stages[2].tolist()))  # rough's 2 branches, middle's
    # the placebo moves a chain's stage advantages with the rest of its row
    placebo = _advantages(*columns, step=_step(branches=branches), transforms=[{"name": "placebo_shuffle"}],
                          generator=torch.Generator().manual_seed(1))
    rows = lambda a: {tuple(r) for r in torch.cat([a.text[:, None], a.stages.flatten(1)], 1).tolist()}  # noqa: E731
    assert rows(placebo) == rows(adv)
    with pytest.raises(ValueError, match="stage columns"):
        grpo.AdvantagePlan((_col("text"), stage("middle"), stage("rough")))


# ------------------------------------------------------------------------------------------ decoupled
def test_decoupled_rewards_give_each_component_the_same_say():
    # PSNR barely varies in its group, PIQE a lot: a joint sum follows PIQE, the decoupled one weighs both alike
    values = torch.tensor([[0.90, 0.40], [0.10, 0.41], [0.5, 0.2], [0.5, 0.2]])  # columns: piqe, psnr
    out = grpo.decoupled_rewards(values, torch.tensor([1.0, 1.0]), 2)
    a = 1 / (2 ** 0.5 + 1e-6)
    torch.testing.assert_close(out, torch.tensor([a - a, -a + a, 0.0, 0.0]), atol=1e-4, rtol=0)
    # a missing value (a failed metric) takes its group's mean: it neither helps nor hurts
    gaps = torch.tensor([[0.9, float("nan")], [0.1, 0.41], [0.5, 0.2], [0.6, 0.2]])
    torch.testing.assert_close(grpo.decoupled_rewards(gaps, torch.tensor([1.0, 1.0]), 2),
                               torch.tensor([a, -a, -a, a]), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="\\(N, K\\)"):
        grpo.decoupled_rewards(values, torch.tensor([1.0]), 2)


def test_the_decoupled_estimator_splits_generation_into_its_metrics():
    # PIQE spreads widely, PSNR narrowly; each chain's generation is their mean
    piqe, psnr = [0.9, 0.1, 0.5], [0.30, 0.34, 0.33]
    parts = [{"format": 1.0, "generation": (a + b) / 2, "quality/piqe": a, "quality/psnr": b}
             for a, b in zip(piqe, psnr)]
    step = lambda mw: _step(parts=parts, totals=[0.0] * 3, group_size=3, metric_weights=mw)  # noqa: E731
    joint = _advantages(_col("text", ["format"]), _col("image", ["generation"]), step=step({"piqe": 1.0, "psnr": 1.0}))
    assert int(joint.image.argmax()) == 0  # the joint sum follows PIQE alone
    dec = _advantages(_col("text", ["format"], "decoupled"), _col("image", ["generation"], "decoupled"),
                      step=step({"piqe": 1.0, "psnr": 1.0}))
    z = lambda v: grpo.group_advantages(torch.tensor(v), 3)  # noqa: E731
    torch.testing.assert_close(dec.image, grpo.group_advantages(z(piqe) + z(psnr), 3))
    assert int(dec.image.argmax()) == 2  # good on both beats best on one
    only_psnr = _advantages(_col("text", ["format"], "decoupled"), _col("image", ["generation"], "decoupled"),
                            step=step({"piqe": 0.0, "psnr": 1.0}))
    torch.testing.assert_close(only_psnr.image, z(psnr), atol=1e-3, rtol=0)  # (eps of two normalisations)


@pytest.mark.parametrize("estimator", ["grpo", "decoupled"])
def test_a_section_that_learns_from_nothing_gets_advantage_zero(estimator):
    # an empty list silences a section; so does a list of rewards none of these chains has (real LR: no labels)
    parts = [{k: v for k, v in p.items() if k != "degradation"} for p in CHAIN_PARTS]
    adv = _advantages(_col("text", ["format"], estimator), _col("section/degradation", ["degradation"], estimator),
                      _col("section/final_understand", [], estimator), step=_step(parts=parts))
    assert adv.sections.abs().max().item() == 0.0
    assert adv.text.abs().max().item() > 0.5  # the format still teaches the other tokens


def test_shuffled_advantages_are_a_permutation_within_each_group():
    columns = (_col("text", ["format"]), _col("image", ["generation"]),
               _col("section/final_understand", ["format/final_understand"]))
    real = _advantages(*columns)
    seen = set()
    for seed in range(8):
        placebo = _advantages(*columns, transforms=[{"name": "placebo_shuffle"}],
                              generator=torch.Generator().manual_seed(seed))
        rows = torch.cat([placebo.text[:, None], placebo.image[:, None], placebo.sections], dim=1)
        ref = torch.cat([real.text[:, None], real.image[:, None], real.sections], dim=1)
        for g in (0, 2):  # each group's rows are its own rows, whole, in some order
            assert sorted(map(tuple, rows[g:g + 2].tolist())) == sorted(map(tuple, ref[g:g + 2].tolist()))
        seen.add(tuple(placebo.image.tolist()))
        assert placebo.groups.keep.tolist() == real.groups.keep.tolist()
    assert len(seen) > 1  # some seeds do move a chain


def test_registries_name_what_they_have_and_check_the_options():
    with pytest.raises(ValueError, match=r"advantage transform 'flip' is not one of \['placebo_shuffle'\]"):
        grpo.advantage_transform({"name": "flip"})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['factor'\]; it takes \[\]"):
        grpo.advantage_transform({"name": "placebo_shuffle", "factor": 0.1})
    toy = {"scale": lambda table, factor: table * factor}
    with pytest.raises(ValueError, match=r"missing option\(s\) \['factor'\]"):
        grpo.registry_entry(toy, {"name": "scale"}, "toy rule", 1)
    with pytest.raises(ValueError, match="token credit 'word' is not one of \\['chain', 'section'\\]"):
        grpo.token_credit({"name": "word"})
    assert sorted(grpo.TOKEN_CREDIT) == ["chain", "section"]


def test_build_train_batch_gives_each_section_its_own_advantage():
    r = _rollout(0, 0, prompt_len=2, text_len=6, image_span=(4, 5))
    r.token_ids = torch.tensor([100, 5, 101, 6, 9, 102])  # <degradation> x <rough_understand> y [image] <img>
    r.text_mask[5] = True
    tags = grpo.ChainTags(section_columns={100: 1, 101: 2, 102: 0})
    # one per TEXT_TAGS section: degradation, rough_understand (then middle, final: unused here)
    adv = ChainAdvantage(text=3.0, image=-1.0, sections=(0.5, -2.0, 7.0, 7.0))
    batch = grpo.build_train_batch([r], [adv], credit=grpo.token_credit({"name": "section"}), tags=tags)
    # completion columns 2..7: sections 1, 1, 2, 2, (image block: no loss), 0 -> the text's own 3.0
    assert batch.advantages[0].tolist() == [0.0, 0.0, 0.5, 0.5, -2.0, -2.0, 0.0, 3.0]
    assert batch.step_advantages.unique().tolist() == [-1.0]
    with pytest.raises(ValueError, match="section credit needs per-section advantages"):
        grpo.build_train_batch([r], torch.tensor([3.0]), credit=grpo.token_credit({"name": "section"}), tags=tags)


# a toy tokenizer for degradation item credit: id -> text piece
PIECES = {100: "<degradation>", 101: "</degradation>", 102: "<rough_understand>", 5: "x", 11: ",",
          20: "medium", 21: " blur", 22: " heavy", 23: " noise", 24: " light", 25: " no", 26: " upsample"}
TOY_TAGS = grpo.ChainTags(section_columns={100: 1, 102: 2}, decode=lambda ids: "".join(PIECES[i] for i in ids))


def test_degradation_item_positions_mark_each_items_first_statement_in_the_first_section():
    # <degradation>medium blur, heavy noise, light blur, no upsample</degradation> x <deg> heavy noise
    ids = torch.tensor([100, 20, 21, 11, 22, 23, 11, 24, 21, 11, 25, 26, 101, 5, 100, 22, 23])
    sections = grpo.token_sections(ids, TOY_TAGS.section_columns)
    pos = grpo.degradation_item_positions(ids, sections, TOY_TAGS.decode)
    # blur = 0, noise = 2, upsample = 4; the second "blur" and the second section are not what the reward reads
    assert pos.tolist() == [-1, 0, 0, -1, 2, 2, -1, -1, -1, -1, 4, 4, -1, -1, -1, -1, -1]
    assert grpo.degradation_item_positions(torch.tensor([5, 102, 5]), grpo.token_sections(
        torch.tensor([5, 102, 5]), TOY_TAGS.section_columns), TOY_TAGS.decode).tolist() == [-1, -1, -1]


def test_degradation_item_credit_gives_each_statement_its_items_advantage():
    ids = torch.tensor([100, 20, 21, 11, 22, 23, 101, 102, 5])  # <deg>medium blur, heavy noise</deg><ru>x
    adv = ChainAdvantage(text=3.0, sections=(0.5, -2.0, 7.0, 7.0), items=(1.0, 9.0, -1.5, 9.0, 9.0))
    credit = grpo.token_credit({"name": "section", "degradation_items": True})
    out = credit(ids, torch.ones(9, dtype=torch.bool), adv, TOY_TAGS)
    assert out.tolist() == [0.5, 1.0, 1.0, 0.5, -1.5, -1.5, 0.5, -2.0, -2.0]
    plain = grpo.token_credit({"name": "section"})(ids, torch.ones(9, dtype=torch.bool), adv, TOY_TAGS)
    assert plain.tolist() == [0.5] * 7 + [-2.0] * 2  # without the option the items are ignored
    with pytest.raises(ValueError, match="one advantage per item"):
        credit(ids, torch.ones(9, dtype=torch.bool), ChainAdvantage(text=3.0, sections=(0.5,) * 4), TOY_TAGS)


def test_estimated_advantages_give_each_degradation_item_its_own_column():
    items = [(1, 0, 1, 0, 0), (0, 0, 1, 1, 0), (1, 1, 0, 0, 0), (1, 1, 0, 0, 0)]
    parts = [{**p, **{f"degradation/{k}": float(v) for k, v in zip(DEGRADATION_ITEMS, it)}}
             for p, it in zip(CHAIN_PARTS, items)]
    for estimator in ("grpo", "decoupled"):
        adv = _advantages(_col("text", ["format"], estimator), _col("section/degradation", ["degradation"], estimator),
                          *[_col(f"item/{i}", [f"degradation/{i}"], estimator) for i in DEGRADATION_ITEMS],
                          step=_step(parts=parts))
        expected = grpo.group_advantages(torch.tensor(items, dtype=torch.float32).T.reshape(-1), 2).view(5, 4).T
        torch.testing.assert_close(adv.items, expected, atol=1e-4, rtol=0)
        assert adv.per_chain()[0].items == pytest.approx(tuple(expected[0].tolist()))
    assert _advantages(_col("text"), step=_step(parts=parts)).items is None


def test_trained_steps_take_the_high_noise_end_and_the_batch_marks_only_them():
    assert list(grpo.trained_steps(8, 0.5)) == [0, 1, 2, 3] and list(grpo.trained_steps(8)) == list(range(8))
    assert list(grpo.trained_steps(3, 0.1)) == [0]  # at least one step per trace
    rollouts = [_rollout(0, 0, 2, 3, steps=(4, 4, 4)), _rollout(0, 1, 2, 3, steps=(4, 4, 4))]
    full = grpo.build_train_batch(rollouts, torch.tensor([1.0, -1.0]))
    half = grpo.build_train_batch(rollouts, torch.tensor([1.0, -1.0]), train_steps=(0.5, 0.0))
    assert full.num_steps == 2 * 12 and half.num_steps == 2 * 6  # half the steps get a loss
    assert half.step_mask[0].tolist() == [True, True, False, False] * 3  # the first two of each stage
    assert half.select([1]).step_old_log_probs.shape == (1, 12)  # untrained steps are kept, not trimmed
    with pytest.raises(ValueError, match="train_steps_fraction = 0"):
        grpo.trained_steps(8, 0)


def test_the_step_window_can_start_later_in_the_denoising():
    """diffusion.train_steps_start: the window of trained steps starts that far from the high-noise end."""
    assert list(grpo.trained_steps(8, 0.5, 0.5)) == [4, 5, 6, 7]
    assert list(grpo.trained_steps(8, 0.25, 0.75)) == [6, 7]
    assert list(grpo.trained_steps(3, 0.1, 0.9)) == [2]  # at least one step, never past the last
    rollouts = [_rollout(0, 0, 2, 3, steps=(4, 4, 4)), _rollout(0, 1, 2, 3, steps=(4, 4, 4))]
    late = grpo.build_train_batch(rollouts, torch.tensor([1.0, -1.0]), train_steps=(0.5, 0.5))
    assert late.step_mask[0].tolist() == [False, False, True, True] * 3 and late.num_steps == 2 * 6
    with pytest.raises(ValueError, match="train_steps_start = 1"):
        grpo.trained_steps(8, 0.5, 1.0)


# ------------------------------------------------------------------------------------------ image objectives
def test_nft_loss_pulls_towards_better_images_and_pushes_from_worse_ones():
    """At the old policy the gradient is 2 beta (2r - 1)(f_old - x0) / scale: r = 1 regresses onto the image, r = 0
    away from it, r = 0.5 leaves the model where it is."""
    x0 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    old = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    prediction = old.clone().requires_grad_(True)
    r = torch.tensor([1.0, 0.0, 0.5])
    out = grpo.nft_loss(prediction, old, x0, r, beta=1.0)
    out.loss.sum().backward()
    towards = -(prediction.grad)  # a gradient step's direction
    assert towards[0].tolist() == pytest.approx([1.0, -1.0])  # 2 (x0 - old) / mean|old - x0| (0.5) / 2 pixels
    assert towards[1].tolist() == pytest.approx([-1.0, 1.0])
    assert towards[2].abs().max() == 0
    torch.testing.assert_close(out.positive, out.negative)  # both are the old policy's error at the start
    assert grpo.reward_probability(torch.tensor([-9.0, 0.0, 1.0]), 2.0).tolist() == [0.0, 0.5, 0.75]
    with pytest.raises(ValueError, match="reward_prob must be"):
        grpo.nft_loss(prediction, old, x0, r[:2], beta=1.0)


def test_image_objective_entries_name_their_options():
    assert grpo.image_objective(None) == ("trajectory", {})
    assert grpo.image_objective({"name": "nft", "beta": 0.5}) == ("nft", {"beta": 0.5, "adv_clip": 5.0})
    with pytest.raises(ValueError, match="unknown option"):
        grpo.image_objective({"name": "trajectory", "beta": 1.0})
    with pytest.raises(ValueError, match="adv_clip = 0"):
        grpo.image_objective({"name": "nft", "adv_clip": 0})


def test_doctests_of_the_grpo_modules():
    import doctest

    from core.grpo import batch, objectives

    for module in (batch, objectives):
        assert doctest.testmod(module).failed == 0, module.__name__


# ------------------------------------------------------------------------------- the estimators == the old function
def _reference_chain_advantages_before_estimators(
    parts: Sequence[Mapping[str, float]],
    totals: Sequence[float],
    weights: Mapping[str, float],
    group_size: int,
    text_rewards: Sequence[str] | None = None,
    image_rewards: Sequence[str] | None = None,
    section_rewards: Mapping[str, Sequence[str]] | None = None,
    section_tags: Sequence[str] = (),
    train_images: bool = True,
    scale_by_std: bool = True,
    eps: float = 1e-6,
    transforms: Sequence[Mapping[str, Any]] = (),
    generator: torch.Generator | None = None,
    branches: Sequence[Sequence[Mapping[str, float]]] | None = None,
    decoupled: bool = False,
    metric_weights: Mapping[str, float] | None = None,
    degradation_items: bool = False,
) -> grpo.ChainAdvantages:
    """REFERENCE ONLY, for the equivalence test below: ``core.grpo.advantages.chain_advantages`` as it was before the
    registered estimators replaced it (commit e41121e), copied verbatim but for the ``grpo.`` prefixes. Not used by
    anything else; it documents that ``rl.advantages.step_advantages`` computes exactly what it computed."""
    def expand(components: Sequence[str] | None) -> list[tuple[str, float]]:
        names = list(weights) if components is None else list(components)
        out: list[tuple[str, float]] = []
        for c in names:
            base = c.split("/", 1)[0]
            if base not in weights:
                raise ValueError(f"unknown reward components [{c!r}]; known: {sorted(weights)}")
            if decoupled and c == "generation" and metric_weights:
                total = sum(metric_weights.values()) or 1.0
                out += [(f"quality/{m}", weights[base] * w / total) for m, w in metric_weights.items() if w > 0]
            else:
                out.append((c, weights[base]))
        return out

    def rewards(rows: Sequence[Mapping[str, float]], components: Sequence[str] | None, size: int) -> torch.Tensor:
        if not decoupled:
            if components is None and rows is parts:
                return torch.tensor([float(t) for t in totals], dtype=torch.float32)
            return grpo.component_rewards(rows, weights, list(weights) if components is None else components)
        cols = [c for c, _ in expand(components)]
        values = torch.tensor([[float(p.get(c, math.nan)) for c in cols] for p in rows], dtype=torch.float32)
        present = [k for k in range(len(cols)) if not torch.isnan(values[:, k]).all()]  # not applicable: dropped
        w = torch.tensor([w for _, w in expand(components)], dtype=torch.float32)
        return grpo.decoupled_rewards(values[:, present], w[present], size, eps)

    text_key = None if text_rewards is None else list(text_rewards)
    image_key = None if image_rewards is None else list(image_rewards)
    columns = {"text": rewards(parts, text_rewards, group_size)}
    image_table: torch.Tensor | None = None
    image_flat: torch.Tensor | None = None
    if train_images and branches is not None and len(branches[0]) > 1:
        m = len(branches[0])
        if any(len(b) != m for b in branches) or len(branches) != len(parts):
            raise ValueError(f"branches: every one of the {len(parts)} chains needs {m} image branches")
        rows = [{**p, **b} for p, chain in zip(parts, branches) for b in chain]  # (N * M), chain-major
        image_table, image_flat = grpo.branch_advantages(rewards(rows, image_rewards, group_size * m).view(-1, m),
                                                         group_size, scale_by_std, eps)
    elif train_images and image_key != text_key:
        columns["image"] = rewards(parts, image_rewards, group_size)
    if section_rewards:
        unknown = sorted(set(section_rewards) - set(section_tags))
        if unknown:
            raise ValueError(f"section_rewards names {unknown}, not sections of {list(section_tags)}")
        for tag in section_tags:
            names = section_rewards.get(tag)
            columns[f"section/{tag}"] = columns["text"] if names is None else rewards(parts, names, group_size)
    if degradation_items:
        for item in DEGRADATION_ITEMS:
            columns[f"item/{item}"] = rewards(parts, [f"degradation/{item}"], group_size)
    table, groups = grpo.column_advantages(torch.stack(list(columns.values()), dim=1), group_size, scale_by_std, eps)
    if image_table is not None:  # a group stays while any column, or its images, can still teach something
        flat = groups.zero_variance & image_flat
        groups = grpo.GroupFilter(zero_variance=flat, keep=(~flat).repeat_interleave(group_size))
        table = torch.cat([table, image_table], dim=1)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    for spec in transforms:
        table = grpo.advantage_transform(spec)(table, group_size, generator)
    out = {name: table[:, i] for i, name in enumerate(columns)}
    sections = (torch.stack([out[f"section/{tag}"] for tag in section_tags], dim=1) if section_rewards
                else None)
    image_branches = table[:, len(columns):] if image_table is not None else None
    items = (torch.stack([out[f"item/{item}"] for item in DEGRADATION_ITEMS], dim=1) if degradation_items
             else None)
    return grpo.ChainAdvantages(text=out["text"],
                                image=image_branches[:, 0] if image_branches is not None else out.get("image"),
                                sections=sections, groups=groups, image_branches=image_branches, items=items)


def _reference_step_advantages(cfg, scores, seed):
    """The old ``rl.advantages.step_advantages``: every ``grpo.*`` knob passed to the reference function."""
    from rewards.total import metric_weights

    g = cfg.grpo
    return _reference_chain_advantages_before_estimators(
        [s.parts for s in scores], [s.total for s in scores], vars(cfg.reward.weights), g.group_size,
        text_rewards=g.text_rewards, image_rewards=g.image_rewards, section_rewards=g.section_rewards,
        section_tags=TEXT_TAGS, train_images=not cfg.diffusion.freeze, scale_by_std=g.scale_by_std, eps=g.eps,
        transforms=g.advantage_transforms, generator=torch.Generator().manual_seed(seed),
        branches=[s.branches for s in scores] if g.image_group_size > 1 else None,
        decoupled=g.decoupled_normalization, metric_weights=metric_weights(cfg.reward),
        degradation_items=bool(g.token_credit.get("degradation_items", False)))


SECTIONS = {"degradation": ["format/degradation", "degradation"], "rough_understand": ["understanding"],
            "final_understand": []}  # middle_understand unnamed: the text's


def _config_combinations():
    """Every combination of the advantage knobs (each validated: one the config allows), on configs/grpo_local.yaml."""
    from core.config import load_config
    from core.validation import validate

    base = load_config(ROOT / "configs/grpo_local.yaml")
    knobs = itertools.product((None, ["format"], ["format", "degradation"]),  # text_rewards
                              (None, ["generation"], ["format"]),  # image_rewards (["format"]: the text's, once)
                              ("chain", "section", "items"), (1, 4), (False, True),  # credit, M, diffusion.freeze
                              (False, True), (False, True), (False, True))  # decoupled, scale_by_std, placebo
    for text, image, credit, m, frozen, decoupled, scale, placebo in knobs:
        if frozen and m > 1:
            continue  # not allowed: a frozen SR model's image branches would train nothing
        g = replace(base.grpo, text_rewards=text, image_rewards=image, image_group_size=m,
                    token_credit={"name": "chain"} if credit == "chain" else
                    {"name": "section", "degradation_items": credit == "items"},
                    section_rewards=None if credit == "chain" else SECTIONS, decoupled_normalization=decoupled,
                    scale_by_std=scale, advantage_transforms=[{"name": "placebo_shuffle"}] if placebo else [],
                    **({"image_objective": {"name": "trajectory"}, "image_kl_beta": 0.0} if frozen else {}))
        cfg = replace(base, grpo=g, diffusion=replace(base.diffusion, freeze=frozen,
                                                      lora=None if frozen else base.diffusion.lora))
        validate(cfg)
        yield cfg


def _random_scores(rng: np.random.Generator, cfg, groups: int = 4) -> list[Scores]:
    """Scores of ``groups`` groups in group order: group 0 random; 1 flat in everything (its images tie too); 2 the
    same texts, other images; 3 random with labels missing (no degradation parts) and failed metrics. Sometimes no
    chain has an understanding part. Values on a coarse grid, so that ties also happen by chance."""
    from rewards.total import metric_weights

    size, m, mw = cfg.grpo.group_size, cfg.grpo.image_group_size, metric_weights(cfg.reward)
    pick = lambda values: float(values[rng.integers(len(values))])  # noqa: E731
    understanding = rng.random() < 0.7

    def text() -> dict[str, float]:
        out = {"format": pick([0.0, 0.5, 1.0]), "degradation": pick([0.0, 0.25, 0.5, 1.0]),
               **{f"format/{t}": pick([0.0, 1.0]) for t in TEXT_TAGS},
               **{f"degradation/{i}": pick([0.0, 1.0]) for i in DEGRADATION_ITEMS}}
        return {**out, "understanding": pick([0.0, 0.5, 1.0])} if understanding else out

    def image(fail: bool = False) -> dict[str, float]:
        q = {f"quality/{name}": pick([0.1, 0.4, 0.7, 0.9]) for name in mw if not (fail and name == "psnr")}
        return {**q, "generation": sum(mw[k.split("/")[1]] * v for k, v in q.items()) / sum(mw.values())}

    scores = []
    for k in range(groups):
        shared_text, shared_image = text(), image()
        for s in range(size):
            t = shared_text if k in (1, 2) else text()
            if k == 3 and rng.random() < 0.5:
                t = {c: v for c, v in t.items() if not c.startswith("degradation")}
            images = [shared_image] * m if k == 1 else [image(fail=k == 3 and rng.random() < 0.4) for _ in range(m)]
            shared = set.intersection(*(set(i) for i in images))
            parts = {**t, **{c: sum(i[c] for i in images) / m for c in shared}}
            total = sum(w * parts[c] for c, w in vars(cfg.reward.weights).items() if c in parts)
            scores.append(Scores(prompt_id=k, sample_index=s, parts=parts, total=total,
                                 branches=tuple(images) if m > 1 else ()))
    return scores


@pytest.fixture
def one_thread():
    """Thousands of ops on tensors of a few numbers: a thread pool only adds its overhead (10x on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_registered_estimators_give_exactly_what_the_17_parameter_chain_advantages_gave(one_thread):
    """Over every combination of the advantage knobs the config allows (text/image rewards None or set, section
    credit, item credit, image branches M > 1, decoupled on/off, scale_by_std on/off, the placebo, a frozen SR
    model) and randomised scores, ``rl.advantages.step_advantages`` (the config's plan run by
    ``grpo.estimate_advantages``) equals the old function's output bit for bit."""
    from rl.advantages import step_advantages

    rng, seen = np.random.default_rng(0), {"image": 0, "sections": 0, "items": 0, "image_branches": 0, "dropped": 0}
    for n, cfg in enumerate(_config_combinations()):
        scores = _random_scores(rng, cfg)
        new, old = step_advantages(cfg, scores, seed=n), _reference_step_advantages(cfg, scores, seed=n)
        for field in ("text", "image", "sections", "image_branches", "items"):
            a, b = getattr(new, field), getattr(old, field)
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), (field, cfg.grpo, cfg.diffusion)
            seen[field] = seen.get(field, 0) + (a is not None)
        assert torch.equal(new.groups.zero_variance, old.groups.zero_variance), (cfg.grpo, cfg.diffusion)
        assert torch.equal(new.groups.keep, old.groups.keep) and new.per_chain() == old.per_chain()
        seen["dropped"] += new.groups.num_filtered > 0
    assert n + 1 == 3 * 3 * 3 * 2 * 2 * 2 * (2 + 1)  # every combination ran (M > 1 only with the SR model trained)
    assert min(seen.values()) > 0, seen  # every column kind and the group filter were exercised


def test_the_config_plan_and_the_old_function_reject_the_same_mistakes():
    from rl.advantages import advantage_plan, step_advantages, step_rewards

    cfg = next(c for c in _config_combinations() if c.grpo.image_group_size > 1 and c.grpo.section_rewards)
    scores = _random_scores(np.random.default_rng(1), cfg)
    short = scores[:-1] + [replace(scores[-1], branches=scores[-1].branches[:2])]
    for fn in (step_advantages, _reference_step_advantages):
        with pytest.raises(ValueError, match="every one of the 16 chains needs 4 image branches"):
            fn(cfg, short, 0)
    odd = replace(cfg, grpo=replace(cfg.grpo, section_rewards={"rough_image": ["format"]}))  # not validated
    with pytest.raises(ValueError, match=r"section_rewards names \['rough_image'\], not sections of"):
        advantage_plan(odd, step_rewards(odd, scores))
    with pytest.raises(ValueError, match=r"section_rewards names \['rough_image'\]"):
        _reference_step_advantages(odd, scores, 0)
    bad = replace(cfg, grpo=replace(cfg.grpo, text_rewards=["style"]))
    for fn in (step_advantages, _reference_step_advantages):
        with pytest.raises(ValueError, match=r"unknown reward components \['style'\]"):
            fn(bad, scores, 0)


def test_a_chain_whose_reward_could_not_be_computed_is_left_out_of_its_group_never_scored_0():
    """Every metric of a chain's generation reward failed (total NaN): its group is normalised over the chains it
    kept, the lost chain gets advantage 0 and is not kept for the learner; a group that lost every chain is flat."""
    from core.config import load_config
    from rl.advantages import advantage_metrics, step_advantages

    cfg = load_config(ROOT / "configs/grpo_random_local.yaml", ["grpo.group_size=4", "grpo.prompts_per_step=3"])
    nan = float("nan")
    totals = [1.0, 2.0, nan, 4.0, 0.0, 1.0, 2.0, 3.0, nan, nan, nan, nan]
    scores = [Scores(i // 4, i % 4, {"format": t, "generation": t}, t) for i, t in enumerate(totals)]
    adv = step_advantages(cfg, scores, seed=0)
    kept_rows = torch.tensor([1.0, 2.0, 4.0])
    torch.testing.assert_close(adv.text[[0, 1, 3]], grpo.group_advantages(kept_rows, 3))
    torch.testing.assert_close(adv.text[4:8], grpo.group_advantages(torch.tensor([0.0, 1.0, 2.0, 3.0]), 4))
    assert adv.text[2] == 0 and (adv.text[8:] == 0).all()
    assert adv.scored.tolist() == [True, True, False, True] + [True] * 4 + [False] * 4
    assert adv.groups.zero_variance.tolist() == [False, False, True]
    assert adv.groups.keep.tolist() == [True, True, False, True] + [True] * 4 + [False] * 4
    assert advantage_metrics(adv, adv.groups.keep)["grpo/unscored_chains"] == 5.0
    whole = step_advantages(cfg, scores[4:8], seed=0)  # no chain lost: the estimate as before, nothing marked
    assert whole.scored is None and torch.equal(whole.text, adv.text[4:8])
