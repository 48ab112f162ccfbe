"""The rollout engine follows the policy: after ``sync`` it generates exactly what a fresh
engine started on the new weights generates (greedy, same prompts, same numerics)."""

from __future__ import annotations

import pytest
import torch

from mmemb.model.embedder import Embedder
from mmemb.model.prompts import EmbedInput

pytestmark = pytest.mark.vllm


def test_synced_engine_equals_a_fresh_engine_on_the_new_weights(tiny_model, synth, tmp_path):
    from mmemb.vllm_policy import VLLMPolicy

    img = str(synth["image_root"] / "images/train/syn_qa_count/00000.png")
    xs = [EmbedInput(f"there are {i} red circles. how many?", "<|image_1|> Count.", [img])
          for i in range(3)] + [EmbedInput(f"a blue square number {i}") for i in range(3)]
    emb = Embedder.from_pretrained(tiny_model)
    pol = VLLMPolicy(tiny_model, budget=12)
    try:
        before = pol.generate(xs, temperature=0.0)
        torch.manual_seed(0)
        with torch.no_grad():  # a large, visible update of every weight
            for p in emb.model.parameters():
                p.add_(0.5 * p.std().clamp(min=1e-3) * torch.randn_like(p))
        new_dir = emb.save_pretrained(tmp_path / "updated")
        assert pol.sync(emb.model) > 0
        after = pol.generate(xs, temperature=0.0)
    finally:
        pol.close()
    fresh = VLLMPolicy(new_dir, budget=12)
    try:
        want = fresh.generate(xs, temperature=0.0)
    finally:
        fresh.close()
    assert [r.ids for r in after] == [r.ids for r in want]
    assert [r.ids for r in after] != [r.ids for r in before]  # the sync changed the output
    assert all(r.ids and len(r.ids) <= 12 for r in after)
