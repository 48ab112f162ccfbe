"""InfoNCE against hand-computed values: temperature, hard negatives, duplicate masking."""

from __future__ import annotations

import math

import pytest
import torch

from mmemb.losses.infonce import info_nce

Q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
T = torch.tensor([[1.0, 0.0], [0.6, 0.8]])


def test_two_pairs_by_hand():
    # logits / tau=0.5: row0 [2.0, 1.2], row1 [0.0, 1.6]; labels [0, 1]
    out = info_nce(Q, T, tau=0.5)
    l0 = math.log(1 + math.exp(1.2 - 2.0))
    l1 = math.log(1 + math.exp(0.0 - 1.6))
    assert float(out.loss) == pytest.approx((l0 + l1) / 2, abs=1e-6)  # 0.277501
    assert float(out.loss) == pytest.approx(0.277501, abs=1e-6)
    assert float(out.accuracy) == 1.0
    assert out.labels.tolist() == [0, 1] and out.n_candidates == 2


def test_default_temperature_is_002():
    t = torch.tensor([[1.0, 0.0], [0.99, 0.141]])
    out = info_nce(Q, t)  # tau = 0.02: logits row0 [50, 49.5], row1 [0, 7.05]
    l0 = math.log(1 + math.exp((0.99 - 1.0) / 0.02))
    l1 = math.log(1 + math.exp((0.0 - 0.141) / 0.02))
    assert float(out.loss) == pytest.approx((l0 + l1) / 2, abs=1e-5)  # 0.237475


def test_hard_negatives_are_extra_columns_per_query():
    neg = torch.tensor([[[0.0, 1.0]], [[0.0, 0.0]]])  # [B=2, K=1, H]
    mask = torch.tensor([[True], [False]])  # row 1 has no hard negative
    out = info_nce(Q, T, tau=0.5, hard_neg=neg, hard_neg_mask=mask)
    l0 = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(1.2) + math.exp(0.0)))
    l1 = math.log(1 + math.exp(-1.6))  # its masked column does not count
    assert float(out.loss) == pytest.approx((l0 + l1) / 2, abs=1e-6)
    assert out.logits.shape == (2, 3) and out.n_candidates == 3
    assert math.isinf(float(out.logits[1, 2]))


def test_duplicate_positive_is_not_a_negative():
    keys = torch.tensor([7, 7])  # both rows have the same target content
    out = info_nce(Q, T, tau=0.5, keys=keys)
    assert float(out.loss) == pytest.approx(0.0, abs=1e-7)  # only the positive is left
    neg_keys = torch.tensor([[7], [3]])  # row 0's hard negative equals its positive: masked
    neg = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    out = info_nce(Q, T, tau=0.5, keys=keys, hard_neg=neg, neg_keys=neg_keys)
    l1 = math.log(1 + math.exp(0.0 - 1.6))  # row 1: positive 1.6 vs hard negative 0.0
    assert float(out.loss) == pytest.approx(l1 / 2, abs=1e-6)


def test_gradient_pushes_positive_up_and_negative_down():
    q = Q.clone().requires_grad_(True)
    t = T.clone().requires_grad_(True)
    info_nce(q, t, tau=0.5).loss.backward()
    # d loss / d q0 = (softmax - onehot) @ t / tau / B ; softmax0 = [s, 1 - s]
    s = 1 / (1 + math.exp(-0.8))
    expect = ((s - 1) * T[0] + (1 - s) * T[1]) / 0.5 / 2
    assert torch.allclose(q.grad[0], expect, atol=1e-6)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"must both be \[B, H\]"):
        info_nce(Q, T[:1])
