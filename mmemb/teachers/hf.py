"""The transformers ``generate`` teacher: a fallback, used only when a config asks for it.

Why keep it: it runs wherever transformers runs (no vLLM wheel, an architecture vLLM lacks,
a debugging session), and it is the baseline ``bench/bench_generate.py`` measures vLLM
against. It is slower: static batches padded to the longest prompt, no paged KV cache.

Batches are left-padded (decoder-only generation continues from the last real token). The
RNG is seeded per batch from the first request's seed, so a shard (always cut the same way)
samples the same rationales on every run; unlike the vLLM teacher, a request's samples
depend on the batch it is in.
"""

from __future__ import annotations

import torch

from mmemb.teachers.base import Candidate, GenRequest, TeacherInfo, finalize, request_seed


def load_model(cfg, log=print) -> tuple:
    """(processor, model, device) for a teacher config; left padding for generation."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}.get(cfg.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    log(f"[generate] loading transformers model {cfg.model} ({device}, {dtype})")
    trust = bool(getattr(cfg, "trust_remote_code", False))
    processor = AutoProcessor.from_pretrained(cfg.model, trust_remote_code=trust)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=dtype,
                                                        trust_remote_code=trust)
    model.to(device).eval()
    return processor, model, device


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

    @torch.no_grad()
    def _batch(self, reqs: list[GenRequest], template: str) -> list[list[Candidate]]:
        from mmemb.model.embedder import load_image

        k, s = self.info.k, self.cfg.sampling
        texts = [r.prompt(template) for r in reqs]
        images = [load_image(p) for r in reqs for p in r.inp.images]
        kw = dict(text=texts, padding=True, return_tensors="pt")
        if images:
            kw["images"] = images
        batch = self.processor(**kw).to(self.device)
        torch.manual_seed(request_seed(self.seed, reqs[0].pair_id, reqs[0].side, "hf-batch"))
        gen = self.model.generate(
            **batch, do_sample=s.temperature > 0, temperature=s.temperature or None,
            top_p=s.top_p if s.temperature > 0 else None, max_new_tokens=s.max_tokens,
            num_return_sequences=k, pad_token_id=self.pad, eos_token_id=sorted(self.eos),
            **({"stop_strings": list(s.stop), "tokenizer": self.tok} if s.stop else {}))
        new = gen[:, batch["input_ids"].shape[1]:].cpu()  # [B*K, T]
        out: list[list[Candidate]] = []
        ends = self.eos | {self.pad}  # after eos or a stop string, rows are padded
        for b in range(len(reqs)):
            cands = []
            for j in range(k):
                ids = new[b * k + j].tolist()
                end = next((t for t, x in enumerate(ids) if x in ends), None)
                body = ids if end is None else ids[:end]
                text = self.tok.decode(body, skip_special_tokens=False)
                finish = "length" if end is None else "stop"
                hits = [text.find(x) for x in s.stop if x in text]
                if hits:  # vLLM's semantics: the stop string ends the text, excluded
                    text, finish = text[:min(hits)], "stop"
                cands.append(finalize(text, len(body) + (end is not None), finish))
            out.append(cands)
        return out

    def generate(self, requests: list[GenRequest], template: str) -> list[list[Candidate]]:
        """K candidates per request; a failing batch is retried request by request."""
        results: list[list[Candidate]] = []
        bs = self.cfg.batch_size
        for i in range(0, len(requests), bs):
            chunk = requests[i:i + bs]
            try:
                results.extend(self._batch(chunk, template))
            except Exception as e:  # noqa: BLE001 - isolate the failing request(s)
                self.log(f"[generate] hf batch failed ({type(e).__name__}: {e}); retrying "
                         "one by one")
                for r in chunk:
                    try:
                        results.extend(self._batch([r], template))
                    except Exception as e1:  # noqa: BLE001
                        results.append([Candidate.failed(f"{type(e1).__name__}: {e1}")]
                                       * self.info.k)
        return results

    def close(self) -> None:
        self.model = None
