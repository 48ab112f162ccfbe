"""Adaptive inference: the gate is the model's own first token; generation only where needed."""

from __future__ import annotations

import torch

from mmemb.inference import AdaptiveEncoder
from mmemb.model.embedder import Embedder
from mmemb.model.prompts import EmbedInput, prompt_prefix


def _inputs(synth):
    img = str(synth["image_root"] / "images/train/syn_qa_count/00000.png")
    return [EmbedInput("2 red circles and 3 blue squares. how many?", "<|image_1|> Answer.",
                       [img]), EmbedInput("a red circle"), EmbedInput("left or right?")]


def test_gate_probability_equals_full_model_softmax(tiny_model, synth):
    emb = Embedder.from_pretrained(tiny_model)
    enc = AdaptiveEncoder(emb)
    xs = _inputs(synth)
    p = enc.p_think(xs)
    for i, x in enumerate(xs):
        b = emb.tokenize([prompt_prefix(x, emb.config)], [x.images])
        logits = emb.model(**b).logits[0, -1]  # [V] the full LM head, for reference
        two = logits[[emb.emb_id, emb.think_id]]
        assert abs(float(torch.softmax(two, -1)[1]) - float(p[i])) < 1e-5


def test_the_decision_pass_is_also_the_direct_pass(tiny_model, synth):
    """Adaptive reads the gate at the token before <emb> of the direct prompt: the same
    probability as the prefix-only pass (causal model) and the direct embedding for free."""
    emb = Embedder.from_pretrained(tiny_model)
    enc = AdaptiveEncoder(emb)
    xs = _inputs(synth)
    p, direct, n_tok = enc.gate_and_direct(xs)
    torch.testing.assert_close(p, enc.p_think(xs), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(direct, emb.encode(xs).embeddings, atol=1e-5, rtol=1e-4)
    assert n_tok.tolist() == emb.encode(xs).n_tokens.tolist()


def test_modes_route_generation(tiny_model, synth):
    emb = Embedder.from_pretrained(tiny_model)
    xs = _inputs(synth)
    direct = AdaptiveEncoder(emb, budget=6).encode(xs, mode="direct")
    assert direct.reasoned == [False] * 3 and direct.n_gen_tokens == [0] * 3
    torch.testing.assert_close(direct.embeddings, emb.encode(xs).embeddings, atol=1e-5,
                               rtol=1e-4)
    reason = AdaptiveEncoder(emb, budget=6).encode(xs, mode="reason", batch_size=2)
    assert reason.reasoned == [True] * 3
    assert all(0 < n <= 6 for n in reason.n_gen_tokens)
    # Adaptive with the threshold below / above every gate probability.
    p = AdaptiveEncoder(emb).p_think(xs)
    lo = AdaptiveEncoder(emb, budget=6, threshold=float(p.min()) - 1e-3).encode(xs, "adaptive")
    hi = AdaptiveEncoder(emb, budget=6, threshold=float(p.max()) + 1e-3).encode(xs, "adaptive")
    assert lo.reasoned == [True] * 3 and hi.reasoned == [False] * 3
    torch.testing.assert_close(hi.embeddings, direct.embeddings, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lo.embeddings, reason.embeddings, atol=1e-5, rtol=1e-4)
    assert sum(hi.latency_ms) > 0 and len(lo.latency_ms) == 3


def test_rationales_never_contain_vision_or_gate_tokens(tiny_model):
    emb = Embedder.from_pretrained(tiny_model)
    enc = AdaptiveEncoder(emb, budget=24)
    torch.manual_seed(0)
    rolls = enc.generate([EmbedInput("a blue square")] * 4, do_sample=True, temperature=1.5)
    banned = set(enc.suppress_ids) | {emb.emb_id}
    assert all(not (set(r.ids) & banned) for r in rolls)
    assert all(len(r.ids) <= 24 for r in rolls)
    # finished <=> the rollout closed with </think>; otherwise it is malformed.
    assert all(r.finished == (bool(r.ids) and r.ids[-1] == emb.end_think_id) for r in rolls)
