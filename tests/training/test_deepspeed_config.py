"""TrainConfig validation and the DeepSpeed config derived from it."""

from __future__ import annotations

import math

import pytest

from mmemb.configs.base import ConfigError
from mmemb.configs.train import TrainConfig
from mmemb.training.deepspeed_config import ds_config, lr_lambda


def cfg(**kw) -> TrainConfig:
    return TrainConfig.from_dict({"model": "m", "pairs": "p", **kw})


def test_derived_from_the_pydantic_config():
    c = ds_config(cfg(batch_size=8, grad_accum=4, zero_stage=3, lr=3e-4, grad_clip=0.5),
                  world_size=2, device="cuda")
    assert c["train_micro_batch_size_per_gpu"] == 8
    assert c["gradient_accumulation_steps"] == 4
    assert c["train_batch_size"] == 8 * 4 * 2
    assert c["gradient_clipping"] == 0.5
    assert c["zero_optimization"]["stage"] == 3
    assert c["zero_optimization"]["overlap_comm"] is True  # a GPU side stream
    assert c["bf16"]["enabled"] is True  # auto: bf16 on GPU
    assert c["optimizer"]["type"] == "AdamW" and c["optimizer"]["params"]["lr"] == 3e-4
    assert "scheduler" not in c  # the LR schedule is a LambdaLR handed to initialize()


def test_cpu_is_fp32():
    c = ds_config(cfg(zero_stage=2), world_size=1, device="cpu")
    assert c["bf16"]["enabled"] is False and c["zero_optimization"]["overlap_comm"] is False
    # the gradcache default: ZeRO-1 without per-parameter gradient hooks
    assert ds_config(cfg(), 1, "cpu")["zero_optimization"] == {"stage": 1,
                                                               "contiguous_gradients": False}
    assert ds_config(cfg(precision="bf16"), 1, "cpu")["bf16"]["enabled"] is True
    assert ds_config(cfg(zero_stage=0), 1, "cpu")["zero_optimization"] == {"stage": 0}


def test_lr_schedules_by_hand():
    # warm-up 4 of 14 steps: (s + 1) / 4, then decay over the 10 remaining steps to 0.1
    f = lr_lambda(cfg(warmup_steps=4, steps=14), 14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # first step is not LR 0
    assert f(8) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # 0.55
    assert f(13) == pytest.approx(0.1)
    g = lr_lambda(cfg(warmup_steps=4, steps=14, lr_schedule="linear"), 14)
    assert g(8) == pytest.approx(0.1 + 0.9 * 0.5) and g(13) == pytest.approx(0.1)
    h = lr_lambda(cfg(warmup_steps=0, steps=14, lr_schedule="constant"), 14)
    assert h(0) == h(13) == 1.0
    short = lr_lambda(cfg(warmup_steps=10, steps=3), 3)  # a smoke run: warm-up capped at 2
    assert [short(s) for s in range(3)] == pytest.approx([0.5, 1.0, 0.1])


@pytest.mark.parametrize("kw, msg", [
    ({"pairs": None}, "no training data"),
    ({"lora": {"dropout": 0.1}}, "different dropout masks"),
    ({"lerning_rate": 1e-4}, "unknown key"),
    ({"zero_stage": 4}, "zero_stage"),
])
def test_bad_combinations_say_why(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        cfg(**kw)


def test_defaults_are_the_documented_ones():
    c = cfg()
    assert (c.tau, c.alpha, c.lam) == (0.02, 1.0, 0.5)
    assert c.gradcache and c.zero_stage == 1 and c.vision == "merger" and c.lora is None
    assert c.gradcache_reduce == "step"


def test_zero_stage_follows_gradcache_unless_set():
    # ZeRO-1 with gradcache (whole gradients: one reduce per optimizer step), ZeRO-2 without
    assert cfg().zero_stage == 1 and cfg(zero_stage=None).zero_stage == 1
    assert cfg(gradcache=False).zero_stage == 2
    assert cfg(zero_stage=2).zero_stage == 2 and cfg(gradcache=False, zero_stage=0).zero_stage == 0
    assert ds_config(cfg(), 1, "cpu")["zero_optimization"]["stage"] == 1
