"""GRPO advantages and loss against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from mmemb.losses.grpo import group_advantages, grpo_loss


def test_group_advantages_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    a = group_advantages(r, eps=0.0 + 1e-12)
    # Row 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.5 / 0.57735.
    s = 0.5 / math.sqrt(1 / 3)
    torch.testing.assert_close(a[0], torch.tensor([s, -s, -s, s]))
    # Row 1: no spread, no signal.
    torch.testing.assert_close(a[1], torch.zeros(4))
    torch.testing.assert_close(group_advantages(r, scale=False)[0],
                               torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_clipped_surrogate_and_clip_fraction():
    lp = torch.log(torch.tensor([[0.5], [0.5]]))
    old = torch.log(torch.tensor([[0.4], [0.4]]))  # ratio 1.25 for both
    adv = torch.tensor([1.0, -1.0])
    out = grpo_loss(lp, old, lp, adv, torch.ones(2, 1), beta=0.0)
    # A=+1: min(1.25, 1.2) = 1.2 -> -1.2 ; A=-1: min(-1.25, -1.2) = -1.25 -> +1.25
    assert out.loss.item() == pytest.approx((-1.2 + 1.25) / 2)
    assert out.clip_fraction.item() == pytest.approx(0.5)  # only the A>0 token is clipped
    assert out.ratio_mean.item() == pytest.approx(1.25)


def test_kl_term_k3_and_aggregation():
    lp = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    ref = torch.log(torch.tensor([[0.25, 0.25, 0.25], [0.25, 0.25, 0.25]]))
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([1.0, 0.0])
    out = grpo_loss(lp, lp.detach(), ref, adv, mask, beta=0.5, aggregation="sequence")
    kl = 0.5 - math.log(0.5) - 1  # exp(d) - d - 1 with d = log(0.25 / 0.5)
    # seq 0: -(1 - 0.5 kl) over 1 token; seq 1: -(0 - 0.5 kl) over 3 tokens; mean of both.
    want = (-(1 - 0.5 * kl) + 0.5 * kl) / 2
    assert out.loss.item() == pytest.approx(want, rel=1e-5)
    assert out.kl.item() == pytest.approx(kl, rel=1e-5)
    tok = grpo_loss(lp, lp.detach(), ref, adv, mask, beta=0.5, aggregation="token")
    assert tok.loss.item() == pytest.approx((-(1 - 0.5 * kl) + 3 * 0.5 * kl) / 4, rel=1e-5)


def test_gradient_pushes_up_positive_advantage_tokens():
    logits = torch.zeros(2, 2, requires_grad=True)  # two rollouts, one token each
    lp = torch.log_softmax(logits, -1)[:, :1]  # [2, 1] log p(action 0)
    out = grpo_loss(lp, lp.detach(), lp.detach(), torch.tensor([1.0, -1.0]), torch.ones(2, 1))
    out.loss.backward()
    assert logits.grad[0, 0] < 0 < logits.grad[1, 0]  # descent raises row 0, lowers row 1
