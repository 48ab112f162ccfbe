"""GradCache pays one gradient reduce per optimizer step, however many chunks it has.

The reducing collectives DeepSpeed issues (``deepspeed.comm`` all-reduce / reduce /
reduce-scatter, counted by :func:`mmemb.training.reduction.count_reduces`) over one
optimizer step (every backward plus ``engine.step()``) are counted at two chunk sizes (2x
the chunks) on 1 and 2 gloo ranks: equal in the default setup (ZeRO-1) and in ZeRO-2 with
``gradcache_reduce: step``, and growing with the chunks under ``gradcache_reduce:
backward`` (so the counter does see per-chunk reduces). The gradient each gradcache step
leaves equals the one-graph step's on the same ranks and weights (the LR is 0, so every
step of a run sees the same weights).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from mmemb.training.distributed import free_port

# DeepSpeed's ZeRO collectives call torch APIs torch 2.13 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

#: (ZeRO stage, gradcache_reduce): the default first
SETUPS = ((1, "step"), (2, "step"), (2, "backward"))
CHUNKS = (2, 4)  # chunk sizes: the first gives about twice the chunks of the second
ROWS = 8  # queries per rank


def _engine(tiny_model: str, stage: int, mode: str, world: int):
    import deepspeed

    from mmemb.configs.train import TrainConfig
    from mmemb.model.embedder import Embedder
    from mmemb.stages.train import prepare_model
    from mmemb.training.deepspeed_config import ds_config, lr_scheduler
    from mmemb.training.module import EmbedTrainModule

    cfg = TrainConfig(model=tiny_model, pairs="x", zero_stage=stage, gradcache_reduce=mode,
                      batch_size=ROWS, warmup_steps=0, steps=10, lr_schedule="constant",
                      grad_clip=0.0, lam=0.5)
    emb = Embedder.from_pretrained(tiny_model)
    prepare_model(emb, cfg)
    mod = EmbedTrainModule(emb, vision_row=world > 1)
    engine, *_ = deepspeed.initialize(model=mod, config=ds_config(cfg, world, "cpu"),
                                      model_parameters=[p for p in mod.parameters()
                                                        if p.requires_grad],
                                      lr_scheduler=lr_scheduler(cfg, cfg.steps))
    for group in engine.optimizer.param_groups:  # LR 0: the weights never move
        group["lr"] = 0.0
    engine.lr_scheduler.base_lrs = [0.0 for _ in engine.lr_scheduler.base_lrs]
    return cfg, emb, engine


def _one_step(cfg, emb, engine, items, info, chunk: int | None):
    """One optimizer step (``chunk`` None: the one-graph step): (reduces, chunks, grads)."""
    from deepspeed.utils import safe_get_full_grad

    from mmemb.losses.gradcache import gradcache_step, plain_step
    from mmemb.losses.objective import Stage4Objective
    from mmemb.stages.train import make_loss_fn
    from mmemb.training.module import align_chunks, make_chunks
    from mmemb.training.reduction import count_reduces, one_reduce_per_step

    obj = Stage4Objective(cfg.alpha, cfg.lam, cfg.tau)
    vr = engine.module.vision_row
    chunks = align_chunks(emb, make_chunks(emb, items, chunk or 10**6, vr), vr)
    n_lm = sum(c.meta["n_lm_tokens"] for c in chunks)

    def encode(cs, with_lm):
        embs, lms = engine([c.batch for c in cs], [with_lm and c.lm for c in cs],
                           [c.meta["n"] for c in cs])
        return [(e, lm if with_lm and c.lm else None)
                for e, lm, c in zip(embs, lms, cs, strict=True)]

    def backward(loss, last):
        engine.set_gradient_accumulation_boundary(last)
        engine.backward(loss)

    gc = chunk is not None
    with count_reduces() as n:
        with one_reduce_per_step(engine, cfg.zero_stage, gc, cfg.gradcache_reduce):
            (gradcache_step if gc else plain_step)(chunks, encode, make_loss_fn(obj, info),
                                                   backward, obj.lm_weight(n_lm))
        reduces = sum(n.values())
    grads = {k: safe_get_full_grad(p).detach().clone()
             for k, p in engine.module.named_parameters() if p.requires_grad}
    with count_reduces() as n:
        engine.step()
    return reduces + sum(n.values()), len(chunks), grads


def _measure(tiny_model: str, pairs: str, image_root: str, rank: int, world: int,
             setups=SETUPS) -> dict:
    """Per setup: reduces per step and chunk count at each chunk size, and the largest
    gradient error of gradcache against the one-graph step (of the tolerance)."""
    from mmemb.stages.train import build_items
    from mmemb.training.data import load_rows

    rows, _ = load_rows(pairs, image_root)
    picked = rows[rank::12][:ROWS]  # rank r's queries: every 12th row (all tasks) from r
    for i, r in enumerate(picked):
        if i % 2 == 0:
            r.rationale = f"note {i}: so the answer is {r.positive.text}"
    items, info = build_items(picked, k=1)
    out = {}
    for stage, mode in setups:
        cfg, emb, engine = _engine(tiny_model, stage, mode, world)
        _, _, ref = _one_step(cfg, emb, engine, items, info, None)
        res = {"reduces": [], "chunks": [], "grad_error": 0.0}
        for chunk in CHUNKS:
            reduces, n_chunks, grads = _one_step(cfg, emb, engine, items, info, chunk)
            res["reduces"].append(reduces)
            res["chunks"].append(n_chunks)
            res["grad_error"] = max(res["grad_error"],
                                    max(_grad_error(grads[k], g) for k, g in ref.items()))
        res["max_ref"] = max(float(g.abs().max()) for g in ref.values())
        out[(stage, mode)] = res
        engine.destroy()
    return out


def _grad_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / (1e-4 |ref| + 1e-4 max|ref|): <= 1 passes (the error of a sum over
    chunks scales with its terms; see test_gradcache_zero.py)."""
    bound = 1e-4 * ref.abs() + 1e-4 * ref.abs().max()
    return float(((got - ref).abs() / bound.clamp_min(1e-30)).max())


