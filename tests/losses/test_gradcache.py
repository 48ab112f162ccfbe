"""GradCache gives the plain full-batch gradient (tiny Qwen2-VL, with LM and hard negatives)."""

from __future__ import annotations

import pytest
import torch

from mmemb.configs.train import TrainConfig
from mmemb.losses.gradcache import gradcache_step, plain_step
from mmemb.losses.objective import Stage4Objective
from mmemb.model.embedder import Embedder
from mmemb.stages.train import build_items, make_loss_fn, prepare_model
from mmemb.training.data import load_rows
from mmemb.training.module import VISION_KEY, EmbedTrainModule, make_chunks, merged_embed


def _rows(synth, n=10):
    rows, _ = load_rows(synth["pairs"], synth["image_root"])
    picked = rows[::12][:n]  # spans all tasks
    for i, r in enumerate(picked):  # every other row reasons (oracle steps from meta)
        if i % 2 == 0:
            r.rationale = f"step {i}: the answer is {r.positive.text}"
    return picked


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None}


@pytest.fixture
def one_thread():
    """The tiny model gains nothing from two threads; beside other jobs they spin-wait."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_tf32():
    """fp32 on a GPU without TF32 (cuDNN convolutions, here the vision patch embedding, use
    it by default): the comparison then measures reduction order only."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("chunk, embed_chunks, vision", [(3, 1, "train"), (3, 3, "merger")])
def test_gradcache_equals_full_batch_gradient(tiny_model, synth, chunk, embed_chunks, vision,
                                              device, one_thread, no_tf32):
    """Loss parts and every gradient equal the one-graph step's (on a GPU too: atomic adds
    in CUDA backward kernels sum in varying order, hence the 1e-4 relative tolerance): one
    no-graph forward per chunk with everything trained, and ``embed_chunks`` chunks merged
    per no-graph forward with the vision tower frozen below its merger (so the re-forward
    reuses the tower's output and re-runs only the merger)."""
    torch.manual_seed(0)
    emb = Embedder.from_pretrained(tiny_model, device=device)
    if vision != "train":
        prepare_model(emb, TrainConfig(model="m", pairs="p", vision=vision))
    emb.model.train()
    mod = EmbedTrainModule(emb)
    assert mod.vision_cacheable() == (vision != "train")
    rows = _rows(synth)
    items, info = build_items(rows, k=1)
    obj = Stage4Objective(alpha=0.7, lam=0.3, tau=0.05)

    def encode(cs, with_lm):
        embs, lms = mod([c.batch for c in cs], [with_lm and c.lm for c in cs])
        return [(e, lm if with_lm and c.lm else None)
                for e, lm, c in zip(embs, lms, cs, strict=True)]

    losses = {}
    grads = {}
    for name, fn, size in (("plain", plain_step, 10**6), ("gc", gradcache_step, chunk)):
        mod.zero_grad(set_to_none=True)
        chunks = make_chunks(emb, items, size)
        assert all(c.batch["input_ids"].device.type == device for c in chunks)
        n_lm = sum(c.meta["n_lm_tokens"] for c in chunks)
        calls: list[bool] = []

        def backward(loss, last, calls=calls):
            calls.append(last)
            loss.backward()

        kw = {"embed": merged_embed(encode, emb, embed_chunks)} if name == "gc" else {}
        res = fn(chunks, encode, make_loss_fn(obj, info), backward, obj.lm_weight(n_lm), **kw)
        out = obj.add_lm(res.out, res.lm_sum, n_lm)
        losses[name] = out.parts()
        grads[name] = _grads(mod)
        if name == "gc":
            assert len(chunks) > 4 and calls == [False] * (len(chunks) - 1) + [True]
            cached = [VISION_KEY in c.batch for c in chunks if "pixel_values" in c.batch]
            assert cached and all(cached) == (vision != "train"), cached
            assert n_lm > 10
    for k in ("loss", "loss/nce_reason", "loss/nce_direct", "loss/lm"):
        assert losses["gc"][k] == pytest.approx(losses["plain"][k], rel=1e-5, abs=1e-6), k
    assert losses["plain"]["loss/lm"] > 1.0  # the LM part is really there
    assert set(grads["gc"]) == set(grads["plain"]) and len(grads["plain"]) > 30
    for n, g in grads["plain"].items():
        assert torch.allclose(grads["gc"][n], g, rtol=1e-4, atol=1e-6), \
            (n, float((grads["gc"][n] - g).abs().max()), float(g.abs().max()))
    assert max(float(g.abs().max()) for g in grads["plain"].values()) > 1e-3
