"""Embedding throughput: the Embedder (base model, no LM head) vs a plain transformers loop.

The plain loop is what a generic recipe does: ``model(**batch, output_hidden_states=True)``
on the generation model, which also computes the [B, T, V] logits, then reads the last
hidden layer at ``<emb>``. Both run on the same pre-tokenised batches (one image + a short
text each), in one process, alternating, so the ratio is not a machine-load artifact.

    python bench/bench_embed.py [--model PATH] [--n 64] [--batch 16] [--repeats 8] [--vocab N]
    python bench/bench_embed.py --device cuda --dtype bfloat16 --preset qwen2vl-2b \
        --image-size 224 --max-pixels 50176          # a GPU at a real model's shapes

Without ``--model`` it builds the tiny Qwen2-VL in a temp dir (the ratio then mostly shows
the saved LM-head work of a 490-token vocabulary; on a real Qwen vocabulary of 151k it
is the dominant cost of the plain loop's last layer).

Size flags (``--preset``, ``--hidden``, ``--layers``, ...) keep the tiny checkpoint's
tokenizer and processor but swap in a randomly initialised Qwen2-VL of those dimensions,
built directly on the device in the requested dtype: timing and memory at a real model's
shapes need its shapes, not its weights, and no multi-GB checkpoint has to be written.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from mmemb.model.embedder import Embedder  # noqa: E402
from mmemb.model.prompts import EmbedInput  # noqa: E402


def make_inputs(n: int, size: int, words: int) -> list[EmbedInput]:
    out = []
    for i in range(n):
        img = Image.new("RGB", (size, size), "white")
        d = ImageDraw.Draw(img)
        d.ellipse((i % 7, i % 5, size // 2 + i % 11, size // 2), fill=(40 * (i % 6), 80, 160))
        text = " ".join(["there are two red circles and three blue squares"] * 8)
        out.append(EmbedInput(text=" ".join(text.split()[:words]),
                              instruction="<|image_1|> Represent the image and the text.",
                              images=[img]))
    return out


# Qwen2-VL-2B's shapes (its config.json): text and vision tower.
PRESETS = {
    "tiny": {},
    # The tiny checkpoint's layout, wide enough (8.1 M parameters) that a forward's cost
    # grows with its rows on CPU; at 0.2 M parameters a pass costs the same for 8 rows as
    # for 32, so a ratio of passes measures per-call overhead, not the method.
    "cpu-8m": dict(hidden=256, layers=8, heads=4, kv_heads=2, intermediate=1024),
    "qwen2vl-2b": dict(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960,
                       vocab=151936, vision_depth=32, vision_dim=1280, vision_heads=16),
}
SIZE_KEYS = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "vision_depth",
             "vision_dim", "vision_heads")


def add_size_args(ap: argparse.ArgumentParser) -> None:
    """Flags shared with bench_gradcache: device, model shape."""
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: cuda when available (the previous behaviour)")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                    help="model shape; the single flags below override it")
    for k in SIZE_KEYS:
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None)
    ap.add_argument("--max-pixels", type=int, help="image budget of the processor (the "
                    "tiny one caps images at 56x56 px = 4 visual tokens)")


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    return name


def size_of(a: argparse.Namespace) -> dict:
    """The requested shape: preset values overridden by single flags; {} = the checkpoint's."""
    dims = dict(PRESETS[a.preset])
    dims.update({k: getattr(a, k) for k in SIZE_KEYS if getattr(a, k) is not None})
    return dims


def _mrope(head_dim: int) -> list[int]:
    """Qwen2-VL's (t, h, w) split of the rotary half-dimension, as mmemb.model.tiny does it
    (128-dim heads give Qwen2-VL-2B's [16, 24, 24])."""
    half = head_dim // 2
    return [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]


