"""The policy inside a vLLM engine: rationale rollouts for GRPO and for adaptive inference.

Stage 5 samples rationales from the policy it is training, so the engine must generate with
the *current* weights. After every optimizer step :meth:`VLLMPolicy.sync` pushes the
policy's state dict into the running engine through ``LLM.collective_rpc`` to a small
worker extension (:class:`WeightSyncExtension`, passed as vLLM's ``worker_extension_cls``)
that calls the model's own ``load_weights`` (which maps the Hugging Face parameter names
to vLLM's). Nothing is written to disk and the engine is started once per stage.

Only the rationale is generated here; the gate decision and the embedding stay in the
transformers model (they are one forward each, and the gate's probability and the
embedding must be exactly the policy's). The log-probabilities GRPO needs are recomputed by
the policy on the sampled ids (``mmemb.stages.gate.rollout_logps``), so the importance
ratio never mixes vLLM's and transformers' numerics.

Example (the engine takes 15-30 s to start on CPU)::

    >>> pol = VLLMPolicy("runs/demo/train/student", budget=48)           # doctest: +SKIP
    >>> pol.sync(policy_model)                  # after an optimizer step   # doctest: +SKIP
    >>> rolls = pol.generate(inputs, temperature=0.7, seeds=[0, 1])        # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mmemb.inference import Rollout
from mmemb.model.prompts import EmbeddingConfig, EmbedInput, prompt_prefix


class WeightSyncExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``): in-place weight loading."""

    def mmemb_load_weights(self, blob: bytes) -> int:
        """``blob``: the policy's state dict as safetensors bytes (they cross vLLM's process
        boundaries as plain bytes; tensors would not survive its shared-memory channel)."""
        from safetensors.torch import load

        weights = load(blob)
        # vLLM's in-place reload (0.32+): it restores the layers' loading state, loads the
        # Hugging Face names through the model's mapper and re-runs the post-load
        # processing (e.g. the CPU backend's repacked GEMM weights), which a plain
        # model.load_weights after start-up cannot do.
        self.model_runner.reload_weights(  # type: ignore[attr-defined]
            weights_iterator=iter(weights.items()), is_checkpoint_format=True)
        return len(weights)


class VLLMPolicy:
    """A vLLM engine serving the policy's rationale generation, with in-place weight sync."""

    def __init__(self, model_dir: str | Path, *, budget: int, seed: int = 0,
                 max_model_len: int = 1024, engine_kwargs: dict | None = None,
                 log=print):
        """Start the engine on ``model_dir`` (checked first, so a bad checkpoint fails
        with the teacher's explained message, not inside vLLM)."""
        from mmemb.teachers.vllm import _on_gpu, check_model, explain, prepare_environment

        check_model("policy", str(model_dir))
        prepare_environment()
        from transformers import AutoTokenizer
        from vllm import LLM

        self.budget = budget
        self.cfg = EmbeddingConfig.load(model_dir) or EmbeddingConfig()
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        vocab = tok.get_vocab()
        self.tokenizer = tok
        self.end_think_id = vocab[self.cfg.end_think_token]
        self.stop_ids = [self.end_think_id, vocab[self.cfg.emb_token], vocab["<|im_end|>"]]
        banned = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>",
                  "<|im_start|>", "<|endoftext|>", self.cfg.think_token]
        self.bias = {vocab[t]: -100.0 for t in banned if t in vocab}  # as the HF path suppresses
        kwargs = dict(model=str(model_dir), seed=seed, max_model_len=max_model_len,
                      enforce_eager=not _on_gpu(), dtype="auto",
                      limit_mm_per_prompt={"image": 1, "video": 0},
                      worker_extension_cls=f"{__name__}.WeightSyncExtension")
        if not _on_gpu():  # see mmemb.teachers.vllm.start_engine
            kwargs.update(enable_chunked_prefill=False,
                          max_num_batched_tokens=max(max_model_len, 8192))
        else:
            kwargs.update(gpu_memory_utilization=0.3)  # the trained policy shares the GPU
        kwargs.update(engine_kwargs or {})
        t0 = time.perf_counter()
        try:
            self.llm = LLM(**kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised with the model and the cause
            raise explain("policy rollouts", str(model_dir), f"{type(e).__name__}: {e}") from e
        self.syncs = 0
        self.sync_s = 0.0
        log(f"[vllm-policy] engine up in {time.perf_counter() - t0:.1f}s ({model_dir})")

    def sync(self, model: torch.nn.Module) -> float:
        """Push ``model``'s current weights into the engine; returns the seconds it took."""
        t0 = time.perf_counter()
        from safetensors.torch import save

        # every name, tied ones included (lm_head = embed_tokens): a layer whose name is not
        # in the reload keeps its old post-processed weights on vLLM's CPU backend
        weights = {n: t.detach().to("cpu").contiguous().clone()
                   for n, t in model.state_dict().items()}
        self.llm.collective_rpc("mmemb_load_weights", args=(save(weights),))
        # Everything cached was computed with the old weights: KV blocks, vision-encoder
        # outputs (the scheduler's view too, else it expects features the worker dropped)
        # and preprocessed multimodal inputs.
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_mm_cache()
        dt = time.perf_counter() - t0
        self.syncs += 1
        self.sync_s += dt
        return dt

    def _request(self, x: EmbedInput) -> dict:
        from mmemb.model.embedder import load_image

        prompt = prompt_prefix(x, self.cfg) + self.cfg.think_token
        if not x.images:
            return {"prompt": prompt}
        return {"prompt": prompt,
                "multi_modal_data": {"image": [load_image(p) for p in x.images]}}

    def generate(self, inputs: list[EmbedInput], *, temperature: float,
                 seeds: list[int] | None = None) -> list[Rollout]:
        """One rationale per input, after ``<think>``, up to ``budget`` tokens."""
        from vllm import SamplingParams

        if not inputs:
            return []
        seeds = seeds or list(range(len(inputs)))
        params = [SamplingParams(n=1, temperature=temperature, top_p=1.0, top_k=0,
                                 max_tokens=self.budget, stop_token_ids=self.stop_ids,
                                 skip_special_tokens=False, logit_bias=self.bias or None,
                                 seed=s) for s in seeds]
        outs = self.llm.generate([self._request(x) for x in inputs], params, use_tqdm=False)
        rolls = []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            cut = next((i for i, t in enumerate(ids) if t in self.stop_ids), None)
            finished = False
            if cut is not None:
                finished = ids[cut] == self.end_think_id
                ids = ids[: cut + 1] if finished else ids[:cut]
            elif c.finish_reason == "stop" and c.stop_reason == self.end_think_id:
                ids, finished = ids + [self.end_think_id], True
            body = ids[:-1] if finished else ids
            text = self.tokenizer.decode(body, skip_special_tokens=True).strip()
            rolls.append(Rollout(ids, text, finished))
        return rolls

    def close(self) -> None:
        from mmemb.teachers.vllm import close_engine

        close_engine(self.llm)
