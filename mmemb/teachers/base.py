"""What every teacher backend shares: requests in, K candidates per request out.

A teacher sees one instance only (the query, or the target), never the pair: candidates are
samples of the prior p(r | x), and stage 2 judges them against the pair afterwards. Every
request yields exactly K :class:`Candidate` objects, failed ones included (status ``error``
with the message), so a crash in one prompt can never make rows disappear silently.

The prompt templates are versioned: the version string is written into every rationale
row, so a change of wording is visible in the data, not only in the code history.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Protocol

from mmemb.model.prompts import SPECIAL_TOKENS, EmbedInput, teacher_prompt

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

    def prompt(self, template: str) -> str:
        return teacher_prompt(self.inp, template)


@dataclass
class Candidate:
    """One sampled rationale and how its generation ended."""

    text: str | None
    n_tokens: int | None
    finish_reason: str | None  # "stop" | "length" | "error"
    status: str  # ok | truncated | empty | error
    error: str | None = None
    oracle_label: str | None = None

    @classmethod
    def failed(cls, message: str) -> Candidate:
        return cls(None, None, "error", "error", message[:2000])


def finalize(text: str | None, n_tokens: int | None, finish_reason: str | None,
             oracle_label: str | None = None) -> Candidate:
    """Status from how generation ended; reserved tokens make the row malformed.

    The text is kept verbatim (an audit must see what the teacher wrote); ``error`` names
    the reserved tokens and stage 3 filters the row out.
    """
    if finish_reason == "length":
        status = "truncated"
    elif text is None or not text.strip():
        status = "empty"
    else:
        status = "ok"
    bad = reserved_in(text)
    err = f"{MALFORMED_PREFIX} contains reserved token(s) {bad}" if bad else None
    return Candidate(text, n_tokens, finish_reason, status, err, oracle_label)


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


class Teacher(Protocol):
    """A backend: ``generate`` returns, for each request, exactly ``info.k`` candidates."""

    info: TeacherInfo

    def generate(self, requests: list[GenRequest], template: str) -> list[list[Candidate]]: ...

    def close(self) -> None: ...


def normalize_text(text: str) -> str:
    """Case- and whitespace-insensitive form used to find duplicate rationales."""
    return re.sub(r"\s+", " ", text.strip().lower())
