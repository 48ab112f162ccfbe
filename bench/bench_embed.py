"""Embedding throughput: the Embedder (base model, no LM head) vs a plain transformers loop.

The plain loop is what a generic recipe does: ``model(**batch, output_hidden_states=True)``
on the generation model, which also computes the [B, T, V] logits, then reads the last
hidden layer at ``<emb>``. Both run on the same pre-tokenised batches (one image + a short
text each), in one process, alternating, so the ratio is not a machine-load artifact.

    python bench/bench_embed.py [--model PATH] [--n 64] [--batch 16] [--repeats 8] [--vocab N]

Without ``--model`` it builds the tiny Qwen2-VL in a temp dir (the ratio then mostly shows
the saved LM-head work of a 490-token vocabulary; on a real Qwen vocabulary of 151k it
is the dominant cost of the plain loop's last layer).
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--n", type=int, default=64, help="inputs per pass")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=56)
    ap.add_argument("--words", type=int, default=40)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--vocab", type=int, help="resize the vocabulary (e.g. 151936, Qwen's) to "
                    "see the logits cost at a real vocabulary size; new rows are unused")
    a = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    if not a.model:
        from mmemb.model.tiny import build_tiny

        a.model = str(build_tiny(Path(tmp.name) / "tiny"))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    emb = Embedder.from_pretrained(a.model, dtype=getattr(torch, a.dtype), device=dev)
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
    with torch.inference_mode():
        e1, e2 = embedder_pass(), plain_pass()  # warm-up, and the same embeddings
        assert torch.allclose(e1, e2, atol=1e-3), "embedder and plain loop disagree"
        for _ in range(a.repeats):
            for name, fn in (("embedder", embedder_pass), ("plain", plain_pass)):
                if dev == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                fn()
                if dev == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    res = {k: a.n / v for k, v in best.items()}
    cfg = emb.model.config
    vocab = getattr(getattr(cfg, "text_config", cfg), "vocab_size", None)
    print(f"model {a.model} ({type(emb.model).__name__}, vocab {vocab}) on {dev} "
          f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    print(f"{a.n} inputs (1 image {a.image_size}px + {a.words} words), batch {a.batch}, "
          f"{n_tok / a.n:.0f} tokens/input, best of {a.repeats}")
    print(f"  embedder (base model, no LM head): {res['embedder']:8.1f} samples/s "
          f"{n_tok / best['embedder']:10.0f} tokens/s")
    print(f"  plain loop (full logits)         : {res['plain']:8.1f} samples/s "
          f"{n_tok / best['plain']:10.0f} tokens/s")
    ratio = res["embedder"] / res["plain"]
    print(f"  ratio embedder / plain           : {ratio:8.2f}x")
    return {"embedder_samples_per_s": res["embedder"], "plain_samples_per_s": res["plain"],
            "ratio": ratio}


if __name__ == "__main__":
    main()