def _check(res: dict) -> None:
    for (stage, mode), r in res.items():
        print(f"ZeRO-{stage} {mode}: chunks {r['chunks']} -> reduces per step "
              f"{r['reduces']}, gradient error {r['grad_error']:.3f} of the tolerance")
        assert r["chunks"][0] >= r["chunks"][1] + 3, r  # clearly more chunks at chunk 2
        assert r["grad_error"] <= 1.0 and r["max_ref"] > 1e-3, (stage, mode, r)
        if mode == "step":  # the default (ZeRO-1) and ZeRO-2 coalesced: flat in the chunks
            assert r["reduces"][0] == r["reduces"][1] <= 3, (stage, mode, r)
        else:  # ZeRO-2 per backward: one reduce per chunk backward, the counter sees them
            assert r["reduces"][0] - r["reduces"][1] >= r["chunks"][0] - r["chunks"][1], r


@pytest.fixture
def one_rank_group():
    import deepspeed
    import torch.distributed as dist

    from mmemb.training.distributed import init_deepspeed

    saved = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                             "MASTER_ADDR", "MASTER_PORT")}
    if not dist.is_initialized():
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
        init_deepspeed()
    yield
    if dist.is_initialized():
        deepspeed.comm.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_one_rank_one_reduce_per_step(one_rank_group, tiny_model, synth):
    _check(_measure(str(tiny_model), str(synth["pairs"]), str(synth["image_root"]), 0, 1))


def _worker(r: int, port: int, paths: tuple[str, str, str], out: str, setups) -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import deepspeed

    from mmemb.training.distributed import init_deepspeed

    init_deepspeed(say=lambda _: None)
    try:
        torch.save(_measure(*paths, r, 2, setups), f"{out}/rank{r}.pt")
    finally:
        deepspeed.comm.destroy_process_group()


def _two_ranks(tiny_model, synth, tmp_path, setups) -> None:
    paths = (str(tiny_model), str(synth["pairs"]), str(synth["image_root"]))
    mp.spawn(_worker, args=(free_port(), paths, str(tmp_path), setups), nprocs=2, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert set(res[0]) == set(setups)
    for r in res:
        _check(r)
    for key in res[0]:  # both ranks made the same collective calls
        assert res[0][key]["reduces"] == res[1][key]["reduces"], key


@pytest.mark.slow  # two gloo ranks: 30-60 s on 2 busy cores (`make test-slow`)
def test_two_ranks_one_reduce_per_step(tiny_model, synth, tmp_path):
    """The default setup (ZeRO-1) on two gloo ranks."""
    _two_ranks(tiny_model, synth, tmp_path, SETUPS[:1])


@pytest.mark.slow
def test_two_ranks_zero2_reduce_modes(tiny_model, synth, tmp_path):
    """ZeRO-2 on two gloo ranks: flat with gradcache_reduce=step, per chunk with backward."""
    _two_ranks(tiny_model, synth, tmp_path, SETUPS[1:])
