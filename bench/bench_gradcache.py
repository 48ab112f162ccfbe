"""Train step time with vs without gradient caching, at equal contrastive batch, per ZeRO stage.

Both are the real stage-4 step (DeepSpeed engine, one process, the stage-4 objective with
hard negatives and, where rows have one, the rationale LM term), on the same batches:
``plain`` embeds the whole batch with one graph and backpropagates once; ``gradcache``
embeds it in chunks without a graph, then re-runs each chunk with a graph (one extra
forward per input, activation memory of one chunk instead of the batch). The backwards of
a step run inside :func:`mmemb.training.reduction.one_reduce_per_step`, as in stage 4, and
the reducing collectives DeepSpeed issues per step are counted for both modes.

    python bench/bench_gradcache.py [--model PATH] [--preset tiny|cpu-8m] [--batch 32]
        [--chunk 8] [--steps 6]
        [--zero-stages 1,2] [--reduce step|backward]
    python bench/bench_gradcache.py --device cuda --preset qwen2vl-2b   # bf16 on a GPU

It ends with one line per ZeRO stage run, ``gradcache/plain chunks=C zero=Z R`` (R: the
median over alternating step pairs of gradcache / plain step time). ZeRO-1 is what
``gradcache: true`` gets by default (``TrainConfig.zero_stage``). On CPU a step's time is
this process's CPU time (``--clock``; one intra-op thread with ``OMP_NUM_THREADS=1``): on a
shared machine other jobs preempt the process, which inflates wall time by whatever the
load happens to be during either step; on a GPU it is the wall clock.

Without ``--model`` it builds the tiny Qwen2-VL and the smoke synthetic data in a temp dir,
and times a random model of its layout at 8.1 M parameters (``--preset cpu-8m``, the
default; ``--preset tiny`` keeps the 0.2 M checkpoint, where per-call overhead dominates).
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
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--data", help="pairs or selections artifact (default: smoke synthetic)")
    ap.add_argument("--image-root")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10,
                    help="timed steps per mode (+1 warm-up)")
    ap.add_argument("--zero-stages", default="1,2", help="comma-separated ZeRO stages, one "
                    "engine each (1: the gradcache default)")
    ap.add_argument("--reduce", default="step", choices=["step", "backward"],
                    help="TrainConfig.gradcache_reduce (ZeRO-2/3 only)")
    ap.add_argument("--embed-chunks", type=int, default=None, help="TrainConfig."
                    "gradcache_embed_chunks: chunks per no-graph forward (default: the "
                    "config's default; 1: one forward per chunk)")
    ap.add_argument("--clock", default="auto", choices=["auto", "wall", "cpu"],
                    help="step time: wall clock, or this process's CPU time (auto: CPU time "
                    "on CPU, where a shared machine's other jobs would inflate wall time "
                    "by preempting; wall clock on a GPU)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                    help="TrainConfig.precision (auto: bf16 on a GPU, fp32 on CPU)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when imported
    from bench_embed import add_size_args

    add_size_args(ap)
    # Default shape: without --model, the tiny checkpoint's layout at 8.1 M parameters
    # (`cpu-8m`). At the tiny's 0.2 M a pass costs its fixed per-call overhead whatever its
    # rows, so a time ratio there counts calls, not the extra forward GradCache pays
    # (`--preset tiny` measures that; docs/bench.md has both).
    ap.set_defaults(preset=None)
    a = ap.parse_args(argv)
    if a.preset is None:
        a.preset = "tiny" if a.model else "cpu-8m"
    return a


def smoke_data(a: argparse.Namespace, tmp: Path) -> None:
    """Default model and data: the tiny Qwen2-VL and the smoke synthetic selections, with
    the oracle rationales as selected rationales (so the LM term is on)."""
    if not a.model:
        from mmemb.model.tiny import build_tiny

        a.model = str(build_tiny(tmp / "tiny"))
    if not a.data:
        from data_contracts import io
        from data_contracts.schemas import PAIRS, SELECTIONS
        from mmemb.data.synth import generate

        d = generate(tmp / "data", "smoke", 0)
        rows = []
        for r in io.read(d["pairs"], PAIRS).to_pylist():
            steps = json.loads(r["meta"])["steps"] if r["family"] == "inference" else None
            rows.append({**r, "rationale": steps, "utility": 0.0, "teacher_id": "oracle",
                         "cand_idx": 0, "n_candidates": 1, "n_kept": 1})
        a.data = io.write(rows, tmp / "sel", SELECTIONS).uri
        a.image_root = str(d["image_root"])


def build(a: argparse.Namespace, dev: str, zero: int):
    """(config, embedder, engine) for one ZeRO stage, the model freshly loaded."""
    import deepspeed
    from bench_embed import size_of, sized_embedder

    from mmemb.configs.train import TrainConfig
    from mmemb.model.embedder import Embedder
    from mmemb.stages.train import prepare_model
    from mmemb.training.deepspeed_config import ds_config, lr_scheduler
    from mmemb.training.module import EmbedTrainModule

    extra = {} if a.embed_chunks is None else {"gradcache_embed_chunks": a.embed_chunks}
    cfg = TrainConfig(model=a.model, data=a.data, batch_size=a.batch, chunk_size=a.chunk,
                      zero_stage=zero, gradcache_reduce=a.reduce, warmup_steps=0,
                      steps=1000, precision=a.dtype, **extra)
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
    return cfg, emb, engine


class StageBench:
    """One ZeRO stage's engine and the stage-4 step in both modes, on the same batches."""

    def __init__(self, a: argparse.Namespace, dev: str, zero: int, rows, sampler):
        from mmemb.losses.objective import Stage4Objective
        from mmemb.training.module import merged_embed

        self.a, self.zero, self.rows, self.sampler = a, zero, rows, sampler
        self.cfg, self.emb, self.engine = build(a, dev, zero)
        self.obj = Stage4Objective(self.cfg.alpha, self.cfg.lam, self.cfg.tau)
        self.embed = merged_embed(self.encode, self.emb, self.cfg.gradcache_embed_chunks)
        self.cuda = dev == "cuda"
        cpu_clock = a.clock == "cpu" or (a.clock == "auto" and not self.cuda)
        self.clock = time.process_time if cpu_clock else time.perf_counter
        self.peak: dict[str, float] = {}
        self.extra: dict[str, float] = {}
        self.reduces: dict[str, int] = {}

    def encode(self, cs, with_lm):
        embs, lms = self.engine([c.batch for c in cs], [with_lm and c.lm for c in cs])
        return [(e, lm if with_lm and c.lm else None)
                for e, lm, c in zip(embs, lms, cs, strict=True)]

    def backward(self, loss, last):
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)

    def step(self, i: int, gc: bool) -> float:
        """One optimizer step on batch ``i`` (tokenised before the clock starts): seconds."""
        from mmemb.losses.gradcache import gradcache_step, plain_step
        from mmemb.stages.train import build_items, make_loss_fn
        from mmemb.training.module import make_chunks
        from mmemb.training.reduction import count_reduces, one_reduce_per_step

        a, k = self.a, ("gradcache" if gc else "plain")
        items, info = build_items([self.rows[j] for j in self.sampler.indices(i, 0, a.batch)], 1)
        chunks = make_chunks(self.emb, items, a.chunk if gc else 10**9)
        loss_fn = make_loss_fn(self.obj, info)
        lm_weight = self.obj.lm_weight(sum(c.meta["n_lm_tokens"] for c in chunks))
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        t = self.clock()
        with count_reduces() as n:
            with one_reduce_per_step(self.engine, self.zero, gc, self.cfg.gradcache_reduce):
                if gc:
                    gradcache_step(chunks, self.encode, loss_fn, self.backward, lm_weight,
                                   self.embed)
                else:
                    plain_step(chunks, self.encode, loss_fn, self.backward, lm_weight)
            self.engine.step()
        if self.cuda:
            torch.cuda.synchronize()
            top = torch.cuda.max_memory_allocated()
            self.peak[k] = max(self.peak.get(k, 0.0), top / 2**20)
            self.extra[k] = max(self.extra.get(k, 0.0), (top - before) / 2**20)
        self.reduces[k] = sum(n.values())
        return self.clock() - t


