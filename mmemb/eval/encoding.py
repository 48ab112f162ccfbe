"""What an encoder gives the evaluation: one result type and the protocol it satisfies.

Every model path (the plain embedder, the adaptive encoder with its gate, the DeepSpeed
engine during training, a test's fake) returns :class:`EncodeResult`, so the evaluator,
``mmemb embed`` and the gate's report read the same fields and cannot tell them apart.
This module imports neither torch nor the model, so the evaluator stays importable alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from mmemb.model.prompts import EmbedInput


@dataclass
class EncodeResult:
    """Embeddings plus how each was produced, one entry per input.

    Only ``embeddings`` is required; an encoder that does not reason leaves the per-input
    lists empty and readers default them (no reasoning, no tokens, its share of the wall time).
    """

    embeddings: Any  # [N, H] torch.Tensor or np.ndarray
    reasoned: list[bool] = field(default_factory=list)
    rationales: list[str | None] = field(default_factory=list)
    n_gen_tokens: list[int] = field(default_factory=list)
    n_prompt_tokens: list[int] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    p_think: list[float] = field(default_factory=list)  # the gate's p(<think>); adaptive only
    malformed: list[bool] = field(default_factory=list)  # budget hit before </think>


@runtime_checkable
class Encoder(Protocol):
    """What the evaluator needs from a model: embed inputs in a mode, report how."""

    def encode(self, inputs: list[EmbedInput], mode: str) -> EncodeResult: ...
