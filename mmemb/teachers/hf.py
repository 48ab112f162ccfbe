"""The transformers ``generate`` teacher: a fallback, used only when a config asks for it.

Why keep it: it runs wherever transformers runs (no vLLM wheel, an architecture vLLM lacks,
a debugging session), and it is the baseline ``bench/bench_generate.py`` measures vLLM
against. It is slower: static batches padded to the longest prompt, no paged KV cache.

Batches are left-padded (decoder-only generation continues from the last real token). The
RNG is seeded per batch from the first request's seed, so a shard (always cut the same way)
samples the same rationales on every run; unlike the vLLM teacher, a request's samples
depend on the batch it is in.

Sampling is passed as a fresh ``GenerationConfig`` holding every value
(:func:`generation_config`). transformers fills only the values a passed config leaves
unset (None) from the checkpoint's ``generation_config.json``, so values equal to the
library defaults (temperature 1, repetition_penalty 1) stay as the config says; the
knobs the project does not expose (typical_p, epsilon/eta cutoffs, n-gram bans) are set to
their "off" values for the same reason. Without this, Qwen2-VL's ``top_k: 1, top_p:
0.001`` made every sample greedy (K identical candidates).

Prompts, images and the prompt budget are shared with the vLLM teacher
(:class:`mmemb.teachers.base.PromptBudget`): the checkpoint's own chat template, images on
the processor grid, and a prompt longer than ``max_model_len`` is not generated for (K
``too_long`` rows), so swapping the backend does not change which prompts run.
"""

from __future__ import annotations

import torch

from mmemb.teachers.base import (
    Candidate,
    GenRequest,
    Measured,
    PromptBudget,
    TeacherInfo,
    finalize,
    request_seed,
)


def load_model(cfg, log=print) -> tuple:
    """(processor, model, device) for a teacher config; left padding for generation."""
    from transformers import AutoModelForImageTextToText

    from mmemb.model.loading import load_processor

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}.get(cfg.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    log(f"[generate] loading transformers model {cfg.model} ({device}, {dtype})")
    trust = bool(getattr(cfg, "trust_remote_code", False))
    processor = load_processor(cfg.model, trust_remote_code=trust)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=dtype,
                                                        trust_remote_code=trust)
    model.to(device).eval()
    return processor, model, device


def generation_config(s, k: int, eos: list[int], pad: int, stop: bool = False):
    """A complete ``GenerationConfig`` for a :class:`SamplingConfig` ``s`` and K samples.

    Greedy (temperature 0) decodes once per prompt (transformers refuses several return
    sequences without sampling); the caller repeats it K times. Only the warpers that act
    when sampling are left out then: they are never applied without ``do_sample``.
    """
    from transformers import GenerationConfig

    common = dict(max_new_tokens=s.max_tokens, eos_token_id=eos, pad_token_id=pad,
                  num_beams=1, repetition_penalty=s.repetition_penalty,
                  no_repeat_ngram_size=0, min_new_tokens=0)
    if stop:
        common["stop_strings"] = list(s.stop)
    if s.temperature == 0:
        return GenerationConfig(do_sample=False, num_return_sequences=1, **common)
    return GenerationConfig(do_sample=True, num_return_sequences=k, temperature=s.temperature,
                            top_p=s.top_p, top_k=s.top_k, min_p=s.min_p, typical_p=1.0,
                            epsilon_cutoff=0.0, eta_cutoff=0.0, **common)