def run_stage(a: argparse.Namespace, dev: str, zero: int, rows, sampler) -> dict:
    """Alternating plain / gradcache steps on the same batches under one ZeRO stage (which
    goes first alternates too, so a drifting machine load biases neither): per-mode median
    step times, R = the median over steps of gradcache / plain, reduces per step and (on a
    GPU) peak memory per mode."""
    b = StageBench(a, dev, zero, rows, sampler)
    b.step(0, False)  # warm-up of both paths
    b.step(0, True)
    times: dict[str, list[float]] = {"plain": [], "gradcache": []}
    for i in range(1, a.steps + 1):  # same batch i for both modes
        for gc in ((False, True) if i % 2 else (True, False)):
            times["gradcache" if gc else "plain"].append(b.step(i, gc))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = statistics.median(g / p for g, p in zip(times["gradcache"], times["plain"],
                                                    strict=True))
    res = {"med": med, "ratio": ratio, "peak": b.peak, "extra": b.extra,
           "reduces": b.reduces, "bf16": bool(b.engine.bfloat16_enabled()),
           "embed_chunks": b.cfg.gradcache_embed_chunks,
           "clock": "CPU time" if b.clock is time.process_time else "wall clock",
           "params": sum(p.numel() for p in b.emb.model.parameters()),
           "text_config": b.emb.model.config.text_config}
    b.engine.destroy()
    return res


