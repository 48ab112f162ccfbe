"""The embedded default's model: built without a hub, loaded back like a real checkpoint."""

from __future__ import annotations

import pytest
import torch

from mmemb.model.embedder import Embedder, EmbeddingConfigMismatch
from mmemb.model.prompts import EmbeddingConfig, EmbedInput
from mmemb.model.tiny import build_tiny


def _inputs(synth):
    img = str(synth["image_root"] / "images/train/syn_cls_shape/00000.png")
    return [
        EmbedInput(text="a red circle", instruction="Represent the text."),  # text
        EmbedInput(instruction="<|image_1|> Represent the given image.", images=[img]),  # image
        EmbedInput(text="it shows a shape", instruction="<|image_1|> Find a caption.",
                   images=[img]),  # text + image
        EmbedInput(text="two images", images=[img, img]),  # multi-image
    ]


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_all_architectures_embed_text_image_and_both(tmp_path, synth, arch):
    path = build_tiny(tmp_path / arch, arch=arch, seed=0)
    emb = Embedder.from_pretrained(path)
    assert type(emb.model).__name__.lower().startswith(arch.replace("_", "").replace("vl", "")
                                                       [:5])
    out = emb.encode(_inputs(synth), batch_size=2)
    e = out.embeddings
    assert e.shape == (4, emb.hidden_size)
    assert torch.isfinite(e).all()
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(4), atol=1e-5, rtol=0)
    # Inputs differ, embeddings differ; images add tokens.
    assert (e @ e.T).fill_diagonal_(0).max() < 0.99999
    assert out.n_tokens[1] > 20 and out.n_tokens[3] > out.n_tokens[1]


def test_batched_equals_single_and_reason_mode_differs(tiny_model, synth):
    emb = Embedder.from_pretrained(tiny_model)
    inputs = _inputs(synth)
    batched = emb.encode(inputs, batch_size=4).embeddings
    single = torch.cat([emb.encode([x], batch_size=1).embeddings for x in inputs])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)  # padding is inert
    r = [EmbedInput(x.text, x.instruction, x.images, rationale="two plus three is five")
         for x in inputs]
    reasoned = emb.encode(r, mode="reason").embeddings
    assert not torch.allclose(reasoned, batched)
    with pytest.raises(ValueError, match="needs a rationale"):
        emb.encode(inputs, mode="reason")


def test_embedding_is_the_emb_token_hidden_state_without_lm_head(tiny_model):
    emb = Embedder.from_pretrained(tiny_model)
    x = [EmbedInput(text="a blue square")]
    batch = emb.tokenize(emb.prompts(x), [[]])
    assert int(batch["input_ids"][0, -1]) == emb.emb_id  # prompt ends at <emb>
    full = emb.model(**batch, output_hidden_states=True)  # reference: the generative model
    ref = torch.nn.functional.normalize(full.hidden_states[-1][0, -1], dim=-1)
    torch.testing.assert_close(emb.encode(x).embeddings[0], ref, atol=1e-5, rtol=1e-4)


def test_save_and_load_round_trip_checks_embedding_config(tiny_model, tmp_path):
    emb = Embedder.from_pretrained(tiny_model)
    with torch.no_grad():
        next(emb.model.parameters()).add_(0.01)
    out = emb.save_pretrained(tmp_path / "saved")
    back = Embedder.from_pretrained(out, expect=EmbeddingConfig())
    x = [EmbedInput(text="three triangles")]
    torch.testing.assert_close(back.encode(x).embeddings, emb.encode(x).embeddings)
    with pytest.raises(EmbeddingConfigMismatch, match="prompt_version"):
        Embedder.from_pretrained(out, expect=EmbeddingConfig(prompt_version="other-v9"))


def test_embedding_through_a_peft_lora_wrapper(tiny_model):
    """A LoRA-wrapped model embeds through the same path (adapters active): at init LoRA's
    B is zero, so the embeddings equal the plain model's; after a change to B they move."""
    import torch
    from peft import LoraConfig, get_peft_model

    from mmemb.model.embedder import Embedder
    from mmemb.model.prompts import EmbedInput

    emb = Embedder.from_pretrained(tiny_model)
    xs = [EmbedInput("a red circle"), EmbedInput("two blue squares")]
    plain = emb.embed(xs).embeddings
    emb.model = get_peft_model(emb.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.testing.assert_close(emb.embed(xs).embeddings, plain, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        for n, p in emb.model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.05)
    assert not torch.allclose(emb.embed(xs).embeddings, plain, atol=1e-4)


def test_save_in_another_dtype_keeps_the_model_and_the_tie(tiny_model, tmp_path):
    """Saving bf16 from an fp32 model casts a copy of the weights, never the model, and
    the tied input/output embedding is still saved once and loads tied."""
    from safetensors import safe_open

    emb = Embedder.from_pretrained(tiny_model)
    before = {k: v.clone() for k, v in emb.model.state_dict().items()}
    out = emb.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert next(emb.model.parameters()).dtype == torch.float32  # the caller's model
    for k, v in emb.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"BF16"}
        w = f.get_tensor(next(k for k in keys if k.endswith("embed_tokens.weight")))
    assert not any(k.endswith("lm_head.weight") for k in keys)  # tied: stored once
    import json

    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    torch.testing.assert_close(w, before[next(k for k in before
                                               if k.endswith("embed_tokens.weight"))]
                               .to(torch.bfloat16), atol=0, rtol=0)
    back = Embedder.from_pretrained(out)
    m = back.model
    assert m.get_output_embeddings().weight.data_ptr() == \
        m.get_input_embeddings().weight.data_ptr()
