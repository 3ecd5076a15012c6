"""learner.off_policy's Correction on hand-made log-probs (no model): the engine gap's correction
(grpo.engine_correction) takes the learner's first epoch as the old policy with truncated importance weights of
learner over engine, measures the gap on the on-policy rows only, and ``none`` leaves the engine's log-probs."""

import math

import pytest
import torch

from learner.off_policy import Correction

# two rows of three tokens; row 1's last position is padding
LEARNER = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.2, -3.0]])
ENGINE = torch.tensor([[-1.0, -2.5, -0.5], [-0.5, -0.2, 0.0]])
MASK = torch.tensor([[True, True, True], [True, True, False]])


def test_tis_takes_the_learner_as_old_and_weights_learner_over_engine_truncated():
    fix = Correction(cap=2.0, text_rows=torch.tensor([True, True]), on_policy=torch.tensor([True, True]),
                     clip=(0.2, 0.28))
    old, weights = fix.text(LEARNER.clone().requires_grad_(), ENGINE, MASK)
    assert torch.equal(old, LEARNER)  # the ratio's old policy: the learner's own first epoch
    expected = torch.tensor([[1.0, min(math.exp(0.5), 2.0), 1.0], [math.exp(-1.0), 1.0, 1.0]])
    torch.testing.assert_close(weights, expected)  # padding gets 1 (its loss is 0)
    assert fix.sums["text_tokens"] == 5 and fix.sums["text_truncated"] == 0  # exp(0.5) = 1.65 < cap 2
    # the gap: |0| + |0.5| + |0| + |1.0| + |0| over 5 tokens; two tokens' ratios (1.65, 0.37) leave [0.8, 1.28]
    assert fix.sums["gap_abs"] == pytest.approx(1.5) and fix.sums["gap_tokens"] == 5
    assert fix.sums["gap_clipped"] == 2
    again_old, again_w = fix.text(LEARNER + 1.0, ENGINE, MASK)  # a later epoch reuses the first epoch's
    assert torch.equal(again_old, LEARNER) and torch.equal(again_w, weights) and fix.sums["gap_tokens"] == 5


def test_the_gap_is_measured_on_the_on_policy_rows_only():
    fix = Correction(cap=2.0, text_rows=torch.tensor([True, True]), on_policy=torch.tensor([True, False]))
    fix.text(LEARNER, ENGINE, MASK)
    assert fix.sums["gap_tokens"] == 3 and fix.sums["gap_abs"] == pytest.approx(0.5)


def test_none_keeps_the_engines_log_probs_and_still_measures_the_gap():
    fix = Correction(cap=2.0, text_rows=None, on_policy=torch.tensor([True, True]))
    old, weights = fix.text(LEARNER, ENGINE, MASK)
    assert old is ENGINE and weights is None and fix.sums["gap_tokens"] == 5