def report(a: argparse.Namespace, dev: str, zero: int, r: dict) -> None:
    """The human-readable block of one ZeRO stage."""
    med, tc = r["med"], r["text_config"]
    where = (torch.cuda.get_device_name() if dev == "cuda" else
             f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"model {a.model} (hidden {tc.hidden_size}, {tc.num_hidden_layers} layers, vocab "
          f"{tc.vocab_size}, {r['params'] / 1e6:.1f} M params, bf16 {r['bf16']}) on {dev} "
          f"({where}), ZeRO-{zero} (gradcache_reduce {a.reduce}, {r['embed_chunks']} chunks "
          f"per no-graph forward), contrastive batch "
          f"{a.batch} (+1 hard negative each), median of {a.steps} steps ({r['clock']})")
    for k, label in (("plain", "plain (one graph)        "),
                     ("gradcache", f"gradcache (chunks of {a.chunk:>2})")):
        print(f"  {label}: {med[k] * 1000:8.1f} ms/step {a.batch / med[k]:7.1f} pairs/s, "
              f"{r['reduces'][k]} reducing collectives per step")
    print(f"  gradcache / plain        : {r['ratio']:8.2f}x time (median over steps; ratio "
          f"of the medians {med['gradcache'] / med['plain']:.2f}x)")
    if dev == "cuda":
        print(f"  peak GPU memory          : plain {r['peak']['plain']:.0f} MiB, gradcache "
              f"{r['peak']['gradcache']:.0f} MiB; added by a step (activations): plain "
              f"{r['extra']['plain']:.0f} MiB, gradcache {r['extra']['gradcache']:.0f} MiB")


def main(argv: list[str] | None = None) -> dict:
    """Every requested ZeRO stage in turn, then the contract lines, one per stage."""
    a = parse(argv)
    from bench_embed import resolve_device

    dev = resolve_device(a.device)
    if dev == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    tmp = tempfile.TemporaryDirectory()
    smoke_data(a, Path(tmp.name))

    import deepspeed

    from mmemb.training.data import EpochSampler, load_rows
    from mmemb.training.distributed import init_deepspeed, single_process_env

    single_process_env()
    deepspeed.utils.logger.setLevel("WARNING")
    init_deepspeed()
    rows, _ = load_rows(a.data, a.image_root)
    sampler = EpochSampler(len(rows), a.batch, 0)
    out = {}
    for zero in (int(z) for z in a.zero_stages.split(",")):
        r = run_stage(a, dev, zero, rows, sampler)
        report(a, dev, zero, r)
        out[zero] = {"plain_s": r["med"]["plain"], "gradcache_s": r["med"]["gradcache"],
                     "ratio": r["ratio"], "reduces": r["reduces"], "device": dev,
                     "bf16": r["bf16"], "batch": a.batch, "chunk": a.chunk,
                     **{f"peak_mib_{k}": v for k, v in r["peak"].items()},
                     **{f"step_mib_{k}": v for k, v in r["extra"].items()}}
    import torch.distributed as dist

    if dist.is_initialized():
        deepspeed.comm.destroy_process_group()
    for zero, r in out.items():
        print(f"gradcache/plain chunks={a.chunk} zero={zero} {r['ratio']:.2f}")
    return out


if __name__ == "__main__":
    main()
