"""One gradient reduce per optimizer step under gradient caching, whatever the ZeRO stage.

GradCache (:mod:`mmemb.losses.gradcache`) makes one ``engine.backward`` per chunk, so one
optimizer step is many backwards (chunks x micro-batches). What each ZeRO stage does with
them (DeepSpeed 0.19.8, ``runtime/engine.py`` ``allreduce_gradients`` and
``runtime/zero/stage_1_and_2.py``):

* ZeRO-0 and ZeRO-1 keep whole gradients: the backwards accumulate into ``param.grad``
  locally and the engine reduces once, at the accumulation boundary (ZeRO-0:
  ``buffered_allreduce_fallback``; ZeRO-1: ``reduce_gradients``). One reduce per step
  already, nothing to do.
* ZeRO-2 partitions gradients *in backward hooks*: every backward copies each gradient
  into a bucket and reduce-scatters it (``reduce_ipg_grads`` / ``average_tensor``), on
  every chunk, boundary or not. ZeRO-3 does the same (``reduce_ready_partitions_and_remove_
  grads``). That is the per-chunk cost measured on the H100 (docs/bench.md).

For ZeRO-2/3 DeepSpeed offers ``engine.coalesce_grad_reduction()``: inside the block the
backward hooks only accumulate locally, and leaving it runs one reduction pass over the
accumulated gradients (one bucketed reduce-scatter), after which ``engine.step()`` proceeds
as usual. :func:`one_reduce_per_step` wraps the backwards of one optimizer step in it.

What it trades, per rank, with N data-parallel ranks (bytes per trainable parameter;
bf16 weights, fp32 master weights and AdamW moments in ZeRO's partitions, gradients in the
weights' dtype, which is DeepSpeed's default ``grad_accum_dtype``):

=====================  ======  ==============  ===============  ===================
setup                  params  gradients       optimizer (fp32  reduces per step
                                               master + m + v,
                                               fp32 grad part.)
=====================  ======  ==============  ===============  ===================
ZeRO-1 (default)       2       2 (whole)       16 / N           1
ZeRO-2, per backward   2       2 / N + bucket  16 / N           chunks x micro-batches
ZeRO-2, one per step   2       2 (whole)       16 / N (+2 / N)  1
ZeRO-3, one per step   2 / N   2 (whole)       16 / N (+2 / N)  1 (+ weight gathers)
=====================  ======  ==============  ===============  ===================

(bucket: ``reduce_bucket_size`` elements, 5e7 here = 100 MB in bf16.) Holding whole
gradients through the step is what one reduce per step costs, so ZeRO-2 with one reduce
per step uses ZeRO-1's memory plus its own partition buffer: ZeRO-1 is the default with
``gradcache`` (``TrainConfig.zero_stage``), and ZeRO-2 keeps its gradient partitioning only
with ``gradcache_reduce: backward``, paying one reduce per chunk. At Qwen3-VL-4B (4.4e9
parameters) on 8 ranks: ZeRO-1 8.8 + 8.8 + 8.8 = 26.4 GB per rank, ZeRO-2 per backward 8.8
+ 1.1 + 0.1 + 8.8 = 18.8 GB (activations come on top; GradCache bounds them by the chunk).

:func:`count_reduces` counts the gradient-reducing collectives DeepSpeed issues (its
``deepspeed.comm`` calls), for the test and the benchmark.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Literal

GradcacheReduce = Literal["step", "backward"]

#: ``deepspeed.comm`` functions that reduce a tensor across ranks
REDUCE_OPS = ("all_reduce", "all_reduce_coalesced", "inference_all_reduce", "reduce",
              "reduce_scatter", "reduce_scatter_fn", "reduce_scatter_tensor")


def coalesces(zero_stage: int, gradcache: bool, mode: GradcacheReduce) -> bool:
    """Does this setup hold the step's gradients and reduce them once at its end?

    Only ZeRO-2/3 reduce inside backward; below that there is nothing to coalesce."""
    return gradcache and zero_stage >= 2 and mode == "step"


def one_reduce_per_step(engine, zero_stage: int, gradcache: bool,
                        mode: GradcacheReduce = "step") -> contextlib.AbstractContextManager:
    """Context for all backwards of one optimizer step (call ``engine.step()`` after it).

    ZeRO-2/3 with gradcache and ``mode == "step"``: DeepSpeed's
    ``coalesce_grad_reduction`` (one reduction pass on leaving); otherwise a no-op, since
    ZeRO-0/1 reduce once at the accumulation boundary by themselves."""
    if coalesces(zero_stage, gradcache, mode):
        return engine.coalesce_grad_reduction()
    return contextlib.nullcontext()


def describe(zero_stage: int, gradcache: bool, mode: GradcacheReduce) -> str:
    """One line for the run log: how gradients are reduced in this setup."""
    if not gradcache:
        return f"ZeRO-{zero_stage}, one backward per micro-batch"
    if zero_stage < 2:
        return (f"ZeRO-{zero_stage}: whole gradients accumulated locally over the chunks, "
                "one reduce per optimizer step")
    if mode == "step":
        return (f"ZeRO-{zero_stage} with gradcache_reduce=step: whole gradients held through "
                "the step (ZeRO-1's gradient memory), one reduce-scatter per optimizer step; "
                "zero_stage 1 does the same with less machinery")
    return (f"ZeRO-{zero_stage} with gradcache_reduce=backward: partitioned gradients, one "
            "reduce per chunk backward (set gradcache_reduce: step, or zero_stage 1, for one "
            "per optimizer step)")


@contextlib.contextmanager
def count_reduces() -> Iterator[Counter]:
    """Count DeepSpeed's reducing collectives while inside: ``{op name: calls}``.

    Wraps the ``deepspeed.comm`` functions ZeRO and the engine call (``dist.all_reduce``
    etc., looked up on the module at call time), so every reduce is seen once, whatever the
    backend (gloo, NCCL, DeepSpeed's CPU shm op)."""
    import deepspeed.comm as dist

    counts: Counter = Counter()
    saved = {name: getattr(dist, name) for name in REDUCE_OPS if hasattr(dist, name)}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return counted

    for name, fn in saved.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
