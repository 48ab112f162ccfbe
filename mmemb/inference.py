"""Adaptive inference: reason only where the model's own gate says reasoning helps.

``encode(inputs, mode)`` runs, per batch:

1. the decision pass: one forward pass over the prompts up to the assistant header; the
   gate is the next-token choice between ``<think>`` and ``<emb>`` (only those two rows of
   the LM head are applied, no vocabulary-sized logits);
2. generation only for the inputs that reason (``<think>`` ... ``</think>``, within a token
   budget); vLLM is used when it is installed and asked for, else transformers ``generate``;
3. one embedding pass over all inputs (direct prompt or ``<think> r </think><emb>``).

Modes: ``direct`` (never reason), ``reason`` (always), ``adaptive`` (the gate decides).

Example::

    >>> enc = AdaptiveEncoder(Embedder.from_pretrained("runs/demo/gate/policy"))  # doctest: +SKIP
    >>> out = enc.encode([EmbedInput(text="2 circles and 3 squares: how many?")],
    ...                  mode="adaptive")                                        # doctest: +SKIP
    >>> out.reasoned, out.rationales                                          # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from mmemb.model.embedder import Embedder
from mmemb.model.prompts import EmbedInput, prompt_prefix

Mode = Literal["direct", "reason", "adaptive"]
MODES = ("direct", "reason", "adaptive")


@dataclass
class EncodeResult:
    """Embeddings plus how each was produced; what the evaluation harness reports on."""

    embeddings: torch.Tensor  # [N, H]
    reasoned: list[bool] = field(default_factory=list)
    rationales: list[str | None] = field(default_factory=list)
    n_gen_tokens: list[int] = field(default_factory=list)
    n_prompt_tokens: list[int] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    p_think: list[float] = field(default_factory=list)
    malformed: list[bool] = field(default_factory=list)  # budget hit before </think>


@dataclass
class Rollout:
    """One generated rationale: its token ids, text and whether it closed ``</think>``."""

    ids: list[int]  # generated ids after <think>, including </think> when it was emitted
    text: str
    finished: bool


class AdaptiveEncoder:
    """Wraps an :class:`Embedder` with the gate and rationale generation."""

    def __init__(self, embedder: Embedder, budget: int = 64, threshold: float = 0.5,
                 temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 16):
        self.emb = embedder
        self.budget = budget
        self.threshold = threshold
        self.temperature = temperature
        self.top_p = top_p
        self.batch_size = batch_size
        tok = embedder.tokenizer
        self.im_end_id = tok.convert_tokens_to_ids("<|im_end|>")
        self.stop_ids = [embedder.end_think_id, self.im_end_id, embedder.emb_id]
        # Tokens a rationale may never contain: vision placeholders would desynchronise image
        # features from image tokens, and a nested <think> is malformed by definition.
        banned = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>",
                  "<|im_start|>", "<|endoftext|>", embedder.config.think_token]
        vocab = tok.get_vocab()
        self.suppress_ids = [vocab[t] for t in banned if t in vocab]

    # ------------------------------------------------------------------ the gate
    def prefix_batch(self, inputs: list[EmbedInput], suffix: str = "",
                     padding_side: str = "right") -> dict[str, torch.Tensor]:
        tok = self.emb.tokenizer
        old = tok.padding_side
        tok.padding_side = padding_side
        try:
            texts = [prompt_prefix(x, self.emb.config) + suffix for x in inputs]
            return self.emb.tokenize(texts, [x.images for x in inputs])
        finally:
            tok.padding_side = old

    def gate_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of (``<emb>``, ``<think>``) after the assistant header: [B, 2]."""
        hidden = self.emb.hidden_states(batch)  # [B, T, H]
        last = batch["attention_mask"].sum(1) - 1  # [B] (right padding)
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, H]
        w = self.emb.model.lm_head.weight[[self.emb.emb_id, self.emb.think_id]]  # [2, H]
        return h @ w.T  # [B, 2]

    @torch.no_grad()
    def p_think(self, inputs: list[EmbedInput]) -> torch.Tensor:
        """Gate probability of reasoning per input: [N]."""
        logits = self.gate_logits(self.prefix_batch(inputs))
        return torch.softmax(logits.float(), dim=-1)[:, 1].cpu()

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, inputs: list[EmbedInput], *, do_sample: bool | None = None,
                 temperature: float | None = None, num_return_sequences: int = 1,
                 max_new_tokens: int | None = None) -> list[Rollout]:
        """Rationales after ``<think>`` for each input (``num_return_sequences`` each).

        Returns ``len(inputs) * num_return_sequences`` rollouts, grouped by input.
        """
        if not inputs:
            return []
        temp = self.temperature if temperature is None else temperature
        sample = (temp > 0) if do_sample is None else do_sample
        batch = self.prefix_batch(inputs, suffix=self.emb.config.think_token,
                                  padding_side="left")
        n_in = batch["input_ids"].shape[1]
        kw = dict(max_new_tokens=max_new_tokens or self.budget, do_sample=sample,
                  eos_token_id=self.stop_ids, pad_token_id=self.emb.tokenizer.pad_token_id,
                  num_return_sequences=num_return_sequences, suppress_tokens=self.suppress_ids)
        if sample:
            kw.update(temperature=max(temp, 1e-4), top_p=self.top_p, top_k=0)
        out = self.emb.model.generate(**batch, **kw)  # [B * n, T + new]
        rollouts = []
        for row in out[:, n_in:].tolist():
            ids: list[int] = []
            finished = False
            for t in row:
                if t == self.emb.end_think_id:
                    ids.append(t)
                    finished = True
                    break
                if t in (self.im_end_id, self.emb.emb_id, self.emb.tokenizer.pad_token_id):
                    break  # a stop other than </think>: malformed, rationale ends here
                ids.append(t)
            body = ids[:-1] if finished else ids
            text = self.emb.tokenizer.decode(body, skip_special_tokens=True).strip()
            rollouts.append(Rollout(ids, text, finished))
        return rollouts

    # ------------------------------------------------------------------ encode
    @torch.no_grad()
    def encode(self, inputs: list[EmbedInput], mode: Mode = "adaptive",
               batch_size: int | None = None, show_progress: bool = False) -> EncodeResult:
        """Embed ``inputs`` in ``mode``; per-input latency is its share of its batch's time.

        Latency accounting: the decision and embedding passes are shared equally by the
        batch; generation time is shared by the inputs that reasoned. Run with
        ``batch_size=1`` for true per-query latency (the benchmark does).
        """
        from tqdm.auto import tqdm

        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: choose one of {MODES}")
        bs = batch_size or self.batch_size
        was_training = self.emb.model.training
        self.emb.model.eval()
        res = EncodeResult(torch.zeros(0))
        chunks = []
        try:
            for s in tqdm(range(0, len(inputs), bs), disable=not show_progress, desc=mode):
                chunks.append(self._encode_batch(inputs[s:s + bs], mode, res))
        finally:
            self.emb.model.train(was_training)
        res.embeddings = (torch.cat(chunks) if chunks
                          else torch.zeros(0, self.emb.hidden_size))
        return res

    def _encode_batch(self, xs: list[EmbedInput], mode: Mode, res: EncodeResult
                      ) -> torch.Tensor:
        n = len(xs)
        t0 = time.perf_counter()
        if mode == "adaptive":
            p = self.p_think(xs)
            think = (p > self.threshold).tolist()
        else:
            p = torch.full((n,), 1.0 if mode == "reason" else 0.0)
            think = [mode == "reason"] * n
        t_dec = time.perf_counter() - t0 if mode == "adaptive" else 0.0
        idx = [i for i in range(n) if think[i]]
        t1 = time.perf_counter()
        rolls = self.generate([xs[i] for i in idx]) if idx else []
        t_gen = time.perf_counter() - t1
        rat: list[str | None] = [None] * n
        ngen = [0] * n
        malformed = [False] * n
        for i, r in zip(idx, rolls, strict=True):
            rat[i], ngen[i], malformed[i] = r.text, len(r.ids), not r.finished
        t2 = time.perf_counter()
        emb_in = [EmbedInput(x.text, x.instruction, x.images, rationale=rat[i])
                  for i, x in enumerate(xs)]
        out = self.emb.embed(emb_in, mode="auto")  # reasoning prompt where a rationale exists
        t_emb = time.perf_counter() - t2
        shared = (t_dec + t_emb) / n
        gen_share = t_gen / max(1, len(idx))
        res.reasoned += think
        res.rationales += rat
        res.n_gen_tokens += ngen
        res.n_prompt_tokens += out.n_tokens.tolist()
        res.p_think += p.tolist()
        res.malformed += malformed
        res.latency_ms += [1000 * (shared + (gen_share if think[i] else 0.0)) for i in range(n)]
        return out.embeddings.cpu()
