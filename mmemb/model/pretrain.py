"""A SIMULATION of pretraining for the tiny model: a short contrastive warm-up on word overlap.

Why: the method's stage 2 asks a reference embedder whether a rationale moves the query
towards its positive. A real base checkpoint (Qwen-VL) is pretrained, so text that shares
content words with a target embeds near it, and a rationale that names the answer helps.
The tiny stand-in starts from random weights, where every input embeds about the same and
all rationales get about the same score (measured: the counterfactual delta then carries no
signal). This warm-up gives the tiny model the one property the demo relies on, generically:

    a text that contains the words of a phrase embeds closer to that phrase than to a
    phrase with one different word.

Training data is generated, not taken from the demo's pairs: random "sentences" of the
synthetic world's vocabulary (colours, shapes, numbers, relation and filler words); the
positive is a contiguous or scattered subset of the sentence's content words; the hard
negative swaps one of its words for another word of the same kind that the sentence does
not contain. No rationale, no ``<think>``, no image and no demo task is seen: the model is
trained in direct mode on text only, through :meth:`Embedder.embed` (the same pooling and
prompt every stage uses). Seeded: the same seed gives the same weights on the same machine.

Run alone (in place on a built tiny model)::

    python -m mmemb.model.pretrain --model runs/demo/tiny-qwen2vl --steps 200 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

#: The warm-up the embedded default gets (see docs/stages.md for how it was chosen).
DEFAULT_STEPS = 200
PRETRAIN_FILE = "mmemb_pretrain.json"


def _vocab() -> dict[str, list[str]]:
    """Word classes of the synthetic world; swaps stay within a class."""
    from mmemb.data import synth

    shapes = list(synth.SHAPES)
    return {
        "colour": list(synth.COLOURS),
        "shape": shapes + [s + "s" for s in shapes],
        "number": list(synth.NUMBER_WORDS),
        "digit": [str(i) for i in range(11)],
        "relation": ["left", "right", "top", "bottom", "missing", "absent", "total"],
        "noun": ["shapes", "colour", "picture", "image", "scene", "region", "caption",
                 "side", "question", "answer"],
    }


FILLER = ("the", "a", "is", "are", "there", "and", "of", "in", "on", "so", "it", "which",
          "what", "shows", "contains", "has", "one", "other", "opposite", "plus", "about",
          "how", "many", "given", "find", "select", "text", "refers", "to")
INSTRUCTIONS = ("", "Represent the given text.", "Find the matching description.",
                "Answer the question.", "Select the text that fits.")


def make_example(rng: random.Random, vocab: dict[str, list[str]]) -> tuple[str, str, str, str]:
    """(instruction, query, positive, hard negative) with word overlap as the only signal."""
    classes = list(vocab)
    n_core = rng.randint(1, 3)
    core_cls = [rng.choice(classes) for _ in range(n_core)]
    core = [rng.choice(vocab[c]) for c in core_cls]
    noise = []
    for _ in range(rng.randint(3, 14)):
        noise.append(rng.choice(FILLER) if rng.random() < 0.5
                     else rng.choice(vocab[rng.choice(classes)]))
    if rng.random() < 0.5:  # the phrase appears contiguously, somewhere in the sentence
        at = rng.randint(0, len(noise))
        words = noise[:at] + core + noise[at:]
    else:  # its words are scattered
        words = noise + core
        rng.shuffle(words)
    query = " ".join(words)
    j = rng.randrange(n_core)
    options = [w for w in vocab[core_cls[j]] if w not in words]
    neg = list(core)
    if options:
        neg[j] = rng.choice(options)
    arts = rng.choice(["", "the ", "a "])
    return rng.choice(INSTRUCTIONS), query, arts + " ".join(core), arts + " ".join(neg)


@torch.no_grad()
def overlap_accuracy(emb, n: int = 128, seed: int = 12345) -> float:
    """Held-out check of the property taught: the share of generated examples whose query
    embeds closer to its positive than to its one-word-swapped hard negative (0.5 = chance).
    """
    from mmemb.model.prompts import EmbedInput

    rng, vocab = random.Random(seed), _vocab()
    ex = [make_example(rng, vocab) for _ in range(n)]
    was = emb.model.training
    emb.model.eval()
    q = emb.embed([EmbedInput(text=x[1], instruction=x[0]) for x in ex]).embeddings  # [n, H]
    p = emb.embed([EmbedInput(text=x[2]) for x in ex]).embeddings  # [n, H]
    g = emb.embed([EmbedInput(text=x[3]) for x in ex]).embeddings  # [n, H]
    emb.model.train(was)
    differs = torch.tensor([x[2] != x[3] for x in ex])
    wins = ((q * p).sum(-1) > (q * g).sum(-1))[differs]
    return float(wins.float().mean())


def pretrain_tiny(model_dir: str | Path, steps: int = DEFAULT_STEPS, seed: int = 0,
                  batch_size: int = 32, lr: float = 2e-3, tau: float = 0.05,
                  weight_decay: float = 0.01, warmup: int = 30, log_every: int = 50,
                  out: str | Path | None = None, check: bool = True,
                  threads: int | None = 1) -> dict:
    """Warm the tiny model up in place (or into ``out``); returns the loss curve and timing.

    InfoNCE over the batch's positives and hard negatives, both directions; AdamW with a
    linear warm-up and cosine decay. ``check`` measures :func:`overlap_accuracy` before
    and after (recorded in ``mmemb_pretrain.json``). ``threads``: torch threads while it
    runs; 1 is fastest for this tiny model (and immune to busy neighbours on shared cores).
    """
    from mmemb.sharding import torch_threads

    with torch_threads(threads):
        return _pretrain(model_dir, steps, seed, batch_size, lr, tau, weight_decay, warmup,
                         log_every, out, check)


def _pretrain(model_dir, steps, seed, batch_size, lr, tau, weight_decay, warmup, log_every,
              out, check) -> dict:
    """The warm-up loop (module docstring: why): generated word-overlap triplets, the
    InfoNCE loss through :meth:`Embedder.embed`, a linear warm-up, optional checks."""
    from mmemb.model.embedder import Embedder
    from mmemb.model.prompts import EmbedInput

    model_dir = Path(model_dir)
    out = Path(out) if out is not None else model_dir
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vocab = _vocab()
    emb = Embedder.from_pretrained(model_dir)
    acc_before = overlap_accuracy(emb) if check else None
    emb.model.train()
    params = [p for p in emb.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup))
        * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * min(s, steps) / steps)).item()))
    t0 = time.perf_counter()
    curve: list[tuple[int, float]] = []
    for step in range(steps):
        ex = [make_example(rng, vocab) for _ in range(batch_size)]
        q = emb.embed([EmbedInput(text=x[1], instruction=x[0]) for x in ex]).embeddings
        d = emb.embed([EmbedInput(text=t) for t in [x[2] for x in ex] + [x[3] for x in ex]]
                      ).embeddings  # [2B, H]: positives, then hard negatives
        logits = q @ d.T / tau  # [B, 2B]
        labels = torch.arange(batch_size)
        loss = F.cross_entropy(logits, labels) + F.cross_entropy(
            logits[:, :batch_size].T, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            curve.append((step, float(loss.detach())))
    emb.model.eval()
    acc_after = overlap_accuracy(emb) if check else None
    emb.save_pretrained(out)
    # vLLM's loader reads preprocessor_config.json, which a processor's save does not write.
    emb.processor.image_processor.save_pretrained(out)
    if out != model_dir and (model_dir / "mmemb_tiny.json").is_file():
        (out / "mmemb_tiny.json").write_text((model_dir / "mmemb_tiny.json").read_text())
    info = {"what": "simulated pretraining (contrastive word-overlap warm-up, see "
                    "mmemb/model/pretrain.py)", "steps": steps, "seed": seed,
            "batch_size": batch_size, "lr": lr, "tau": tau, "seconds":
                round(time.perf_counter() - t0, 1), "loss_first": curve[0][1] if curve else None,
            "loss_last": curve[-1][1] if curve else None,
            "overlap_accuracy_before": acc_before, "overlap_accuracy_after": acc_after}
    (out / PRETRAIN_FILE).write_text(json.dumps(info, indent=2))
    return {**info, "curve": curve}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Simulated pretraining of the tiny model.")
    p.add_argument("--model", required=True, help="tiny model folder (updated in place)")
    p.add_argument("--out", default=None, help="write elsewhere instead")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    a = p.parse_args(argv)
    r = pretrain_tiny(a.model, a.steps, a.seed, a.batch_size, a.lr, out=a.out)
    print(json.dumps({k: v for k, v in r.items() if k != "curve"}, indent=2))
    for s, v in r["curve"]:
        print(f"step {s:5d} loss {v:.4f}")


if __name__ == "__main__":
    main()
