"""Gradient caching (GradCache, Gao et al. 2021): a contrastive batch larger than memory.

The contrastive loss couples every query with every target, so it cannot be split into
independent micro-batches. But its gradient with respect to the *embeddings* is small
([N, H]). So one step is:

1. embed every chunk without a graph (activation memory of one chunk at a time);
2. make the embeddings leaves, compute the loss on them and ``backward`` to get
   ``g = dL/de`` for every embedding;
3. for each chunk again, with a graph: ``e = f(chunk)``, backprop the surrogate
   ``(e * g).sum()`` (+ any per-chunk loss, here the rationale LM term) into the weights.

Step 3's weight gradients sum to exactly the full-batch gradient, since
``dL/dθ = Σ_chunks (dL/de)ᵀ de/dθ``. It needs a forward without randomness that differs
between steps 1 and 3 (Qwen-VL has no dropout; a model with dropout would need its RNG
state replayed).

Under DeepSpeed every chunk of step 3 is one ``engine(...)`` + ``engine.backward(...)``; the
caller's ``backward(loss, is_last)`` marks the gradient-accumulation boundary on the last
chunk only (``engine.set_gradient_accumulation_boundary``) and the optimizer steps once.
The chunk gradients are reduced across ranks once per step: ZeRO-0/1 do that at the
boundary, ZeRO-2/3 inside :func:`mmemb.training.reduction.one_reduce_per_step`. Step 1 may
merge several chunks per forward (``embed``; no graph, so one layer's activations at a
time). See :mod:`mmemb.stages.train` and docs/training.md.

Example (plain torch; two chunks of a linear encoder)::

    >>> import torch
    >>> enc = torch.nn.Linear(2, 2)
    >>> chunks = [Chunk("q", torch.eye(2)), Chunk("t", torch.eye(2))]
    >>> encode = lambda cs, with_lm: [(enc(c.batch), None) for c in cs]
    >>> loss_fn = lambda reps: Out((reps["q"] * reps["t"]).sum())
    >>> res = gradcache_step(chunks, encode, loss_fn, lambda loss, last: loss.backward())
    >>> enc.weight.grad is not None
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class Chunk:
    """One forward's worth of inputs: a group name (which embeddings it holds) and a batch."""

    group: str  # e.g. "q_direct", "q_reason", "pos", "neg"
    batch: Any  # what ``encode`` consumes (tokenised tensors here)
    lm: bool = False  # also compute the per-chunk LM sum (reasoning-mode queries)
    n_tokens: int = 0  # non-padding tokens (throughput logging)
    meta: dict = field(default_factory=dict)


class HasLoss(Protocol):
    loss: torch.Tensor


@dataclass
class Out:
    """Minimal loss holder (doctest and simple callers)."""

    loss: torch.Tensor


#: encode(chunks, with_lm) -> per chunk (embeddings [b, H], LM sum [] or None)
EncodeFn = Callable[[list[Chunk], bool], list[tuple[torch.Tensor, torch.Tensor | None]]]
#: loss_fn({group: [n_group, H]}) -> object with ``.loss``
LossFn = Callable[[dict[str, torch.Tensor]], HasLoss]
#: backward(loss, is_last_backward_of_the_step)
BackwardFn = Callable[[torch.Tensor, bool], None]


@dataclass
class StepResult:
    out: Any  # what loss_fn returned (its ``loss`` without the LM part)
    lm_sum: torch.Tensor  # [] summed per-chunk LM loss (detached)
    n_backward: int  # backward calls made


def _by_group(chunks: list[Chunk], embs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    groups: dict[str, list[torch.Tensor]] = {}
    for c, e in zip(chunks, embs, strict=True):
        if not c.meta.get("dummy"):  # padding chunks (rank alignment) never reach the loss
            groups.setdefault(c.group, []).append(e)
    return {g: torch.cat(es, dim=0) for g, es in groups.items()}  # {g: [n_g, H]}


def plain_step(chunks: list[Chunk], encode: EncodeFn, loss_fn: LossFn, backward: BackwardFn,
               lm_weight: float = 0.0) -> StepResult:
    """The reference: every chunk with a graph in one forward call, one backward."""
    outs = encode(chunks, True)
    reps = _by_group(chunks, [e for e, _ in outs])
    out = loss_fn(reps)
    lm = [s for _, s in outs if s is not None]
    lm_sum = torch.stack(lm).sum() if lm else torch.zeros((), device=out.loss.device)
    backward(out.loss + lm_weight * lm_sum, True)
    return StepResult(out, lm_sum.detach(), 1)


#: embed(chunks) -> per chunk its embeddings [b, H], computed without a graph
EmbedFn = Callable[[list[Chunk]], list[torch.Tensor]]


def gradcache_step(chunks: list[Chunk], encode: EncodeFn, loss_fn: LossFn,
                   backward: BackwardFn, lm_weight: float = 0.0,
                   embed: EmbedFn | None = None) -> StepResult:
    """GradCache: no-graph embed, loss + embedding gradients, chunk-wise re-forward/backward.

    ``lm_weight`` multiplies each chunk's LM sum in its surrogate (the caller passes
    ``lam / total_rationale_tokens``), so the LM gradient is exact as well. ``embed``
    replaces the no-graph pass (default: one ``encode`` per chunk); the stage merges
    several chunks per no-graph forward (:func:`mmemb.training.module.merged_embed`), as a
    forward without a graph keeps one layer's activations, not every layer's.
    """
    # 1. embeddings without a graph
    with torch.no_grad():
        if embed is not None:
            cached = [e.detach() for e in embed(chunks)]  # each [b, H]
        else:
            cached = [encode([c], False)[0][0].detach() for c in chunks]  # each [b, H]
    # 2. loss and dL/de on leaves
    leaves = [e.requires_grad_(True) for e in cached]
    reps = _by_group(chunks, leaves)
    out = loss_fn(reps)
    out.loss.backward()
    grads = [e.grad if e.grad is not None else torch.zeros_like(e) for e in leaves]
    out.loss = out.loss.detach()
    # 3. chunk by chunk with a graph: backprop the cached gradient (+ the chunk's LM part)
    lm_sum = torch.zeros((), device=cached[0].device if cached else None)
    for i, (c, g) in enumerate(zip(chunks, grads, strict=True)):
        e, lm = encode([c], c.lm)[0]
        surrogate = (e * g.to(e.dtype)).sum()
        if lm is not None:
            surrogate = surrogate + lm_weight * lm
            lm_sum = lm_sum + lm.detach()
        backward(surrogate, i == len(chunks) - 1)
    return StepResult(out, lm_sum, len(chunks))
