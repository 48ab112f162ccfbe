"""GradCache under DeepSpeed ZeRO-1, ZeRO-2 and ZeRO-3 (one CPU process, gloo): the gradient at
the accumulation boundary equals the plain full-batch gradient of plain torch, and the
weights after optimizer steps equal those of the same run without gradient caching. The
backwards of a step run inside ``one_reduce_per_step`` as in stage 4 (ZeRO-2/3: DeepSpeed's
``coalesce_grad_reduction``, one reduce per step; the per-backward reduce is checked in
test_gradcache_reduce_count.py).

Tolerances, and why they hold on any machine (issue 13, item 22). GradCache sums each
gradient over 8+ chunk backwards where the reference sums it in one, so the two differ by
float32 rounding, and that rounding depends on the CPU kernels torch picks (AVX-512, AVX2,
SSE; MKL/oneDNN code paths) and the thread count. DeepSpeed's shm comm op is not involved:
with one rank it reduces nothing, and the gradients with and without it are bit-identical.
An elementwise ``allclose(rtol=1e-4, atol=1e-6)`` judged entries that are near zero
because their terms cancel, where the error is relative to the terms, not to the result:
measured at 0.36-0.70 of that tolerance across kernel choices on one machine, so another
machine failed it (embed_tokens.weight). Hence:

* gradients: ``|a - ref| <= 1e-4 |ref| + 1e-4 max|ref|`` per tensor (the error of a sum
  scales with its terms). Measured worst 0.041 of it (AVX-512 / AVX2 / SSE, MKL and oneDNN
  limited to AVX2, 1 or 2 threads); a 0.1% error in the temperature scores 6.0.
* weights: Adam's ``g / sqrt(v)`` maps near-zero gradient entries to updates of order lr,
  so a last-bit gradient difference can move one entry by up to ~lr; an elementwise bound
  cannot hold (the former ``atol=1e-4`` failed here too: 2.3e-4 with AVX-512 kernels,
  5.6e-4 with AVX2). Over all trainable weights, ``|w_gc - w_plain|`` must be <= 1% of
  how far the weights moved (measured <= 1.1e-4; the 0.1% temperature error: 1.9e-2),
  and at most 0.1% of entries may differ by more than 1e-4 (measured <= 0.0014%; that
  error: 17%).
"""

from __future__ import annotations

import os

import pytest
import torch

from mmemb.configs.train import TrainConfig
from mmemb.losses.gradcache import gradcache_step, plain_step
from mmemb.losses.objective import Stage4Objective
from mmemb.model.embedder import Embedder
from mmemb.stages.train import build_items, make_loss_fn, prepare_model
from mmemb.training.data import load_rows
from mmemb.training.deepspeed_config import ds_config, lr_scheduler
from mmemb.training.distributed import free_port, init_deepspeed
from mmemb.training.module import EmbedTrainModule, make_chunks, merged_embed
from mmemb.training.reduction import one_reduce_per_step

OBJ = Stage4Objective(alpha=1.0, lam=0.5, tau=0.05)

# DeepSpeed's ZeRO collectives call torch APIs torch 2.13 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def process_group():
    import deepspeed
    import torch.distributed as dist

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    init_deepspeed()  # a stale op build lock is cleared, a live one waited for (bounded)
    yield
    if dist.is_initialized():
        deepspeed.comm.destroy_process_group()


@pytest.fixture(scope="module")
def batches(synth):
    rows, _ = load_rows(synth["pairs"], synth["image_root"])
    out = []
    for off in (0, 5):
        picked = rows[off::12][:8]
        for i, r in enumerate(picked):
            if i % 3 == 0:
                r.rationale = f"note {i}: so the answer is {r.positive.text}"
        out.append(build_items(picked, k=1))
    return out


def _cfg(tiny_model, stage):
    return TrainConfig(model=str(tiny_model), pairs="x", zero_stage=stage, lr=1e-2,
                       warmup_steps=0, steps=10, lr_schedule="constant", grad_clip=0.0)


def _step(fn, chunk, emb, items, info, encode, backward, **kw):
    chunks = make_chunks(emb, items, chunk)
    n_lm = sum(c.meta["n_lm_tokens"] for c in chunks)
    return fn(chunks, encode, make_loss_fn(OBJ, info), backward, OBJ.lm_weight(n_lm), **kw)


