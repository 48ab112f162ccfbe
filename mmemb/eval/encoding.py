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

    def add_batch(self, reasoned: list[bool], rationales: list, n_gen_tokens: list[int],
                  n_prompt_tokens: list[int], p_think: list[float], malformed: list[bool]
                  ) -> None:
        """Append one batch's per-input fields (latency is each encoder's own split)."""
        self.reasoned += reasoned
        self.rationales += rationales
        self.n_gen_tokens += n_gen_tokens
        self.n_prompt_tokens += n_prompt_tokens
        self.p_think += p_think
        self.malformed += malformed


@runtime_checkable
class Encoder(Protocol):
    """What the evaluator needs from a model: embed inputs in a mode, report how."""

    def encode(self, inputs: list[EmbedInput], mode: str) -> EncodeResult: ...


class EngineEncoder:
    """The model inside a (DeepSpeed) training engine as an :class:`Encoder`, direct mode:
    how the train stage scores its eval set with the one evaluator between phases.

    Every rank must call it with the same inputs (ZeRO-3 gathers weights per forward), so
    the evaluator runs it with ``strict=True`` (no per-input retries that would desynchronise
    the ranks)."""

    def __init__(self, engine, embedder, batch_size: int):
        self.engine = engine
        self.embedder = embedder
        self.batch_size = batch_size

    def encode(self, inputs: list[EmbedInput], mode: str = "direct") -> EncodeResult:
        from mmemb.training import module

        if mode != "direct":
            raise ValueError(f"mode={mode!r}: the training engine is evaluated in direct mode")
        return EncodeResult(module.embed_inputs(self.engine, self.embedder, inputs,
                                                self.batch_size))  # [N, H]
