"""Adaptive / always-reason inference from one KV cache (issue 17).

Each reasoning input is prefilled once, runs the vision tower once, and is embedded at the
``<emb>`` that follows exactly the ids it generated. Checked against independent paths:
a fresh embedder pass over those ids, transformers ``generate`` from the same prefix, the
same inputs one at a time and under the other padding side, and counted forward work.
"""

from __future__ import annotations

import pytest
import torch

from mmemb.inference import AdaptiveEncoder
from mmemb.model.embedder import Embedder
from mmemb.model.prompts import EmbedInput

ATOL = dict(atol=1e-5, rtol=1e-4)


def _inputs(synth) -> list[EmbedInput]:
    img = str(synth["image_root"] / "images/train/syn_qa_count/00000.png")
    img2 = str(synth["image_root"] / "images/train/syn_qa_count/00001.png")
    return [EmbedInput("2 red circles and 3 blue squares. how many?", "<|image_1|> Answer.",
                       [img]),
            EmbedInput("a red circle"),
            EmbedInput("which is left of the square?", "<|image_1|> Find it.", [img2]),
            EmbedInput("left or right? a much longer question than the others, to pad"),
            EmbedInput("a blue square")]


@pytest.fixture(scope="module")
def emb(tiny_model) -> Embedder:
    """The tiny model with ``</think>`` made likelier, so that some rows close their
    rationale within the budget and others run into it (both tail paths)."""
    e = Embedder.from_pretrained(tiny_model)
    with torch.no_grad():
        w = e.model.lm_head.weight  # tied with the input embeddings: one model, both paths
        w[e.end_think_id] = w[e.end_think_id] * 20
    return e


def _fresh_embedding(enc: AdaptiveEncoder, x: EmbedInput, ids: list[int], finished: bool
                     ) -> torch.Tensor:
    """The embedder's own pass over ``prefix <think> ids </think><emb>``, built from ids."""
    e = enc.emb
    body = ids[:-1] if finished else ids
    b = enc.prefix_batch([x])
    tail = torch.tensor([[e.think_id, *body, e.end_think_id, e.emb_id]])
    b["input_ids"] = torch.cat([b["input_ids"], tail], 1)
    b["attention_mask"] = torch.cat([b["attention_mask"], torch.ones_like(tail)], 1)
    b["mm_token_type_ids"] = torch.cat([b["mm_token_type_ids"], torch.zeros_like(tail)], 1)
    return e(b).embeddings[0]


def _threshold_between(enc: AdaptiveEncoder, xs: list[EmbedInput]) -> float:
    p = sorted(enc.p_think(xs).tolist())
    return (p[1] + p[2]) / 2  # three of five inputs reason


@pytest.mark.parametrize("mode", ["adaptive", "reason"])
def test_embedding_is_a_fresh_pass_over_the_generated_ids(emb, synth, mode):
    enc = AdaptiveEncoder(emb, budget=8)
    xs = _inputs(synth)
    enc.threshold = _threshold_between(enc, xs)
    out = enc.encode(xs, mode=mode, batch_size=5)
    rolls = {i: r for i, r in enumerate(enc.generate(xs))}
    assert sum(out.reasoned) == (3 if mode == "adaptive" else 5)
    finished = [rolls[i].finished for i in range(5) if out.reasoned[i]]
    assert any(finished) and not all(finished)  # both tails: closed and budget-cut
    direct = emb.encode(xs).embeddings
    for i, x in enumerate(xs):
        if not out.reasoned[i]:
            torch.testing.assert_close(out.embeddings[i], direct[i], **ATOL)
            continue
        r = rolls[i]
        want = _fresh_embedding(enc, x, r.ids, r.finished)
        torch.testing.assert_close(out.embeddings[i], want, **ATOL)
        body = len(r.ids) - int(r.finished)
        assert out.n_prompt_tokens[i] == int(enc.prefix_batch([x])["attention_mask"].sum()) \
            + body + 3  # prefix <think> body </think><emb>


@pytest.mark.parametrize("mode", ["adaptive", "reason"])
def test_gate_and_rationales_are_generates_at_temperature_zero(emb, synth, mode):
    enc = AdaptiveEncoder(emb, budget=8)
    xs = _inputs(synth)
    enc.threshold = _threshold_between(enc, xs)
    out = enc.encode(xs, mode=mode, batch_size=5)
    if mode == "adaptive":
        assert out.reasoned == (enc.p_think(xs) > enc.threshold).tolist()
        torch.testing.assert_close(torch.tensor(out.p_think), enc.p_think(xs), **ATOL)
    idx = [i for i in range(5) if out.reasoned[i]]
    ref = enc.generate([xs[i] for i in idx])  # transformers generate, prefix <think>
    assert [out.rationales[i] for i in idx] == [r.text for r in ref]
    assert [out.n_gen_tokens[i] for i in idx] == [len(r.ids) for r in ref]
    assert [out.malformed[i] for i in idx] == [not r.finished for r in ref]


def test_sampled_rationales_follow_generates_sampler(emb, synth):
    """Same logits processors, same multinomial draws: seeded, the rationales match."""
    xs = _inputs(synth)
    enc = AdaptiveEncoder(emb, budget=8, temperature=1.3, top_p=0.9)
    torch.manual_seed(3)
    out = enc.encode(xs, mode="reason", batch_size=5)
    torch.manual_seed(3)
    ref = enc.generate(xs)
    assert out.rationales == [r.text for r in ref]
    banned = set(enc.suppress_ids) | {emb.emb_id}
    assert all(not set(r.ids) & banned for r in ref)


