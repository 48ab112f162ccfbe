"""Chat prompts and the special tokens of the embedding formats.

Direct mode:     <chat prompt> <|im_start|>assistant\\n <emb>
Reasoning mode:  <chat prompt> <|im_start|>assistant\\n <think> r </think> <emb>

The embedding is the last-layer hidden state at ``<emb>``. The first assistant token is the
gate: ``<think>`` (reason first) or ``<emb>`` (embed now), so the policy that decides is the
embedding model itself.

The prompt format is written as plain Qwen chat markup rather than through a tokenizer's
chat template: the same string then goes to transformers, to vLLM and into the
:class:`EmbeddingConfig` saved beside every checkpoint, so training and evaluation cannot
drift apart (the most reported cause of near-random MMEB scores among peers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict

THINK, END_THINK, EMB = "<think>", "</think>", "<emb>"
SPECIAL_TOKENS = (THINK, END_THINK, EMB)
IMAGE_MARKER = "<|image_1|>"  # MMEB's image slot in instructions
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
EMBEDDING_CONFIG_FILE = "mmemb_embedding.json"
PROMPT_VERSION = "qwen-chat-v1"


class EmbeddingConfig(BaseModel):
    """How a checkpoint turns inputs into embeddings; saved with it and checked on load."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_version: str = PROMPT_VERSION
    system: str = "You are a helpful assistant."
    think_token: str = THINK
    end_think_token: str = END_THINK
    emb_token: str = EMB
    pooling: str = "emb_token_last_layer"
    normalize: bool = True

    def save(self, folder: str | Path) -> None:
        Path(folder, EMBEDDING_CONFIG_FILE).write_text(self.model_dump_json(indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> EmbeddingConfig | None:
        p = Path(folder, EMBEDDING_CONFIG_FILE)
        return cls.model_validate(json.loads(p.read_text())) if p.is_file() else None


@dataclass
class EmbedInput:
    """One thing to embed: an instruction, text and zero or more images (paths or PIL)."""

    text: str = ""
    instruction: str = ""
    images: list = field(default_factory=list)
    rationale: str | None = None  # reasoning mode when set

    @classmethod
    def from_row(cls, inst: str | None, text: str | None, img: str | None,
                 image_root: str | Path | None = None) -> EmbedInput:
        images = []
        if img:
            images = [str(Path(image_root) / img) if image_root else img]
        return cls(text=text or "", instruction=inst or "", images=images)


def user_content(inp: EmbedInput) -> str:
    """The user turn: images first (or where ``<|image_1|>`` marks them), then the text."""
    inst = inp.instruction or ""
    n_img = len(inp.images)
    body = inst
    if n_img:
        markers = [f"<|image_{i + 1}|>" for i in range(n_img)]
        placed = [m for m in markers if m in body]
        for m in placed:
            body = body.replace(m, QWEN_IMAGE)
        missing = n_img - len(placed)
        body = QWEN_IMAGE * missing + body
    else:
        body = body.replace(IMAGE_MARKER, "")
    body = body.strip()
    if inp.text:
        body = f"{body}\n{inp.text}" if body else inp.text
    return body


def prompt_prefix(inp: EmbedInput, cfg: EmbeddingConfig | None = None) -> str:
    """Everything up to and including the assistant header (the gate decides next)."""
    cfg = cfg or EmbeddingConfig()
    return (f"<|im_start|>system\n{cfg.system}<|im_end|>\n"
            f"<|im_start|>user\n{user_content(inp)}<|im_end|>\n<|im_start|>assistant\n")


def embed_prompt(inp: EmbedInput, cfg: EmbeddingConfig | None = None,
                 rationale: str | None = None) -> str:
    """The full string whose last token is ``<emb>``: direct, or reasoning when given ``r``."""
    cfg = cfg or EmbeddingConfig()
    r = rationale if rationale is not None else inp.rationale
    if r is None:
        return prompt_prefix(inp, cfg) + cfg.emb_token
    return prompt_prefix(inp, cfg) + f"{cfg.think_token}{r}{cfg.end_think_token}{cfg.emb_token}"


def teacher_prompt(inp: EmbedInput, template: str) -> str:
    """A rationale-generation prompt for a teacher (stage 1), ``{content}`` filled in."""
    return (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            f"<|im_start|>user\n{template.format(content=user_content(inp))}<|im_end|>\n"
            f"<|im_start|>assistant\n")
