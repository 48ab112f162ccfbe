"""Train step time with vs without gradient caching, at equal contrastive batch.

Both are the real stage-4 step (DeepSpeed engine, one process, the stage-4 objective with
hard negatives and, where rows have one, the rationale LM term), on the same batches:
``plain`` embeds the whole batch with one graph and backpropagates once; ``gradcache``
embeds it in chunks without a graph, then re-runs each chunk with a graph (one extra
forward per input, activation memory of one chunk instead of the batch).

    python bench/bench_gradcache.py [--model PATH] [--batch 32] [--chunk 8] [--steps 6]
    python bench/bench_gradcache.py --device cuda --preset qwen2vl-2b   # bf16 on a GPU

Without ``--model`` it builds the tiny Qwen2-VL and the smoke synthetic data in a temp dir.
The size flags (shared with bench_embed.py) swap in a random model of a real model's
shapes, created on the device; DeepSpeed then runs it in bf16 on a GPU (``--dtype auto``).
On a GPU it also reports each mode's peak memory and the part of it a step adds on top of
weights, gradients and optimizer state (activations), which is what gradient caching bounds.
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

import torch  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--data", help="pairs or selections artifact (default: smoke synthetic)")
    ap.add_argument("--image-root")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per mode (+1 warm-up)")
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                    help="TrainConfig.precision (auto: bf16 on a GPU, fp32 on CPU)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when imported
    from bench_embed import add_size_args, resolve_device, size_of, sized_embedder

    add_size_args(ap)
    a = ap.parse_args(argv)
    dev = resolve_device(a.device)
    if dev == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    tmp = tempfile.TemporaryDirectory()
    if not a.model:
        from mmemb.model.tiny import build_tiny

        a.model = str(build_tiny(Path(tmp.name) / "tiny"))
    if not a.data:
        from data_contracts import io
        from data_contracts.schemas import PAIRS, SELECTIONS
        from mmemb.data.synth import generate

        d = generate(Path(tmp.name) / "data", "smoke", 0)
        rows = []
        for r in io.read(d["pairs"], PAIRS).to_pylist():  # oracle rationales: LM term on
            steps = json.loads(r["meta"])["steps"] if r["family"] == "inference" else None
            rows.append({**r, "rationale": steps, "utility": 0.0, "teacher_id": "oracle",
                         "cand_idx": 0, "n_candidates": 1, "n_kept": 1})
        a.data = io.write(rows, Path(tmp.name) / "sel", SELECTIONS).uri
        a.image_root = str(d["image_root"])

    import deepspeed

    from mmemb.configs.train import TrainConfig
    from mmemb.losses.gradcache import gradcache_step, plain_step
    from mmemb.losses.objective import Stage4Objective
    from mmemb.model.embedder import Embedder
    from mmemb.stages.train import build_items, make_loss_fn, prepare_model
    from mmemb.training.data import EpochSampler, load_rows
    from mmemb.training.deepspeed_config import ds_config, lr_scheduler
    from mmemb.training.distributed import init_deepspeed, single_process_env
    from mmemb.training.module import EmbedTrainModule, make_chunks

    single_process_env()
    deepspeed.utils.logger.setLevel("WARNING")
    init_deepspeed()
    rows, _ = load_rows(a.data, a.image_root)
    sampler = EpochSampler(len(rows), a.batch, 0)
    cfg = TrainConfig(model=a.model, data=a.data, batch_size=a.batch, chunk_size=a.chunk,
                      zero_stage=a.zero_stage, warmup_steps=0, steps=1000, precision=a.dtype)
    obj = Stage4Objective(cfg.alpha, cfg.lam, cfg.tau)
    dims = size_of(a)
    if dims or a.max_pixels:  # fp32 master weights: DeepSpeed casts the module for bf16
        emb = sized_embedder(a.model, dims, torch.float32, dev, a.max_pixels)
    else:
        emb = Embedder.from_pretrained(a.model, device=dev)
    prepare_model(emb, cfg)
    mod = EmbedTrainModule(emb)
    engine, *_ = deepspeed.initialize(model=mod, config=ds_config(cfg, 1, dev),
                                      model_parameters=[p for p in mod.parameters()
                                                        if p.requires_grad],
                                      lr_scheduler=lr_scheduler(cfg, 1000))

    def encode(cs, with_lm):
        embs, lms = engine([c.batch for c in cs], [with_lm and c.lm for c in cs])
        return [(e, lm if with_lm and c.lm else None)
                for e, lm, c in zip(embs, lms, cs, strict=True)]

    def backward(loss, last):
        engine.set_gradient_accumulation_boundary(last)
        engine.backward(loss)

    cuda = dev == "cuda"
    peak: dict[str, float] = {}
    extra: dict[str, float] = {}

    def step(i: int, gc: bool) -> float:
        items, info = build_items([rows[j] for j in sampler.indices(i, 0, a.batch)], 1)
        chunks = make_chunks(emb, items, a.chunk if gc else 10**9)
        n_lm = sum(c.meta["n_lm_tokens"] for c in chunks)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        t = time.perf_counter()
        (gradcache_step if gc else plain_step)(chunks, encode, make_loss_fn(obj, info),
                                               backward, obj.lm_weight(n_lm))
        engine.step()
        if cuda:
            torch.cuda.synchronize()
            k = "gradcache" if gc else "plain"
            top = torch.cuda.max_memory_allocated()
            peak[k] = max(peak.get(k, 0.0), top / 2**20)
            extra[k] = max(extra.get(k, 0.0), (top - before) / 2**20)
        return time.perf_counter() - t

    times: dict[str, list[float]] = {"plain": [], "gradcache": []}
    step(0, False)  # warm-up of both paths
    step(0, True)
    for i in range(1, a.steps + 1):  # alternate, same batch for both modes
        times["plain"].append(step(i, False))
        times["gradcache"].append(step(i, True))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    where = (torch.cuda.get_device_name() if cuda else
             f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    tc = emb.model.config.text_config
    n_par = sum(p.numel() for p in emb.model.parameters())
    print(f"model {a.model} (hidden {tc.hidden_size}, {tc.num_hidden_layers} layers, vocab "
          f"{tc.vocab_size}, {n_par / 1e6:.1f} M params, bf16 {engine.bfloat16_enabled()}) "
          f"on {dev} ({where}), ZeRO-{a.zero_stage}, contrastive batch "
          f"{a.batch} (+1 hard negative each), median of {a.steps} steps")
    print(f"  plain (one graph)        : {med['plain'] * 1000:8.1f} ms/step "
          f"{a.batch / med['plain']:7.1f} pairs/s")
    print(f"  gradcache (chunks of {a.chunk:>2}): {med['gradcache'] * 1000:8.1f} ms/step "
          f"{a.batch / med['gradcache']:7.1f} pairs/s")
    ratio = med["gradcache"] / med["plain"]
    print(f"  gradcache / plain        : {ratio:8.2f}x time (the price of one extra "
          "no-graph forward; activation memory bounded by the chunk)")
    out = {"plain_s": med["plain"], "gradcache_s": med["gradcache"], "ratio": ratio,
           "plain_pairs_per_s": a.batch / med["plain"],
           "gradcache_pairs_per_s": a.batch / med["gradcache"], "params": n_par,
           "device": dev, "bf16": bool(engine.bfloat16_enabled()), "batch": a.batch,
           "chunk": a.chunk}
    if cuda:
        print(f"  peak GPU memory          : plain {peak['plain']:.0f} MiB, gradcache "
              f"{peak['gradcache']:.0f} MiB; added by a step (activations): plain "
              f"{extra['plain']:.0f} MiB, gradcache {extra['gradcache']:.0f} MiB")
        out.update({f"peak_mib_{k}": v for k, v in peak.items()})
        out.update({f"step_mib_{k}": v for k, v in extra.items()})
        out["gpu"] = torch.cuda.get_device_name()
    import torch.distributed as dist

    if dist.is_initialized():
        deepspeed.comm.destroy_process_group()
    return out


if __name__ == "__main__":
    main()