@pytest.mark.parametrize("mode", ["adaptive", "reason"])
def test_same_results_batched_alone_and_under_either_padding_side(emb, synth, mode):
    enc = AdaptiveEncoder(emb, budget=8)
    xs = _inputs(synth)
    enc.threshold = _threshold_between(enc, xs)
    batched = enc.encode(xs, mode=mode, batch_size=5)
    alone = enc.encode(xs, mode=mode, batch_size=1)
    tok = emb.tokenizer
    old = tok.padding_side
    try:
        for side in ("left", "right"):
            tok.padding_side = side
            other = enc.encode(xs[::-1], mode=mode, batch_size=3)
            torch.testing.assert_close(other.embeddings.flip(0), batched.embeddings, **ATOL)
            assert other.rationales[::-1] == batched.rationales
    finally:
        tok.padding_side = old
    torch.testing.assert_close(alone.embeddings, batched.embeddings, **ATOL)
    for f in ("reasoned", "rationales", "n_gen_tokens", "n_prompt_tokens", "malformed"):
        assert getattr(alone, f) == getattr(batched, f), f


def _count_forward_work(emb: Embedder):
    """Hooks counting the vision tower's images and the real (unmasked) tokens the
    decoder is given, over every forward call; returns (counts, handles)."""
    base = emb.model.model
    counts = {"vision_calls": 0, "images": 0, "tokens": 0}

    def vision(_mod, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        counts["vision_calls"] += 1
        counts["images"] += int(grid.shape[0])

    def decoder(_mod, _args, kwargs):
        k = kwargs["input_ids"].shape[1]
        counts["tokens"] += int(kwargs["attention_mask"][:, -k:].sum())

    return counts, [base.visual.register_forward_pre_hook(vision, with_kwargs=True),
                    base.register_forward_pre_hook(decoder, with_kwargs=True)]


@pytest.mark.parametrize("mode", ["adaptive", "reason"])
@pytest.mark.parametrize("bs", [1, 5])
def test_one_prefill_and_one_vision_run_per_input(emb, synth, mode, bs):
    enc = AdaptiveEncoder(emb, budget=8)
    xs = _inputs(synth)
    enc.threshold = _threshold_between(enc, xs)
    counts, hooks = _count_forward_work(emb)
    try:
        out = enc.encode(xs, mode=mode, batch_size=bs)
    finally:
        for h in hooks:
            h.remove()
    assert counts["images"] == sum(len(x.images) for x in xs) == 2
    assert counts["vision_calls"] == (2 if bs == 1 else 1)
    # Every token of each final sequence goes through the decoder once; adaptive adds the
    # decision pass's <emb> of each input that then reasoned (dropped from the cache).
    extra = sum(out.reasoned) if mode == "adaptive" else 0
    assert counts["tokens"] == sum(out.n_prompt_tokens) + extra


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_real_layouts_decode_like_generate(real_layout, synth, family):
    """Real tokenizers, chat templates and generation configs (Qwen2.5-VL's repetition
    penalty 1.05 applies in both paths); Qwen3-VL's own M-RoPE and deepstack."""
    emb = Embedder.from_pretrained(real_layout(family), add_special_tokens=True,
                                   dtype=torch.float32)
    enc = AdaptiveEncoder(emb, budget=5)
    xs = _inputs(synth)[:3]
    out = enc.encode(xs, mode="reason", batch_size=3)
    ref = enc.generate(xs)
    assert out.rationales == [r.text for r in ref]
    for i, (x, r) in enumerate(zip(xs, ref, strict=True)):
        torch.testing.assert_close(out.embeddings[i],
                                   _fresh_embedding(enc, x, r.ids, r.finished), **ATOL)


class _FakeEngine:
    """Stands in for :class:`mmemb.vllm_policy.VLLMPolicy`: a fixed rationale per input."""

    budget = 8

    def __init__(self, emb: Embedder):
        self.ids = emb.tokenizer("two circles", add_special_tokens=False)["input_ids"]
        self.end = emb.end_think_id
        self.calls = 0

    def generate(self, inputs, temperature, seeds):
        from mmemb.inference import Rollout

        self.calls += 1
        return [Rollout([*self.ids, self.end], "two circles", True) for _ in inputs]


def test_an_engine_writes_the_rationales_then_one_embedding_pass_reads_them(emb, synth):
    """The vLLM route (a given engine) is kept: its rationale text, embedded in reasoning
    mode by the embedder, with no decoding here."""
    xs = _inputs(synth)
    eng = _FakeEngine(emb)
    out = AdaptiveEncoder(emb, budget=8, vllm=eng).encode(xs, mode="reason", batch_size=5)
    assert eng.calls == 1 and out.rationales == ["two circles"] * 5
    want = emb.embed([EmbedInput(x.text, x.instruction, x.images, "two circles") for x in xs],
                     mode="reason").embeddings
    torch.testing.assert_close(out.embeddings, want, **ATOL)
    assert out.n_gen_tokens == [len(eng.ids) + 1] * 5
