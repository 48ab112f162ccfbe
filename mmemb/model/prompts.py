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
import re
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict

THINK, END_THINK, EMB = "<think>", "</think>", "<emb>"
SPECIAL_TOKENS = (THINK, END_THINK, EMB)
IMAGE_MARKER = "<|image_1|>"  # MMEB's image slot in instructions
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"

#: Qwen chat/vision markup (``<|im_start|>``, ``<|image_pad|>``, ...: every ``<|name|>``
#: but MMEB's own ``<|image_N|>`` slots, which are no tokens) and the tag-like tokens of
#: the Qwen-VL tokenizers and the method.
_PIPE_MARKUP = re.compile(r"<\|(?!image_\d+\|>)[A-Za-z0-9_]+\|>")
TAG_TOKENS = (THINK, END_THINK, EMB, "<tool_call>", "</tool_call>", "<tool_response>",
              "</tool_response>")
#: Inserted after the ``<`` of a reserved string found in data, so no tokenizer (ours,
#: vLLM's, a chat template's) can read it as the special token.
ESCAPE = "\u200b"  # zero-width space
EMBEDDING_CONFIG_FILE = "mmemb_embedding.json"
PROMPT_VERSION = "qwen-chat-v1"


class EmbeddingConfig(BaseModel):
    """How a checkpoint turns inputs into embeddings; saved with it and checked on load."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_version: str = PROMPT_VERSION
    #: The system turn; None: none (Qwen3-VL's template has no default system turn, so a
    #: Qwen3-VL base gets None, see mmemb.model.loading.default_embedding_config).
    system: str | None = "You are a helpful assistant."
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


def escape_markup(text: str, extra: tuple[str, ...] = ()) -> str:
    """``text`` with every reserved string (chat and vision markup, ``<think>``,
    ``</think>``, ``<emb>``, ``extra``) made plain text: :data:`ESCAPE` after its ``<``.

    Data and rationales are text, never structure: a query holding ``<emb>`` or
    ``<|im_start|>`` must not add a pooling position or a chat turn, and one holding
    ``<|vision_start|><|image_pad|><|vision_end|>`` must not add an image slot. Escaping
    the string (rather than ``split_special_tokens=True`` at tokenisation) works for every
    consumer of the prompt string: the embedder's processor, vLLM, the teachers' chat
    templates; and ``split_special_tokens`` leaves non-special added tokens such as
    Qwen3-VL's ``<think>``/``</think>`` whole. The cost: one zero-width token per
    occurrence; text without reserved strings is unchanged.
    """
    if "<" not in text:
        return text
    text = _PIPE_MARKUP.sub(lambda m: "<" + ESCAPE + m.group(0)[1:], text)
    for t in dict.fromkeys(TAG_TOKENS + tuple(extra)):
        if t and t in text:
            text = text.replace(t, t[0] + ESCAPE + t[1:])
    return text


def user_content(inp: EmbedInput, cfg: EmbeddingConfig | None = None) -> str:
    """The user turn: images first (or where ``<|image_1|>`` marks them), then the text.

    Spaces right after an image are dropped: the chat templates render an image item and
    the text item after it with nothing between (``<|vision_end|>Represent ...``); MMEB's
    ``<|image_1|> Represent ...`` would otherwise put a space token there. Newlines are
    kept (they are the data's own). Reserved strings in the instruction and the text are
    escaped (:func:`escape_markup`): only the image slots this function writes are markup.
    """
    extra = _method_tokens(cfg)
    inst = escape_markup(inp.instruction or "", extra)
    n_img = len(inp.images)
    body = inst
    if n_img:
        markers = [f"<|image_{i + 1}|>" for i in range(n_img)]
        placed = [m for m in markers if m in body]
        for m in placed:
            body = re.sub(re.escape(m) + r"[ \t]*", QWEN_IMAGE, body)
        missing = n_img - len(placed)
        body = QWEN_IMAGE * missing + body.lstrip(" \t")
    else:
        body = body.replace(IMAGE_MARKER, "")
    body = body.strip()
    if inp.text:
        text = escape_markup(inp.text, extra)
        body = f"{body}\n{text}" if body else text
    return body


def _method_tokens(cfg: EmbeddingConfig | None) -> tuple[str, ...]:
    return () if cfg is None else (cfg.think_token, cfg.end_think_token, cfg.emb_token)


def prompt_prefix(inp: EmbedInput, cfg: EmbeddingConfig | None = None) -> str:
    """Everything up to and including the assistant header (the gate decides next)."""
    cfg = cfg or EmbeddingConfig()
    system = "" if cfg.system is None else f"<|im_start|>system\n{cfg.system}<|im_end|>\n"
    return (f"{system}<|im_start|>user\n{user_content(inp, cfg)}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def embed_prompt(inp: EmbedInput, cfg: EmbeddingConfig | None = None,
                 rationale: str | None = None) -> str:
    """The full string whose last token is ``<emb>``: direct, or reasoning when given ``r``."""
    cfg = cfg or EmbeddingConfig()
    r = rationale if rationale is not None else inp.rationale
    if r is None:
        return prompt_prefix(inp, cfg) + cfg.emb_token
    r = escape_markup(r, _method_tokens(cfg))  # a rationale is text: it cannot close the span
    return prompt_prefix(inp, cfg) + f"{cfg.think_token}{r}{cfg.end_think_token}{cfg.emb_token}"


def teacher_messages(inp: EmbedInput, template: str) -> list[dict]:
    """The teacher's user turn as chat messages (text and image items in order), for the
    checkpoint's own ``apply_chat_template``."""
    text = template.format(content=user_content(inp))
    items: list[dict] = []
    for i, piece in enumerate(text.split(QWEN_IMAGE)):
        if i:
            items.append({"type": "image"})
        if piece:
            items.append({"type": "text", "text": piece})
    return [{"role": "user", "content": items}]


def teacher_prompt(inp: EmbedInput, template: str, render=None) -> str:
    """A rationale-generation prompt for a teacher (stage 1), ``{content}`` filled in.

    ``render``: the teacher checkpoint's chat template (``processor.apply_chat_template``,
    see :func:`chat_renderer`), so a teacher sees the format it was trained on. Without one
    (the oracle, which runs no model) the Qwen2-VL template's rendering is written out.
    """
    if render is not None:
        return render(teacher_messages(inp, template))
    return (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            f"<|im_start|>user\n{template.format(content=user_content(inp))}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def chat_renderer(processor):
    """``messages -> prompt string`` through a processor's (or tokenizer's) chat template,
    with the generation prompt; None when it has no template."""
    if getattr(processor, "chat_template", None) is None and getattr(
            getattr(processor, "tokenizer", None), "chat_template", None) is None:
        return None

    def render(messages: list[dict]) -> str:
        return processor.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
    return render
