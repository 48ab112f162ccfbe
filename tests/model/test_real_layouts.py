"""The real Qwen-VL layouts (tokenizer, special tokens, templates, processors of the hub
folders, small random weights) through the project's one loading path."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from mmemb.model import loading
from mmemb.model.embedder import Embedder
from mmemb.model.prompts import SPECIAL_TOKENS, EmbedInput, prompt_prefix
from mmemb.model.resolution import Grid, image_tokens
from mmemb.stages.prepare import PREPARED_FILE, prepare_base

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
VISION = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


@pytest.fixture(scope="module")
def prepared(real_layout, tmp_path_factory):
    """family -> prepared student base (built once per module)."""
    out = {}

    def get(family):
        if family not in out:
            out[family] = prepare_base(real_layout(family),
                                       tmp_path_factory.mktemp("prep") / family)[0]
        return out[family]
    return get


def _load(path, **kw) -> Embedder:
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        emb = Embedder.from_pretrained(path, **kw)
    emb.load_warnings = [str(x.message) for x in w]
    return emb


@pytest.mark.parametrize("family", FAMILIES)
def test_unprepared_base_gets_tokens_in_memory_on_padding_rows(real_layout, family):
    src = real_layout(family)
    before = loading.load_processor(src).tokenizer
    n_old = len(before)
    emb = _load(src)
    tok = emb.tokenizer
    assert any("added in memory" in m for m in emb.load_warnings)
    # each method token is exactly one id, and so is every vision marker, still special
    for t in (*SPECIAL_TOKENS, *VISION):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    assert set(VISION) <= set(tok.all_special_tokens)
    # the padded vocabulary (151,936 rows) is kept: new ids land on unused rows
    w = emb.model.get_input_embeddings().weight
    assert w.shape[0] == 151936 and len(tok) < 151936
    new = loading.missing_tokens(before)
    ids = tok.convert_tokens_to_ids(new)
    assert ids == list(range(n_old, n_old + len(new)))
    mean = w[:n_old].float().mean(0)
    for i in ids:  # the documented init: the mean of the trained rows (bf16-rounded)
        torch.testing.assert_close(w[i].float(), mean.to(w.dtype).float())
    if family == "qwen3_vl":  # Qwen3-VL's own <think>/</think> are reused, untouched
        assert new == ["<emb>"]
        assert tok.convert_tokens_to_ids(["<think>", "</think>"]) == [151667, 151668]
    else:
        assert new == list(SPECIAL_TOKENS)


def test_refuses_unprepared_base_when_asked(real_layout):
    with pytest.raises(ValueError, match=r"lacks special tokens \['<emb>'\].*prepare"):
        Embedder.from_pretrained(real_layout("qwen3_vl"), add_special_tokens=False)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_prepare_base_once_same_size_and_dtype(real_layout, prepared, family):
    src, out = real_layout(family), prepared(family)
    info = json.loads((out / PREPARED_FILE).read_text())
    assert info["dtype"] == "bfloat16" and info["embedding_rows"] == 151936
    # the weights file has the source's size: same dtype, same (padded) rows
    size = lambda p: sum(f.stat().st_size for f in p.glob("*.safetensors"))  # noqa: E731
    assert size(out) == size(src)
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    # the checkpoint's generation_config is kept as it was
    assert json.loads((out / "generation_config.json").read_text()) == json.loads(
        (src / "generation_config.json").read_text())
    # loads with no warning, the tokens at the recorded ids, rows as initialised
    emb = _load(out)
    assert not [m for m in emb.load_warnings if "added in memory" in m]
    ids = {t: emb.tokenizer.convert_tokens_to_ids(t) for t in info["added_tokens"]}
    assert ids == info["token_ids"]
    fresh = _load(src)
    for i in ids.values():
        assert torch.equal(emb.model.get_input_embeddings().weight[i],
                           fresh.model.get_input_embeddings().weight[i])
    # a rerun reuses it (nothing rewritten)
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert prepare_base(src, out)[1] == {"base_reused": 1.0}
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_embed_text_image_and_both_equal_a_plain_forward(prepared, family):
    emb = _load(prepared(family))
    img = Image.new("RGB", (96, 64), (200, 30, 30))
    inputs = [EmbedInput("a red square"), EmbedInput("", "<|image_1|> Represent the image",
                                                     [img]),
              EmbedInput("what colour is it?", "", [img])]
    out = emb.encode(inputs, batch_size=3)
    assert out.embeddings.shape == (3, 256)
    torch.testing.assert_close(out.embeddings.norm(dim=-1), torch.ones(3))
    for x, e in zip(inputs, out.embeddings, strict=True):  # one input alone, by hand
        batch = emb.tokenize(emb.prompts([x]), [x.images])
        ids = batch["input_ids"][0]
        assert int((ids == emb.emb_id).sum()) == 1 and ids[-1] == emb.emb_id
        with torch.no_grad():
            h = emb.model(**batch, output_hidden_states=True).hidden_states[-1][0, -1]
        torch.testing.assert_close(e, torch.nn.functional.normalize(h.float(), dim=-1),
                                   atol=2e-5, rtol=1e-4)
    # the text reaches the model: its tokens are in the second prompt, and its embedding
    # moves away from the image's alone by more than the forward's own noise (2e-5)
    ids = [emb.tokenize(emb.prompts([x]), [x.images])["input_ids"][0] for x in inputs[1:]]
    assert "what colour is it?" in emb.tokenizer.decode(ids[1])
    assert "what colour" not in emb.tokenizer.decode(ids[0])
    assert float((out.embeddings[1] - out.embeddings[2]).abs().max()) > 1e-3


@pytest.mark.parametrize("family,system", [("qwen2_vl", True), ("qwen3_vl", False)])
def test_embedding_prompt_is_the_template_plus_the_method_turn(prepared, family, system):
    """The method's format differs from the family's template only in the assistant turn
    (``<emb>`` or ``<think> r </think><emb>``): same system turn (none on Qwen3-VL), image
    item then text with nothing between."""
    emb = _load(prepared(family))
    x = EmbedInput("a dog", "<|image_1|> Represent the given image", ["x.png"])
    msgs = [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Represent the given image\na dog"}]}]
    want = emb.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt_prefix(x, emb.config) == want
    assert want.startswith("<|im_start|>system\n") is system
    assert emb.prompts([EmbedInput("a dog")])[0].endswith("<|im_start|>assistant\n<emb>")


@pytest.mark.parametrize("family,size,full,capped", [
    ("qwen2_vl", (1700, 2200), 4819, 1312), ("qwen2_vl", (3000, 4000), 15301, 1302),
    ("qwen3_vl", (1700, 2200), 3657, 1008), ("qwen3_vl", (3000, 4000), 11750, 972)])
def test_resolution_caps_pages_and_counts_match_the_processor(real_layout, prepared, family,
                                                              size, full, capped):
    emb = _load(prepared(family), max_pixels=1024 * 1024)
    grid = Grid.of(real_layout(family))
    assert image_tokens(*size, grid, None) == full  # the hub processor's own limit
    assert image_tokens(*size, grid, 1024 * 1024) == capped
    page = Image.new("RGB", size, (255, 255, 255))
    batch = emb.tokenize(emb.prompts([EmbedInput("", "", [page])]), [[page]])
    pad = emb.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((batch["input_ids"] == pad).sum()) == capped


def test_old_processor_type_name_is_mapped_with_a_warning(real_layout, tmp_path):
    src = tmp_path / "old-qwen25vl"
    shutil.copytree(real_layout("qwen2_5_vl"), src)
    f = src / "preprocessor_config.json"
    d = json.loads(f.read_text())
    d["image_processor_type"] = "Qwen2_5_VLImageProcessor"
    f.write_text(json.dumps(d))
    from transformers import AutoProcessor

    with pytest.raises(Exception):  # noqa: B017 - what current transformers does with it
        AutoProcessor.from_pretrained(src)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emb = Embedder.from_pretrained(src, add_special_tokens=True)
    legacy = [str(w.message) for w in caught if "Qwen2_5_VLImageProcessor" in str(w.message)]
    assert len(legacy) == 1 and "Qwen2VLImageProcessor" in legacy[0]  # said once, not twice
    assert type(emb.processor.image_processor).__name__.startswith("Qwen2VLImageProcessor")
    assert emb.encode([EmbedInput("", "", [Image.new("RGB", (64, 64))])]).embeddings.shape \
        == (1, 256)


def test_baseline_evaluation_of_an_untouched_base_equals_the_prepared_one(
        real_layout, prepared, synth, tmp_path):
    """Evaluating a hub base as a baseline works with no prepare step (tokens added in
    memory, warned) and scores exactly what the prepared base scores."""
    from mmemb.configs.evaluate import EvaluateConfig
    from mmemb.stages.evaluate import run

    def score(model, name):
        cfg = EvaluateConfig(model=str(model), eval=str(synth["eval"]),
                             image_root=str(synth["image_root"]), out=str(tmp_path / name),
                             modes=["direct"], batch_size=8, max_queries=4,
                             tasks=["syn_cls_shape", "syn_qa_count"])
        return run(cfg).metrics

    with pytest.warns(UserWarning, match="added in memory"):
        raw = score(real_layout("qwen3_vl"), "raw")
    prep = score(prepared("qwen3_vl"), "prep")
    keys = [k for k in raw if k.startswith("direct.") and "latency" not in k]
    assert keys and {k: raw[k] for k in keys} == {k: prep[k] for k in keys}
