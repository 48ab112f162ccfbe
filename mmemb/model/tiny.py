"""Build the embedded default: a tiny Qwen-VL model of the real architecture.

Random weights (seed-fixed), a byte-level BPE tokenizer trained here in milliseconds on the
synthetic world's vocabulary plus Qwen's special tokens and ``<think>``/``</think>``/``<emb>``,
and an image processor from class defaults with a small pixel budget. It is saved with
``save_pretrained`` so every stage loads it through exactly the ``from_pretrained`` path a
real checkpoint (``Qwen/Qwen3-VL-4B-Instruct``) takes on a cluster. Nothing is downloaded.

Run alone::

    python -m mmemb.model.tiny --out runs/demo/tiny-qwen2vl --arch qwen2_vl --seed 0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mmemb  # noqa: F401  (applies the CPU torchvision shim before transformers loads)
from mmemb.model.prompts import SPECIAL_TOKENS, EmbeddingConfig

ARCHS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _corpus() -> list[str]:
    """Text the tokenizer learns merges from: the synthetic world's words and digits."""
    from mmemb.data import synth

    words = list(synth.COLOURS) + list(synth.SHAPES) + list(synth.NUMBER_WORDS)
    lines = [" ".join(words), "0 1 2 3 4 5 6 7 8 9 10 plus is so there are in total",
             "the picture shows one image contains answer question about which of absent",
             "left right opposite side region text refers select find caption represent given",
             "classification scene has colours missing shapes circles squares triangles",
             "You are a helpful assistant. Think step by step about what the target is."]
    return lines * 50


def build_tokenizer(vocab_size: int = 1024):
    """Byte-level BPE + Qwen special tokens, wrapped as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = QWEN_SPECIAL + list(SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None,
                                   additional_special_tokens=specials[1:],
                                   model_max_length=4096)
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def build_config(arch: str, tok, hidden: int = 64, layers: int = 2, heads: int = 2):
    """A few-layer config of ``arch`` whose shapes satisfy the real model's constraints.

    head_dim = hidden / heads must be one vLLM's CPU attention supports (32, 64, ...; 16 is
    refused at the first generate call), hence 2 heads of 32 at hidden 64.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    head_dim = hidden // heads  # mrope_section must sum to head_dim / 2
    half = head_dim // 2
    mrope = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                max_position_embeddings=4096, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                tie_word_embeddings=True)
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"],
                  vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    if arch == "qwen2_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                                   "mrope_section": mrope}
        vision = dict(depth=1, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **common)
    elif arch == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                                   "mrope_section": mrope}
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                      out_hidden_size=hidden, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0])
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    elif arch == "qwen3_vl":
        text["head_dim"] = head_dim
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                                   "mrope_section": mrope, "mrope_interleaved": True}
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                      out_hidden_size=hidden, patch_size=16, spatial_merge_size=2,
                      temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[1])
        cfg = Qwen3VLConfig(text_config=text, vision_config=vision, **common)
    else:
        raise ValueError(f"arch={arch!r}: choose one of {ARCHS}")
    return cfg


def model_class(arch: str):
    from transformers import (
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
        Qwen3VLForConditionalGeneration,
    )

    return {"qwen2_vl": Qwen2VLForConditionalGeneration,
            "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
            "qwen3_vl": Qwen3VLForConditionalGeneration}[arch]


def build_processor(arch: str, tok):
    """Processor from class defaults, with a pixel budget that suits 56-64 px images."""
    from transformers import (
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
        Qwen3VLProcessor,
    )

    if arch == "qwen3_vl":
        from transformers import Qwen3VLVideoProcessor

        patch = 16
        vid = Qwen3VLVideoProcessor(patch_size=patch)
        cls = Qwen3VLProcessor
    else:
        patch = 14
        vid = Qwen2VLVideoProcessor(patch_size=patch)
        cls = Qwen2_5_VLProcessor if arch == "qwen2_5_vl" else Qwen2VLProcessor
    factor = patch * 2
    img = Qwen2VLImageProcessor(patch_size=patch, merge_size=2,
                                size={"shortest_edge": factor * factor,
                                      "longest_edge": 4 * factor * factor})
    return cls(image_processor=img, tokenizer=tok, video_processor=vid,
               chat_template=CHAT_TEMPLATE)


def build_tiny(out: str | Path, arch: str = "qwen2_vl", seed: int = 0, hidden: int = 64,
               layers: int = 2, heads: int = 2, pretrain_steps: int = 0) -> Path:
    """Create and save the tiny model, tokenizer, processor and embedding config.

    ``pretrain_steps > 0`` then runs the simulated pretraining of
    :mod:`mmemb.model.pretrain` (the demo's base model needs it: with random weights every
    rationale scores the same in stage 2); 0 keeps the random weights (fast, for tests).
    """
    import torch

    out = Path(out)
    tok = build_tokenizer()
    cfg = build_config(arch, tok, hidden=hidden, layers=layers, heads=heads)
    cfg.architectures = [model_class(arch).__name__]
    torch.manual_seed(seed)
    model = model_class(arch)(cfg)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    proc = build_processor(arch, tok)
    proc.save_pretrained(out)
    proc.image_processor.save_pretrained(out)  # preprocessor_config.json: vLLM's loader reads it
    tok.save_pretrained(out)
    EmbeddingConfig().save(out)
    (out / "mmemb_tiny.json").write_text(json.dumps({"arch": arch, "seed": seed,
                                                     "hidden": hidden, "layers": layers,
                                                     "heads": heads}))
    if pretrain_steps > 0:
        from mmemb.model.pretrain import pretrain_tiny

        pretrain_tiny(out, steps=pretrain_steps, seed=seed)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Build the tiny Qwen-VL model of the demo.")
    p.add_argument("--out", required=True)
    p.add_argument("--arch", default="qwen2_vl", choices=ARCHS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-steps", type=int, default=0,
                   help="simulated pretraining steps (mmemb.model.pretrain; the demo uses 200)")
    a = p.parse_args(argv)
    print(build_tiny(a.out, a.arch, a.seed, pretrain_steps=a.pretrain_steps))


if __name__ == "__main__":
    main()
