"""Rationale LM loss: targets are r and </think> only, head applied at those positions only."""

from __future__ import annotations

import math

import pytest
import torch

from mmemb.losses.lm import rationale_lm_loss, rationale_target_mask

THINK, END = 5, 6


def test_target_mask_covers_rationale_and_closing_tag():
    ids = torch.tensor([[1, 2, THINK, 3, 4, END, 9, 0],  # rationale 3 4, then </think>
                        [1, 2, 9, 0, 0, 0, 0, 0],  # direct: no targets
                        [THINK, 3, END, 1, THINK, 4, END, 9]])  # last think..end pair only
    m = rationale_target_mask(ids, THINK, END)
    assert m[0].nonzero().flatten().tolist() == [3, 4, 5]
    assert m[1].sum() == 0
    assert m[2].nonzero().flatten().tolist() == [5, 6]


class CountingHead(torch.nn.Module):
    """A linear head that records the shape it was applied to."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(w)
        self.seen = []

    def forward(self, h):
        self.seen.append(tuple(h.shape))
        return h @ self.w.T


def test_loss_by_hand_and_head_only_at_rationale_positions():
    # V = 7, H = 2: the head is the identity on classes 0 and 1, zero elsewhere.
    ids = torch.tensor([[2, THINK, 1, END, 0]])  # rationale = [1], then </think> (6)
    hid = torch.zeros(1, 5, 2)
    hid[0, 1] = torch.tensor([2.0, 0.0])  # at <think>: predicts token 1
    hid[0, 2] = torch.tensor([0.0, 1.0])  # at r_1: predicts </think>
    w = torch.zeros(7, 2)
    w[:2] = torch.eye(2)
    head = CountingHead(w)
    s, n = rationale_lm_loss(hid, ids, head, THINK, END)
    assert n == 2
    # position 1 -> target 1: logits [2, 0, 0...] (7 classes) -> -log(e^0 / (e^2 + 6))
    l1 = -math.log(1 / (math.exp(2) + 6))
    # position 2 -> target 6: logits [0, 1, 0...] -> -log(1 / (e + 6))
    l2 = -math.log(1 / (math.e + 6))
    assert float(s.detach()) == pytest.approx(l1 + l2, abs=1e-5)
    assert head.seen == [(2, 2)]  # [N, H], never [B, T, H]
    s.backward()
    assert head.w.grad is not None and float(head.w.grad.abs().sum()) > 0


def test_no_rationale_gives_zero_and_still_calls_head():
    head = CountingHead(torch.eye(2))
    s, n = rationale_lm_loss(torch.randn(2, 4, 2), torch.tensor([[1, 1, 1, 1]] * 2), head,
                             THINK, END)
    assert n == 0 and float(s.detach()) == 0.0
    assert head.seen == [(0, 2)]  # called on an empty selection (ZeRO-3 rank alignment)
