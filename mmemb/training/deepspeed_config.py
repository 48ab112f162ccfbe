"""The DeepSpeed config, derived from a stage config (stage 4's ``TrainConfig``, stage 5's
``GateConfig``).

One source of truth: the user edits the pydantic config (validated, logged to MLflow), and
the DeepSpeed JSON is computed from it, written beside the run (``ds_config.json``) for
inspection, never edited by hand.

* batch: ``train_micro_batch_size_per_gpu = batch_size`` (queries per rank per micro-batch),
  ``gradient_accumulation_steps = grad_accum``; gradient caching needs no DeepSpeed setting
  (the stage marks accumulation boundaries itself, see :mod:`mmemb.losses.gradcache`).
* precision: bf16 on a GPU (fp32 master weights and optimizer states in ZeRO), fp32 on CPU.
* optimizer: AdamW (``torch_adam``: torch's implementation, which runs on CPU and GPU
  without compiling DeepSpeed's fused kernels).
* schedule: linear warm-up, then cosine / linear decay to ``min_lr_ratio`` or constant,
  transformers' schedules (:func:`hf_multiplier`). It
  is a torch ``LambdaLR`` handed to ``deepspeed.initialize`` (:func:`lr_lambda`), not a
  DeepSpeed ``scheduler`` entry: DeepSpeed's warm-up schedulers give LR 0 to the first two
  steps (they start from ``last_batch_iteration = -1``); this one gives ``lr / warmup`` to
  the first. DeepSpeed still saves and restores its state in every checkpoint.

Example::

    >>> from mmemb.configs.train import TrainConfig
    >>> c = ds_config(TrainConfig(model="m", pairs="p", batch_size=8, zero_stage=3),
    ...               world_size=2, device="cpu")
    >>> c["train_batch_size"], c["zero_optimization"]["stage"], c["bf16"]["enabled"]
    (16, 3, False)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from mmemb.configs.train import TrainConfig


class OptimSettings(Protocol):
    """What both training stages' configs give the DeepSpeed JSON."""

    zero_stage: int
    precision: str
    grad_clip: float
    lr: float
    betas: tuple[float, float]
    weight_decay: float


def use_bf16(cfg: OptimSettings, device: str) -> bool:
    if cfg.precision == "auto":
        return device == "cuda"
    return cfg.precision == "bf16"


def ds_config(cfg: OptimSettings, world_size: int, device: str, *,
              micro_batch: int | None = None, grad_accum: int | None = None) -> dict:
    """DeepSpeed JSON for this run (``device``: 'cuda' or 'cpu').

    ``micro_batch``/``grad_accum`` default to the config's ``batch_size``/``grad_accum``
    (stage 4); stage 5 passes 1/1 (one GRPO batch per optimizer step)."""
    micro = micro_batch if micro_batch is not None else cfg.batch_size  # type: ignore[attr-defined]
    accum = grad_accum if grad_accum is not None else cfg.grad_accum  # type: ignore[attr-defined]
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 1:
        # ZeRO-1 reduces once, at the boundary; contiguous_gradients (DeepSpeed's default)
        # would only add a gradient hook per parameter to every backward (GradCache: one
        # per chunk), measured 5% of a gradcache step on the tiny model
        zero["contiguous_gradients"] = False
    if cfg.zero_stage >= 2:
        # overlap_comm needs a side stream (GPU); on CPU it only adds buffers.
        zero.update({"contiguous_gradients": True, "overlap_comm": device == "cuda",
                     "reduce_bucket_size": 5e7})
    if cfg.zero_stage == 3:
        zero.update({"stage3_param_persistence_threshold": 1e4,
                     "stage3_gather_16bit_weights_on_model_save": True})
    bf16 = use_bf16(cfg, device)
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.lr, "betas": list(cfg.betas), "eps": 1e-8,
            "weight_decay": cfg.weight_decay, "torch_adam": True, "adam_w_mode": True}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def hf_multiplier(name: str, warmup: int, total: int, **kwargs) -> Callable[[int], float]:
    """transformers' schedule ``name`` as an LR multiplier of optimizer step ``s`` (0-based).

    Why one step ahead (``s + 1``): transformers' warm-ups start at LR 0 on their step 0,
    which would waste the first optimizer step; ours gives ``lr / warmup`` to the first
    (module doc). The multiplier is read from a scheduler built on a throwaway one-parameter
    optimizer (peak LR 1), so the real optimizer is touched by one ``LambdaLR`` only and its
    saved state (``last_epoch`` = steps taken) is unchanged.
    """
    import torch
    from transformers import get_scheduler

    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    f = get_scheduler(name, dummy, num_warmup_steps=warmup, num_training_steps=total,
                      scheduler_specific_kwargs=kwargs or None).lr_lambdas[0]
    return lambda s: f(s + 1)


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """LR multiplier for optimizer step ``s`` (0-based): ``(s + 1) / warmup`` while warming
    up, then decaying so the last step (``total - 1``) runs at ``min_lr_ratio``.

    cosine: transformers' ``cosine_with_min_lr``; linear: its ``polynomial`` decay of power 1
    down to ``min_lr_ratio`` (its ``linear`` ends at 0); constant: ``constant_with_warmup``.

    >>> from mmemb.configs.train import TrainConfig
    >>> f = lr_lambda(TrainConfig(model="m", pairs="p", warmup_steps=4, steps=14), 14)
    >>> [round(f(s), 3) for s in (0, 3, 4, 13)]
    [0.25, 1.0, 0.978, 0.1]
    """
    warm, lo = min(cfg.warmup_steps, max(0, total_steps - 1)), cfg.min_lr_ratio
    if cfg.lr_schedule == "cosine":
        return hf_multiplier("cosine_with_min_lr", warm, total_steps, min_lr_rate=lo)
    if cfg.lr_schedule == "linear" and lo < 1:  # lo = 1: no decay (polynomial refuses it)
        return hf_multiplier("polynomial", warm, total_steps, lr_end=lo, power=1.0)
    return hf_multiplier("constant_with_warmup", warm, total_steps)


def lr_scheduler(cfg: TrainConfig, total_steps: int, warmup_phase: int = 0):
    """The ``lr_scheduler`` argument of ``deepspeed.initialize`` (a factory of the optimizer).

    ``warmup_phase`` > 0 (stage 4's rationale warm-up): those first steps warm up linearly
    and then hold the peak LR (measured on the demo: decaying it left the rationale LM at
    0.32 nats/token instead of 0.16 after 400 steps); the remaining steps get the full
    schedule afresh, so the joint phase starts at the peak LR."""
    import torch

    if warmup_phase <= 0:
        f = lr_lambda(cfg, total_steps)
    else:
        f1 = hf_multiplier("constant_with_warmup", max(1, min(cfg.warmup_steps, warmup_phase)),
                           warmup_phase)
        f2 = lr_lambda(cfg, total_steps - warmup_phase)
        f = lambda s: f1(s) if s < warmup_phase else f2(s - warmup_phase)  # noqa: E731
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, f)


def constant_lr_scheduler(warmup_steps: int):
    """Stage 5's ``lr_scheduler`` factory: linear warm-up over ``max(1, warmup_steps)``
    optimizer steps (the first at ``lr / warmup``), then the peak LR."""
    import torch

    f = hf_multiplier("constant_with_warmup", max(1, warmup_steps), max(1, warmup_steps))
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, f)