class HFTeacher:
    """K rationales per request from ``model.generate``, batched."""

    def __init__(self, info: TeacherInfo, cfg, seed: int, engine: tuple, log=print):
        self.info, self.cfg, self.seed, self.log = info, cfg, seed, log
        self.processor, self.model, self.device = engine
        self.tok = self.processor.tokenizer
        self.eos = {self.tok.eos_token_id, self.tok.convert_tokens_to_ids("<|im_end|>")}
        self.eos.discard(None)
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else \
            next(iter(self.eos))
        self.budget = PromptBudget(self.processor, cfg.max_model_len, cfg.max_pixels,
                                   cfg.min_pixels)
        s = cfg.sampling
        self.gen_config = generation_config(s, info.k, sorted(self.eos), self.pad,
                                            stop=bool(s.stop))

    @torch.no_grad()
    def _batch(self, reqs: list[GenRequest], measured: list[Measured]) -> list[list[Candidate]]:
        """One ``generate`` call for a batch of requests (k samples each), seeded from the
        first request so a rerun of the same shard writes the same rationales."""
        k, s = self.info.k, self.cfg.sampling
        images = [im for r in reqs for im in self.budget.images(r)]
        kw = dict(text=[m.prompt for m in measured], padding=True, return_tensors="pt")
        if images:
            kw["images"] = images
        batch = self.processor(**kw).to(self.device)
        torch.manual_seed(request_seed(self.seed, reqs[0].pair_id, reqs[0].side, "hf-batch"))
        gen = self.model.generate(**batch, generation_config=self.gen_config,
                                  **({"tokenizer": self.tok} if s.stop else {}))
        new = gen[:, batch["input_ids"].shape[1]:].cpu()  # [B*n, T]
        n = self.gen_config.num_return_sequences  # K, or 1 when greedy (repeated K times)
        out: list[list[Candidate]] = []
        ends = self.eos | {self.pad}  # after eos or a stop string, rows are padded
        for b, m in enumerate(measured):
            cands = []
            for j in range(k):
                ids = new[b * n + j % n].tolist()
                end = next((t for t, x in enumerate(ids) if x in ends), None)
                body = ids if end is None else ids[:end]
                text = self.tok.decode(body, skip_special_tokens=False)
                finish = "length" if end is None else "stop"
                hits = [text.find(x) for x in s.stop if x in text]
                if hits:  # vLLM's semantics: the stop string ends the text, excluded
                    text, finish = text[:min(hits)], "stop"
                cands.append(finalize(text, len(body) + (end is not None), finish,
                                      think=self.cfg.think_output,
                                      count=self.budget.text_tokens, prompt_tokens=m.n_tokens))
            out.append(cands)
        return out

    def generate(self, requests: list[GenRequest], template: str) -> list[list[Candidate]]:
        """K candidates per request; a failing batch is retried request by request.

        Each prompt is measured first: one over the budget gets K ``too_long`` rows and is
        not generated for (nor retried), one that cannot be measured (an unreadable image)
        K ``error`` rows.
        """
        k = self.info.k
        results: list[list[Candidate] | None] = [None] * len(requests)
        ready: list[tuple[int, Measured]] = []
        for i, r in enumerate(requests):
            try:
                m = self.budget.measure(r, template)
            except Exception as e:  # noqa: BLE001 - a bad request fails alone
                results[i] = [Candidate.failed(f"{type(e).__name__}: {e}")] * k
                continue
            if self.budget.check(m) is not None:
                results[i] = [Candidate.too_long(m.n_tokens, self.budget.max_model_len)] * k
            else:
                ready.append((i, m))
        bs = self.cfg.batch_size
        for s in range(0, len(ready), bs):
            chunk = ready[s:s + bs]
            try:
                got = self._batch([requests[i] for i, _ in chunk], [m for _, m in chunk])
                for (i, _), cands in zip(chunk, got, strict=True):
                    results[i] = cands
            except Exception as e:  # noqa: BLE001 - isolate the failing request(s)
                self.log(f"[generate] hf batch failed ({type(e).__name__}: {e}); retrying "
                         "one by one")
                for i, m in chunk:
                    try:
                        results[i] = self._batch([requests[i]], [m])[0]
                    except Exception as e1:  # noqa: BLE001
                        results[i] = [Candidate.failed(f"{type(e1).__name__}: {e1}",
                                                       m.n_tokens)] * k
        return [r if r is not None else [Candidate.failed("not generated")] * k
                for r in results]

    def close(self) -> None:
        self.model = None
