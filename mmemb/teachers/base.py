"""What every teacher backend shares: requests in, K candidates per request out.

A teacher sees one instance only (the query, or the target), never the pair: candidates are
samples of the prior p(r | x), and stage 2 judges them against the pair afterwards. Every
request yields exactly K :class:`Candidate` objects, failed ones included (status ``error``
with the message), so a crash in one prompt can never make rows disappear silently.

The prompt templates are versioned: the version string is written into every rationale
row, so a change of wording is visible in the data, not only in the code history.

Model teachers (vLLM, transformers) share :class:`PromptBudget`: the prompt is rendered with
the teacher checkpoint's *own* chat template (a Qwen3-VL teacher gets no system turn, a
Qwen2-VL one its default), images are resized onto the processor grid under the run's
``[min_pixels, max_pixels]``, and every prompt is measured before submission: one longer
than the engine's ``max_model_len`` is not sent (vLLM would reject the whole chunk) but kept
as K rows with status ``too_long`` and its token count.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from mmemb.model.prompts import (
    END_THINK,
    SPECIAL_TOKENS,
    THINK,
    EmbedInput,
    chat_renderer,
    teacher_prompt,
)

ThinkOutput = Literal["answer", "thinking"]
#: The placeholder a chat template writes once per image; the processor (and vLLM) expand it
#: to the image's tokens.
IMAGE_PAD = "<|image_pad|>"

#: Versioned teacher prompt templates (``{content}`` = the instance's user turn). Add a new
#: version instead of editing one: old artifacts keep naming the wording they were made with.
PROMPT_TEMPLATES: dict[str, str] = {
    "rationale-query-v1": (
        "Here is a query for a retrieval system.\n{content}\n"
        "Think step by step about what the matching target must contain, and write that "
        "reasoning in one or two short sentences. Do not answer with anything else."),
    "rationale-target-v1": (
        "Here is a candidate target of a retrieval system.\n{content}\n"
        "Describe in one or two short sentences what a query that this target answers "
        "would ask for."),
}
DEFAULT_PROMPT_VERSION = {"query": "rationale-query-v1", "target": "rationale-target-v1"}

#: Tokens a rationale must not contain: the embedding formats' own markers and Qwen's chat
#: and vision markers. A rationale with one of them would close the reasoning span early or
#: move the pooling position, so it is kept as a row but marked malformed.
RESERVED_TOKENS: tuple[str, ...] = tuple(SPECIAL_TOKENS) + (
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>")
MALFORMED_PREFIX = "malformed:"


def reserved_in(text: str | None) -> list[str]:
    """The reserved tokens that occur in ``text`` (empty list: well-formed)."""
    if not text:
        return []
    return [t for t in RESERVED_TOKENS if t in text]


def request_seed(seed: int, *parts: str) -> int:
    """A per-request seed from the teacher seed and the request's identity.

    Independent of batching and sharding, so a resumed run samples the same rationales as
    an uninterrupted one. 62-bit and positive: vLLM seeds the n samples of a request with
    seed, seed + 1, ..., which must stay inside int64 (and torch accepts it).
    """
    h = hashlib.sha256(":".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 62) - 1)


@dataclass
class GenRequest:
    """One instance to write K rationales for."""

    pair_id: str
    side: str  # "query" | "target"
    inp: EmbedInput  # image paths already resolved against the image root
    meta: dict | None = None  # the synthetic world's scene metadata (oracle only)
    seed: int = 0  # the per-request seed (see request_seed)

    def prompt(self, template: str, render=None) -> str:
        """The prompt; ``render``: the teacher checkpoint's chat template (see
        :func:`mmemb.model.prompts.chat_renderer`), None: the plain Qwen2-VL format."""
        return teacher_prompt(self.inp, template, render=render)


@dataclass
class Candidate:
    """One sampled rationale and how its generation ended.

    ``text`` is the rationale; ``raw_text`` the teacher's verbatim output when ``text`` was
    cut out of it (a ``<think>`` span parsed, see :func:`split_think`), else None.
    ``n_tokens``: tokens of the rationale (for a verbatim output: the tokens generated).
    ``prompt_tokens``: the prompt's length as measured before submission (model teachers).
    """

    text: str | None
    n_tokens: int | None
    finish_reason: str | None  # "stop" | "length" | "error"; None: never generated
    status: str  # ok | truncated | empty | error | too_long
    error: str | None = None
    oracle_label: str | None = None
    raw_text: str | None = None
    prompt_tokens: int | None = None

    @classmethod
    def failed(cls, message: str, prompt_tokens: int | None = None) -> Candidate:
        return cls(None, None, "error", "error", message[:2000], prompt_tokens=prompt_tokens)

    @classmethod
    def too_long(cls, prompt_tokens: int, max_model_len: int) -> Candidate:
        """A prompt that was not submitted: it leaves no room for one output token."""
        return cls(None, None, None, "too_long", too_long_message(prompt_tokens, max_model_len),
                   prompt_tokens=prompt_tokens)


def too_long_message(prompt_tokens: int, max_model_len: int) -> str:
    rel = ">" if prompt_tokens > max_model_len else "="
    return (f"prompt of {prompt_tokens:,} tokens {rel} max_model_len {max_model_len} (no room "
            "to generate): lower run.resolution.max_pixels or raise max_model_len")


def split_think(text: str) -> tuple[str | None, str | None]:
    """(thinking, answer) of an output that writes its own thinking span.

    Two shapes (Qwen3-VL Thinking style): ``<think>reasoning</think>answer``, or
    ``reasoning</think>answer`` when the chat template already opened ``<think>``. Split at
    the first ``</think>``; an output that opens ``<think>`` and never closes it has thinking
    and no answer (None). Without either marker: no thinking, the text is the answer.
    """
    if END_THINK in text:
        head, _, tail = text.partition(END_THINK)
        head = head.strip()
        if head.startswith(THINK):
            head = head[len(THINK):]
        return head.strip(), tail.strip()
    body = text.lstrip()
    if body.startswith(THINK):
        return body[len(THINK):].strip(), None
    return None, text


def finalize(text: str | None, n_tokens: int | None, finish_reason: str | None,
             oracle_label: str | None = None, think: ThinkOutput | None = None,
             count=None, prompt_tokens: int | None = None) -> Candidate:
    """Status from how generation ended; reserved tokens make the row malformed.

    ``think`` (a model teacher's ``think_output``): an output with its own ``<think>`` span
    is parsed rather than marked malformed, and ``text`` becomes the answer after
    ``</think>`` (``answer``: the prompt asks for one or two sentences, the thinking is the
    model's scratchpad) or the thinking (``thinking``). Thinking that never closes has no
    answer: an ``answer`` row is then ``empty`` (or ``truncated``). The verbatim output goes
    to ``raw_text`` so an audit still sees what the teacher wrote, and ``n_tokens`` becomes
    the rationale's own length (``count``: text -> tokens), which is what stage 3's length
    filter is about. Without ``think`` (the oracle) the text is kept verbatim.

    A rationale that still holds a reserved token after parsing (a second ``<think>``, a
    chat marker) keeps it; ``error`` names the tokens and stage 3 filters the row out.
    """
    raw = None
    if think is not None and text and (END_THINK in text or text.lstrip().startswith(THINK)):
        thinking, answer = split_think(text)
        raw, text = text, (answer if think == "answer" else thinking) or ""
        if count is not None:
            n_tokens = count(text) if text else 0
    if finish_reason == "length":
        status = "truncated"
    elif text is None or not text.strip():
        status = "empty"
    else:
        status = "ok"
    bad = reserved_in(text)
    err = f"{MALFORMED_PREFIX} contains reserved token(s) {bad}" if bad else None
    if err is None and raw is not None and think == "answer" and END_THINK not in raw:
        err = ("thinking never closed (no </think>), so no answer was written; with a "
               "'</think>' stop string use think_output 'thinking'")
    return Candidate(text, n_tokens, finish_reason, status, err, oracle_label, raw,
                     prompt_tokens)


@dataclass
class TeacherInfo:
    """What is recorded about a teacher on every row it produces."""

    teacher_id: str
    backend: str
    model: str | None
    k: int
    sampling: dict = field(default_factory=dict)

    def sampling_json(self) -> str:
        return json.dumps(self.sampling, sort_keys=True)


@dataclass
class Measured:
    """A request's rendered prompt and its length in tokens, as the engine will see it."""

    prompt: str
    n_tokens: int


class PromptBudget:
    """Render, measure and prepare a model teacher's prompts with its checkpoint's processor.

    * The prompt is the checkpoint's own chat template (``chat_renderer``; the plain format
      when the processor has none).
    * Images are resized onto the processor grid within the run's ``[min_pixels,
      max_pixels]`` (:func:`mmemb.model.resolution.fit_image`), so transformers and vLLM get
      the same pixels, and the student later sees the same resolution.
    * The length is counted without decoding an image: the rendered prompt's text tokens,
      minus the one ``<|image_pad|>`` placeholder per image, plus the tokens each image
      becomes (:func:`mmemb.model.resolution.image_tokens`, from the file header). This is
      what ``processor(images=..., text=...)`` produces, and what vLLM checks against
      ``max_model_len``; a prompt that leaves no room for one output token is not submitted
      (:meth:`check`).
    """

    def __init__(self, processor, max_model_len: int, max_pixels: int | None = None,
                 min_pixels: int | None = None):
        from mmemb.model.resolution import Grid

        self.processor = processor
        self.tok = getattr(processor, "tokenizer", processor)
        self.render = chat_renderer(processor)
        self.grid = Grid.of(processor)
        self.max_model_len = max_model_len
        self.max_pixels, self.min_pixels = max_pixels, min_pixels

    def text_tokens(self, text: str) -> int:
        """Tokens of a piece of output text (no special tokens added)."""
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def count(self, prompt: str, images: list) -> int:
        """Prompt tokens with each image expanded (``images``: paths or PIL images)."""
        from mmemb.model.resolution import image_size, image_tokens

        n = len(self.tok(prompt)["input_ids"])
        n_pad = prompt.count(IMAGE_PAD)
        if n_pad != len(images):
            raise ValueError(f"prompt has {n_pad} image placeholder(s) for {len(images)} "
                             "image(s)")
        for im in images:
            w, h = image_size(im) if isinstance(im, (str, Path)) else im.size
            n += image_tokens(w, h, self.grid, self.max_pixels, self.min_pixels) - 1
        return n

    def measure(self, req: GenRequest, template: str) -> Measured:
        prompt = req.prompt(template, render=self.render)
        return Measured(prompt, self.count(prompt, req.inp.images))

    def check(self, m: Measured) -> str | None:
        """None when the prompt fits (at least one output token), else the error text."""
        if m.n_tokens < self.max_model_len:
            return None
        return too_long_message(m.n_tokens, self.max_model_len)

    def images(self, req: GenRequest) -> list:
        """The request's images, opened as RGB and resized onto the processor grid."""
        from mmemb.model.embedder import load_image
        from mmemb.model.resolution import fit_image

        return [fit_image(load_image(p), self.grid, self.max_pixels, self.min_pixels)
                for p in req.inp.images]


class Teacher(Protocol):
    """A backend: ``generate`` returns, for each request, exactly ``info.k`` candidates."""

    info: TeacherInfo

    def generate(self, requests: list[GenRequest], template: str) -> list[list[Candidate]]: ...

    def close(self) -> None: ...


def normalize_text(text: str) -> str:
    """Case- and whitespace-insensitive form used to find duplicate rationales."""
    return re.sub(r"\s+", " ", text.strip().lower())
