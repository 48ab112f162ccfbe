"""GradCache's merged no-graph pass: several chunks in one forward embed each row as its own
chunk does, under right and left padding (the tokenizer's side), images included."""

from __future__ import annotations

import pytest
import torch

from mmemb.model.embedder import Embedder
from mmemb.stages.train import build_items
from mmemb.training.data import load_rows
from mmemb.training.module import EmbedTrainModule, make_chunks, merge_batches, merged_embed


@pytest.mark.parametrize("side", ["right", "left"])
def test_merged_forward_embeds_like_its_chunks(tiny_model, synth, side):
    emb = Embedder.from_pretrained(tiny_model)
    emb.processor.tokenizer.padding_side = side
    mod = EmbedTrainModule(emb).eval()
    rows, _ = load_rows(synth["pairs"], synth["image_root"])
    items, _ = build_items(rows[::12][:7], k=1)
    chunks = make_chunks(emb, items, 3)  # groups of 7 rows: chunks of 3, 3, 1

    def encode(cs, with_lm):
        embs, lms = mod([c.batch for c in cs], [False] * len(cs))
        return [(e, None) for e in embs]

    with torch.no_grad():
        alone = [encode([c], False)[0][0] for c in chunks]  # each [b, H]
        merged = merged_embed(encode, emb, 3)(chunks)
    assert [e.shape for e in merged] == [e.shape for e in alone]
    for a, m in zip(alone, merged, strict=True):
        assert torch.allclose(a, m, atol=1e-5), float((a - m).abs().max())
    # the merge itself: one batch per run of chunks, image patches in order
    with_images = [c for c in chunks if "pixel_values" in c.batch][:2]
    assert len(with_images) == 2
    b = merge_batches(emb, [c.batch for c in with_images])
    assert b["input_ids"].shape[0] == sum(c.batch["input_ids"].shape[0] for c in with_images)
    assert torch.equal(b["pixel_values"], torch.cat([c.batch["pixel_values"]
                                                     for c in with_images]))
    assert int(b["attention_mask"].sum()) == sum(int(c.batch["attention_mask"].sum())
                                                 for c in with_images)
    col = 0 if side == "left" else -1  # padding lands on the tokenizer's side
    short = min(with_images, key=lambda c: c.batch["input_ids"].shape[1])
    if short.batch["input_ids"].shape[1] < b["input_ids"].shape[1]:
        rows_short = short.batch["input_ids"].shape[0]
        idx = 0 if short is with_images[0] else b["input_ids"].shape[0] - rows_short
        assert int(b["attention_mask"][idx, col]) == 0
