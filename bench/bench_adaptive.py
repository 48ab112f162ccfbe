"""Direct vs always-reason vs adaptive: accuracy, reasoning ratio and latency, one run.

Claim checked (issue 6): adaptive inference costs clearly less than always-reason at
equal or better accuracy. Each query is embedded alone (batch size 1) so its latency is
its own; candidates are embedded once, in direct mode, and shared by the three modes.

    python bench/bench_adaptive.py --model runs/demo/gate/policy --eval runs/demo/data/eval \\
        --image-root runs/demo/data [--limit N] [--vllm]

``--limit N`` takes every k-th row (all tasks stay represented); budget and threshold
default to the ones the gate stage saved beside the policy (``mmemb_gate.json``, read by
``mmemb.model.gate_settings``; else 64 and 0.5).
``--vllm`` generates the rationales with a vLLM engine on the same weights.

Without ``--model`` it builds the untrained tiny model (numbers then only show the
mechanics, not the method).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from data_contracts import io  # noqa: E402
from data_contracts.schemas import EVAL_ROWS  # noqa: E402
from mmemb.inference import MODES, AdaptiveEncoder  # noqa: E402
from mmemb.model.embedder import Embedder  # noqa: E402
from mmemb.model.gate_settings import GateSettings  # noqa: E402
from mmemb.model.prompts import EmbedInput  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--eval")
    ap.add_argument("--image-root")
    ap.add_argument("--limit", type=int, default=0, help="0 = every eval row")
    ap.add_argument("--budget", type=int)
    ap.add_argument("--threshold", type=float)
    ap.add_argument("--vllm", action="store_true", help="generate rationales with vLLM")
    a = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    if not a.model or not a.eval:
        from mmemb.data.synth import generate
        from mmemb.model.tiny import build_tiny

        a.model = a.model or str(build_tiny(Path(tmp.name) / "tiny"))
        if not a.eval:
            d = generate(Path(tmp.name) / "data", "smoke", 0)
            a.eval, a.image_root = str(d["eval"]), str(d["image_root"])
    torch.manual_seed(0)
    gate = GateSettings.load(a.model).override(a.budget, a.threshold)
    budget, threshold = gate.budget, gate.threshold
    emb = Embedder.from_pretrained(a.model)
    vpol = None
    if a.vllm:
        from mmemb.vllm_policy import VLLMPolicy

        vpol = VLLMPolicy(a.model, budget=budget)
    enc = AdaptiveEncoder(emb, budget=budget, threshold=threshold, vllm=vpol)
    rows = io.read(a.eval, EVAL_ROWS).to_pylist()
    if a.limit and a.limit < len(rows):
        step = len(rows) / a.limit
        rows = [rows[int(i * step)] for i in range(a.limit)]
    queries = [EmbedInput.from_row(r["qry_inst"], r["qry_text"], r["qry_img_path"],
                                   a.image_root) for r in rows]
    cands = sorted({t for r in rows for t in r["tgt_text"]})
    cpos = {t: i for i, t in enumerate(cands)}
    cvec = emb.encode([EmbedInput(text=t) for t in cands], batch_size=64).embeddings
    enc.encode(queries[:2], mode="reason", batch_size=1)  # warm-up
    # Interleaved: each query runs in the three modes back to back (rotating which goes
    # first), so a load change on a shared machine hits every mode alike.
    outs = {m: [] for m in MODES}
    walls = dict.fromkeys(MODES, 0.0)
    for i, q in enumerate(queries):
        for k in range(len(MODES)):
            mode = MODES[(i + k) % len(MODES)]
            t0 = time.perf_counter()
            outs[mode].append(enc.encode([q], mode=mode, batch_size=1))
            walls[mode] += time.perf_counter() - t0
    results = {}
    for mode in MODES:
        res = outs[mode]
        hits = []
        for i, r in enumerate(rows):
            s = res[i].embeddings[0] @ cvec[[cpos[t] for t in r["tgt_text"]]].T  # [C]
            hits.append(float(s[0] > s[1:].max()))  # pessimistic ties, positive first
        lat = [o.latency_ms[0] for o in res]
        reasoned = [o.reasoned[0] for o in res]
        results[mode] = {"hit@1": 100 * sum(hits) / len(hits),
                         "reason_ratio": sum(reasoned) / len(reasoned),
                         "gen_tokens": statistics.mean(o.n_gen_tokens[0] for o in res),
                         "lat_mean": statistics.mean(lat), "lat_p50": pct(lat, 0.5),
                         "lat_p95": pct(lat, 0.95), "wall_s": walls[mode]}
    print(f"# adaptive inference bench: {len(rows)} queries, {platform.processor() or 'cpu'}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, budget {budget}, "
          f"threshold {threshold}, generation {'vLLM' if vpol else 'transformers'}")
    print("| mode | hit@1 | reasoning ratio | gen tokens | latency mean / p50 / p95 (ms) |")
    print("|---|---|---|---|---|")
    for m, r in results.items():
        print(f"| {m} | {r['hit@1']:.1f} | {r['reason_ratio']:.2f} | {r['gen_tokens']:.1f} | "
              f"{r['lat_mean']:.1f} / {r['lat_p50']:.1f} / {r['lat_p95']:.1f} |")
    ad, rs = results["adaptive"], results["reason"]
    print(f"adaptive / always-reason latency (mean): {ad['lat_mean'] / rs['lat_mean']:.2f}x; "
          f"always-reason / adaptive: {rs['lat_mean'] / ad['lat_mean']:.2f}x")
    print(f"adaptive - always-reason hit@1: {ad['hit@1'] - rs['hit@1']:+.1f} points; "
          f"adaptive - direct: {ad['hit@1'] - results['direct']['hit@1']:+.1f} points")
    if vpol is not None:
        vpol.close()
    tmp.cleanup()
    return results


if __name__ == "__main__":
    main()