def sized_embedder(base: str, dims: dict, dtype: torch.dtype, device: str,
                   max_pixels: int | None = None) -> Embedder:
    """The checkpoint at ``base`` (tokenizer, processor, embedding config) with a random
    model of shape ``dims``, created on ``device`` in ``dtype`` (no weights are loaded)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from mmemb.model.prompts import EmbeddingConfig

    cfg = AutoConfig.from_pretrained(base)
    t, v = cfg.text_config, cfg.vision_config
    for key, attr in (("hidden", "hidden_size"), ("layers", "num_hidden_layers"),
                      ("heads", "num_attention_heads"), ("kv_heads", "num_key_value_heads"),
                      ("intermediate", "intermediate_size"), ("vocab", "vocab_size")):
        if key in dims:
            setattr(t, attr, dims[key])
    if hasattr(t, "layer_types"):  # one entry per layer, rebuilt for the new depth
        t.layer_types = ["full_attention"] * t.num_hidden_layers
    t.rope_parameters["mrope_section"] = _mrope(t.hidden_size // t.num_attention_heads)
    v.hidden_size = t.hidden_size  # the merger projects into the LM's width
    for key, attr in (("vision_depth", "depth"), ("vision_dim", "embed_dim"),
                      ("vision_heads", "num_heads")):
        if key in dims:
            setattr(v, attr, dims[key])
    if "vision_dim" in dims:
        v.mlp_ratio = 4  # Qwen2-VL's vision MLP
    proc = AutoProcessor.from_pretrained(base)
    if max_pixels:
        from transformers import Qwen2VLImageProcessor

        ip = proc.image_processor
        proc.image_processor = Qwen2VLImageProcessor(
            patch_size=ip.patch_size, merge_size=ip.merge_size,
            size={"shortest_edge": 56 * 56, "longest_edge": max_pixels})
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype)
    return Embedder(model.eval(), proc, EmbeddingConfig.load(Path(base)) or EmbeddingConfig())


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--n", type=int, default=64, help="inputs per pass")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=56)
    ap.add_argument("--words", type=int, default=40)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--count-flops", action="store_true", help="count one pass of each with "
                    "torch's FlopCounterMode and report achieved TFLOP/s")
    add_size_args(ap)  # --vocab N alone resizes the vocabulary (e.g. 151936, Qwen's) to see
    a = ap.parse_args(argv)  # the logits cost at a real vocabulary size; new rows are unused
    tmp = tempfile.TemporaryDirectory()
    if not a.model:
        from mmemb.model.tiny import build_tiny

        a.model = str(build_tiny(Path(tmp.name) / "tiny"))
    dev = resolve_device(a.device)
    dtype = getattr(torch, a.dtype)
    dims = size_of(a)
    if set(dims) - {"vocab"} or a.max_pixels:
        emb = sized_embedder(a.model, dims, dtype, dev, a.max_pixels)
    else:
        emb = Embedder.from_pretrained(a.model, dtype=dtype, device=dev)
        if a.vocab:
            emb.model.resize_token_embeddings(a.vocab, mean_resizing=False)
    emb.model.eval()
    inputs = make_inputs(a.n, a.image_size, a.words)
    batches = [emb.tokenize(emb.prompts(inputs[s:s + a.batch]),
                            [x.images for x in inputs[s:s + a.batch]])
               for s in range(0, a.n, a.batch)]
    n_tok = sum(int(b["attention_mask"].sum()) for b in batches)

    def embedder_pass():
        return torch.cat([emb(b).embeddings for b in batches])

    def plain_pass():
        out = []
        for b in batches:
            o = emb.model(**b, output_hidden_states=True, use_cache=False)
            h = o.hidden_states[-1]  # [B, T, H]; o.logits is [B, T, V]
            out.append(F.normalize(emb.pool(h, b["input_ids"]), dim=-1))
        return torch.cat(out)

    times = {"embedder": [], "plain": []}
    peak: dict[str, float] = {}
    cuda = dev == "cuda"
    with torch.inference_mode():
        e1, e2 = embedder_pass(), plain_pass()  # warm-up, and the same embeddings
        # Both run the same backbone ops. In fp32 a disagreement is a bug: stop. In bf16 a
        # kernel picked per call may round differently: report the difference (it is in
        # the result) and keep the timings of a run that may be hard to repeat.
        diff = float((e1.float() - e2.float()).abs().max())
        if dtype == torch.float32:
            assert diff <= 1e-3, f"embedder and plain loop disagree (max |diff| {diff:.2e})"
        elif diff > 3e-2:
            print(f"WARNING: embedder and plain loop differ by {diff:.2e} in {a.dtype}")
        if cuda:
            base_mem = torch.cuda.memory_allocated()
        flops = {}
        if a.count_flops:  # matmul/conv/attention FLOPs of one pass (the rest is noise)
            from torch.utils.flop_counter import FlopCounterMode

            for name, fn in (("embedder", embedder_pass), ("plain", plain_pass)):
                try:
                    with FlopCounterMode(display=False) as fc:
                        fn()
                    flops[name] = float(fc.get_total_flops())
                except AssertionError as e:  # torch 2.11's counter rejects GQA sdpa shapes
                    print(f"WARNING: FLOP count of {name} unavailable ({e}); no TFLOP/s")
                    flops = {}
                    break
        for _ in range(a.repeats):
            for name, fn in (("embedder", embedder_pass), ("plain", plain_pass)):
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize()
                    peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated()
                                     / 2**20)
                times[name].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    res = {k: a.n / v for k, v in best.items()}
    cfg = emb.model.config
    tc = getattr(cfg, "text_config", cfg)
    vocab = getattr(tc, "vocab_size", None)
    where = (torch.cuda.get_device_name() if cuda else
             f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"model {a.model} ({type(emb.model).__name__}, vocab {vocab}, hidden "
          f"{tc.hidden_size}, {tc.num_hidden_layers} layers, {n_params(emb.model) / 1e6:.1f} M "
          f"params, {a.dtype}) on {dev} ({where})")
    print(f"{a.n} inputs (1 image {a.image_size}px + {a.words} words), batch {a.batch}, "
          f"{n_tok / a.n:.0f} tokens/input, best of {a.repeats}")
    print(f"  embedder (base model, no LM head): {res['embedder']:8.1f} samples/s "
          f"{n_tok / best['embedder']:10.0f} tokens/s")
    print(f"  plain loop (full logits)         : {res['plain']:8.1f} samples/s "
          f"{n_tok / best['plain']:10.0f} tokens/s")
    ratio = res["embedder"] / res["plain"]
    print(f"  ratio embedder / plain           : {ratio:8.2f}x")
    out = {"embedder_samples_per_s": res["embedder"], "plain_samples_per_s": res["plain"],
           "ratio": ratio, "tokens_per_input": n_tok / a.n,
           "embedder_tokens_per_s": n_tok / best["embedder"],
           "plain_tokens_per_s": n_tok / best["plain"], "params": n_params(emb.model),
           "device": dev, "dtype": a.dtype, "max_abs_diff": diff}
    for k, f in flops.items():
        out[f"{k}_tflops"] = f / best[k] / 1e12
        print(f"  {k:<8} {f / 1e9:10.1f} GFLOP per pass {out[f'{k}_tflops']:9.3f} TFLOP/s")
    if cuda:
        print(f"  peak GPU memory: embedder {peak['embedder']:.0f} MiB, plain "
              f"{peak['plain']:.0f} MiB (weights {base_mem / 2**20:.0f} MiB)")
        out.update(peak_mib_embedder=peak["embedder"], peak_mib_plain=peak["plain"],
                   weights_mib=base_mem / 2**20, gpu=torch.cuda.get_device_name())
    return out


if __name__ == "__main__":
    main()
