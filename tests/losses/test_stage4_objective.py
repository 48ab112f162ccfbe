"""The stage-4 objective: parts by hand, direct rows, the LM weight."""

from __future__ import annotations

import math

import pytest
import torch

from mmemb.losses.objective import Stage4Objective

Q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
T = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
L_DIRECT = (math.log(1 + math.exp(-0.8)) + math.log(1 + math.exp(-1.6))) / 2  # tau 0.5


def test_rows_without_rationale_use_the_direct_embedding():
    obj = Stage4Objective(alpha=0.5, lam=2.0, tau=0.5)
    out = obj.contrastive(Q, None, torch.tensor([False, False]), T)
    assert float(out.nce_reason) == pytest.approx(L_DIRECT, abs=1e-6)
    assert float(out.nce_direct) == pytest.approx(L_DIRECT, abs=1e-6)
    assert float(out.loss) == pytest.approx(1.5 * L_DIRECT, abs=1e-6)


def test_reasoning_rows_replace_their_query_in_the_first_term():
    obj = Stage4Objective(alpha=0.5, lam=2.0, tau=0.5)
    q_r = torch.tensor([[0.6, 0.8]])  # row 1's reasoning embedding == its positive
    out = obj.contrastive(Q, q_r, torch.tensor([False, True]), T)
    # row 1 in the first term: logits [0.6, 1.0] / 0.5 = [1.2, 2.0]
    l1_r = math.log(1 + math.exp(1.2 - 2.0))
    l0 = math.log(1 + math.exp(-0.8))
    assert float(out.nce_reason) == pytest.approx((l0 + l1_r) / 2, abs=1e-6)
    assert float(out.nce_direct) == pytest.approx(L_DIRECT, abs=1e-6)
    out = obj.add_lm(out, torch.tensor(6.0), lm_tokens=3)  # mean CE 2.0, lam 2.0
    assert float(out.lm) == pytest.approx(2.0)
    assert float(out.loss) == pytest.approx((l0 + l1_r) / 2 + 0.5 * L_DIRECT + 4.0, abs=1e-6)
    parts = out.parts()
    assert parts["loss/lm"] == pytest.approx(2.0) and parts["lm_tokens"] == 3
    assert set(parts) >= {"loss", "loss/nce_reason", "loss/nce_direct", "loss/lm",
                          "acc/in_batch_reason", "acc/in_batch_direct"}


def test_lm_weight_splits_the_mean_over_chunks():
    obj = Stage4Objective(lam=0.5)
    assert obj.lm_weight(10) == pytest.approx(0.05)  # sum_chunks 0.05 * s_c = 0.5 * mean
    assert obj.lm_weight(0) == 0.0


def test_mismatched_reasoning_rows_are_refused():
    with pytest.raises(ValueError, match="has_r marks 1"):
        Stage4Objective().contrastive(Q, None, torch.tensor([False, True]), T)
