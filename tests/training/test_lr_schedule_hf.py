"""The LR schedules come from transformers and keep the hand-written shape step for step."""

from __future__ import annotations

import math

import pytest
import torch

from mmemb.configs.train import TrainConfig
from mmemb.training.deepspeed_config import constant_lr_scheduler, lr_lambda, lr_scheduler


def by_hand(schedule: str, warmup: int, lo: float, total: int, s: int) -> float:
    """The schedule as it was written before transformers' (the reference)."""
    warm = min(warmup, max(0, total - 1))
    if s < warm:
        return (s + 1) / warm
    p = min(1.0, (s - warm + 1) / max(1, total - warm))
    if schedule == "cosine":
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * p))
    if schedule == "linear":
        return lo + (1 - lo) * (1 - p)
    return 1.0


def lrs(factory, n: int, lr: float = 1e-3) -> list[float]:
    """The LR an optimizer runs each of its first ``n`` steps at, as DeepSpeed drives it."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = factory(opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup, total, lo", [(4, 14, 0.1), (0, 7, 0.0), (10, 3, 0.1),
                                               (3, 20, 1.0), (1, 2, 0.5), (5, 6, 0.25)])
def test_train_schedule_equals_the_hand_written_one(schedule, warmup, total, lo):
    cfg = TrainConfig(model="m", pairs="p", warmup_steps=warmup, steps=total,
                      lr_schedule=schedule, min_lr_ratio=lo)
    f = lr_lambda(cfg, total)
    for s in range(total):
        assert f(s) == pytest.approx(by_hand(schedule, warmup, lo, total, s), rel=1e-14,
                                     abs=1e-15), s
    got = lrs(lr_scheduler(cfg, total), total)
    assert got == pytest.approx([1e-3 * by_hand(schedule, warmup, lo, total, s)
                                 for s in range(total)], rel=1e-14, abs=1e-18)


def test_two_phase_schedule_holds_the_peak_then_restarts():
    cfg = TrainConfig(model="m", pairs="p", warmup_steps=3, steps=10)
    got = lrs(lr_scheduler(cfg, 15, warmup_phase=5), 15)
    want = [min(1.0, (s + 1) / 3) for s in range(5)] + \
        [by_hand("cosine", 3, 0.1, 10, s) for s in range(10)]
    assert got == pytest.approx([1e-3 * w for w in want], rel=1e-14)


@pytest.mark.parametrize("warmup", [0, 1, 4])
def test_gate_schedule_is_linear_warmup_then_constant(warmup):
    w = max(1, warmup)
    assert lrs(constant_lr_scheduler(warmup), 8) == \
        pytest.approx([1e-3 * min(1.0, (s + 1) / w) for s in range(8)], rel=1e-15)