def _reference_grads(tiny_model, items, info, cfg):
    emb = Embedder.from_pretrained(tiny_model)
    prepare_model(emb, cfg)
    mod = EmbedTrainModule(emb)

    def encode(cs, with_lm):
        embs, lms = mod([c.batch for c in cs], [with_lm and c.lm for c in cs])
        return [(e, lm if with_lm and c.lm else None)
                for e, lm, c in zip(embs, lms, cs, strict=True)]

    _step(plain_step, 10**6, emb, items, info, encode, lambda loss, last: loss.backward())
    return {n: p.grad.clone() for n, p in mod.named_parameters() if p.requires_grad}


def _ds_run(tiny_model, cfg, gradcache, batches):
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    emb = Embedder.from_pretrained(tiny_model)
    prepare_model(emb, cfg)
    mod = EmbedTrainModule(emb)
    params = [p for p in mod.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=mod, model_parameters=params,
                                      config=ds_config(cfg, 1, "cpu"),
                                      lr_scheduler=lr_scheduler(cfg, cfg.steps))

    def encode(cs, with_lm):
        embs, lms = engine([c.batch for c in cs], [with_lm and c.lm for c in cs])
        return [(e, lm if with_lm and c.lm else None)
                for e, lm, c in zip(embs, lms, cs, strict=True)]

    def backward(loss, last):
        engine.set_gradient_accumulation_boundary(last)
        engine.backward(loss)

    grads, n_backward = None, []
    for items, info in batches:
        # as stage 4 runs it: merged no-graph forwards, the vision tower's output reused
        kw = {"embed": merged_embed(encode, emb, cfg.gradcache_embed_chunks)} if gradcache else {}
        with one_reduce_per_step(engine, cfg.zero_stage, gradcache, cfg.gradcache_reduce):
            res = _step(gradcache_step if gradcache else plain_step,
                        3 if gradcache else 10**6, emb, items, info, encode, backward, **kw)
        n_backward.append(res.n_backward)
        if grads is None:
            grads = {n: safe_get_full_grad(p).detach().clone()
                     for n, p in engine.module.named_parameters() if p.requires_grad}
        engine.step()
    weights = {n: safe_get_full_fp32_param(p).detach().clone()
               for n, p in engine.module.named_parameters() if p.requires_grad}
    return grads, weights, n_backward


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_gradcache_under_zero(process_group, tiny_model, batches, stage):
    cfg = _cfg(tiny_model, stage)
    ref = _reference_grads(tiny_model, *batches[0], cfg)
    g_gc, w_gc, nb = _ds_run(tiny_model, cfg, True, batches)
    g_plain, w_plain, nb_plain = _ds_run(tiny_model, cfg, False, batches)
    assert min(nb) >= 8 and nb_plain == [1, 1]  # several chunk backwards per optimizer step
    assert set(g_gc) == set(ref) and len(ref) > 30
    # the boundary gradient DeepSpeed holds == plain torch full batch, under ZeRO
    for name, got in (("gradcache", g_gc), ("plain", g_plain)):
        err, worst = max((grad_error(got[n], g), n) for n, g in ref.items())
        print(f"ZeRO-{stage} {name}: gradient error {err:.3f} of the tolerance ({worst})")
        assert err <= 1.0, (stage, name, worst, err)
    base = Embedder.from_pretrained(tiny_model)
    init = {n: p.detach() for n, p in base.model.named_parameters()}
    moved = sum(int(not torch.equal(w, init[n.removeprefix("model.")])) for n, w in w_gc.items())
    assert moved == len(w_gc)  # every trainable parameter was updated
    rel, frac = weight_error(w_gc, w_plain, {n: init[n.removeprefix("model.")] for n in w_gc})
    print(f"ZeRO-{stage} weights: difference {rel:.2e} of the movement, {frac:.4%} of entries "
          "off by > 1e-4")
    assert rel <= 1e-2 and frac <= 1e-3, (stage, rel, frac)


def grad_error(got: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4,
               scale_tol: float = 1e-4) -> float:
    """max |got - ref| / (rtol |ref| + scale_tol max|ref|): <= 1 passes (module docstring)."""
    bound = rtol * ref.abs() + scale_tol * ref.abs().max()
    return float(((got - ref).abs() / bound.clamp_min(1e-30)).max())


def weight_error(got: dict, ref: dict, init: dict, atol: float = 1e-4) -> tuple[float, float]:
    """(|got - ref| / |ref - init| over all tensors, fraction of entries off by > atol)."""
    diff = torch.cat([(got[n] - ref[n]).flatten() for n in ref])
    moved = torch.cat([(ref[n] - init[n]).flatten() for n in ref])
    return float(diff.norm() / moved.norm()), float((diff.abs() > atol).float().mean())
