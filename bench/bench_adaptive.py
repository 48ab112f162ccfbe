"""Direct vs always-reason vs adaptive: accuracy, tokens and latency, one interleaved run.

Claims checked (issues 6 and 17): adaptive inference costs clearly less than always-reason
at equal or better accuracy, and an input that reasons is prefilled once (one KV cache for
the decision, the rationale and the embedding). Each query is embedded alone (batch size
1) so its latency is its own wall time; candidates are embedded once, in direct mode, and
shared by the three modes. "Tokens" are the real (unmasked) token positions the decoder
is given over every forward call, counted by a hook on the base model, so the figure
means the same for any implementation of the modes.

    python bench/bench_adaptive.py --model runs/demo/gate/policy --eval runs/demo/data/eval \\
        --image-root runs/demo/data [--limit N] [--repeat 3] [--vllm]

``--limit N`` takes every k-th row (all tasks stay represented); budget and threshold
default to the ones the gate stage saved beside the policy (``mmemb_gate.json``, read by
``mmemb.model.gate_settings``; else 64 and 0.5).
``--repeat R`` times each query R times per mode (interleaved) and takes the median.
``--vllm`` generates the rationales with a vLLM engine on the same weights (its tokens are
then not counted: they run in the engine).

Without ``--model`` it builds the untrained tiny model (numbers then only show the
mechanics, not the method). The last line is the contract::

    adaptive/reason latency=X tokens=Y hit@1 adaptive=A reason=B direct=C

X: median adaptive latency / median always-reason latency; Y: decoder tokens adaptive /
always-reason; A, B, C: hit@1 in %.
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


class TokenCounter:
    """Counts the real token positions the decoder is given, over every forward call of
    the base model (a pre-hook: prefills, decode steps and embedding passes alike)."""

    def __init__(self, emb: Embedder):
        from mmemb.model.embedder import hf_model

        hf = hf_model(emb.model)
        base = hf.model if hasattr(hf, "model") else hf
        self.n = 0
        self.handle = base.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _mod, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        mask = kwargs.get("attention_mask")
        k = ids.shape[1]
        self.n += int(mask[:, -k:].sum()) if mask is not None else ids.numel()


def load_queries(a, emb: Embedder):
    """The eval rows (every k-th under ``--limit``), their queries and the candidates'
    direct embeddings [C, H] with each candidate's row in it."""
    rows = io.read(a.eval, EVAL_ROWS).to_pylist()
    if a.limit and a.limit < len(rows):
        step = len(rows) / a.limit
        rows = [rows[int(i * step)] for i in range(a.limit)]
    queries = [EmbedInput.from_row(r["qry_inst"], r["qry_text"], r["qry_img_path"],
                                   a.image_root) for r in rows]
    cands = sorted({t for r in rows for t in r["tgt_text"]})
    cvec = emb.encode([EmbedInput(text=t) for t in cands], batch_size=64).embeddings
    return rows, queries, {t: i for i, t in enumerate(cands)}, cvec


def run_interleaved(enc: AdaptiveEncoder, queries: list[EmbedInput], counter: TokenCounter,
                    repeat: int = 3) -> dict[str, list[tuple]]:
    """Each query in the three modes back to back (rotating which goes first), ``repeat``
    times, so a load change on a shared machine hits every mode alike: per mode, (result,
    median wall ms over the repeats, decoder tokens)."""
    enc.encode(queries[:2], mode="reason", batch_size=1)  # warm-up
    outs: dict[str, list[tuple]] = {m: [] for m in MODES}
    for i, q in enumerate(queries):
        walls: dict[str, list[float]] = {m: [] for m in MODES}
        first: dict[str, tuple] = {}
        for r in range(repeat):
            for k in range(len(MODES)):
                mode = MODES[(i + r + k) % len(MODES)]
                n0 = counter.n
                t0 = time.perf_counter()
                res = enc.encode([q], mode=mode, batch_size=1)
                walls[mode].append(1000 * (time.perf_counter() - t0))
                first.setdefault(mode, (res, counter.n - n0))
        for m in MODES:
            outs[m].append((first[m][0], statistics.median(walls[m]), first[m][1]))
    return outs


def summarise(outs, rows, cpos, cvec) -> dict[str, dict]:
    """Per mode: hit@1 (%), reasoning ratio, generated and decoder tokens per query,
    latency mean / median / p95 (ms)."""
    results = {}
    for mode, got in outs.items():
        hits = []
        for (res, _, _), r in zip(got, rows, strict=True):
            s = res.embeddings[0] @ cvec[[cpos[t] for t in r["tgt_text"]]].T  # [C]
            hits.append(float(s[0] > s[1:].max()))  # pessimistic ties, positive first
        lat = [w for _, w, _ in got]
        results[mode] = {"hit@1": 100 * sum(hits) / len(hits),
                         "reason_ratio": statistics.mean(o.reasoned[0] for o, _, _ in got),
                         "gen_tokens": statistics.mean(o.n_gen_tokens[0] for o, _, _ in got),
                         "tokens": statistics.mean(n for _, _, n in got),
                         "lat_mean": statistics.mean(lat), "lat_p50": statistics.median(lat),
                         "lat_p95": pct(lat, 0.95)}
    return results


def floor_ratio(outs: dict[str, list[tuple]]) -> float:
    """The least median latency ratio any adaptive implementation can reach with this gate:
    per query, the direct mode's latency where the gate skips and the always-reason mode's
    where it reasons (the same work at temperature 0, less the decision), over the median
    always-reason latency. With the gate reasoning on more than half the queries the median
    adaptive query is a reasoning one, so this floor sits well above the reasoning share."""
    floor = [(r if a[0].reasoned[0] else d)
             for a, (_, r, _), (_, d, _) in zip(outs["adaptive"], outs["reason"], outs["direct"],
                                                strict=True)]
    return statistics.median(floor) / statistics.median(w for _, w, _ in outs["reason"])


def report(results: dict[str, dict], header: str, floor: float | None = None) -> None:
    """The table, the mean ratios, then the contract line (last)."""
    print(header)
    print("| mode | hit@1 | reasoning ratio | gen tokens | decoder tokens | "
          "latency mean / p50 / p95 (ms) |")
    print("|---|---|---|---|---|---|")
    for m, r in results.items():
        print(f"| {m} | {r['hit@1']:.1f} | {r['reason_ratio']:.2f} | {r['gen_tokens']:.1f} | "
              f"{r['tokens']:.1f} | {r['lat_mean']:.1f} / {r['lat_p50']:.1f} / "
              f"{r['lat_p95']:.1f} |")
    ad, rs, di = results["adaptive"], results["reason"], results["direct"]
    print(f"adaptive / always-reason latency: mean {ad['lat_mean'] / rs['lat_mean']:.2f}x, "
          f"median {ad['lat_p50'] / rs['lat_p50']:.2f}x; hit@1 adaptive - always-reason "
          f"{ad['hit@1'] - rs['hit@1']:+.1f} points, adaptive - direct "
          f"{ad['hit@1'] - di['hit@1']:+.1f} points")
    if floor is not None:
        print(f"the gate's floor (direct latency where it skips, always-reason latency where "
              f"it reasons): median {floor:.2f}x; reasoning share {ad['reason_ratio']:.2f}")
    print(f"adaptive/reason latency={ad['lat_p50'] / rs['lat_p50']:.2f} "
          f"tokens={ad['tokens'] / rs['tokens']:.2f} hit@1 adaptive={ad['hit@1']:.1f} "
          f"reason={rs['hit@1']:.1f} direct={di['hit@1']:.1f}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--eval")
    ap.add_argument("--image-root")
    ap.add_argument("--limit", type=int, default=0, help="0 = every eval row")
    ap.add_argument("--budget", type=int)
    ap.add_argument("--threshold", type=float)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--repeat", type=int, default=3,
                    help="timed runs per query and mode (its latency: their median)")
    ap.add_argument("--vllm", action="store_true", help="generate rationales with vLLM")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
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
    emb = Embedder.from_pretrained(a.model)
    vpol = None
    if a.vllm:
        from mmemb.vllm_policy import VLLMPolicy

        vpol = VLLMPolicy(a.model, budget=gate.budget)
    enc = AdaptiveEncoder(emb, budget=gate.budget, threshold=gate.threshold, vllm=vpol)
    rows, queries, cpos, cvec = load_queries(a, emb)
    counter = TokenCounter(emb)
    outs = run_interleaved(enc, queries, counter, a.repeat)
    results = summarise(outs, rows, cpos, cvec)
    report(results, f"# adaptive inference bench: {len(rows)} queries, "
           f"{platform.processor() or 'cpu'}, torch {torch.__version__}, threads "
           f"{torch.get_num_threads()}, budget {gate.budget}, threshold {gate.threshold}, "
           f"generation {'vLLM' if vpol else 'transformers'}, batch 1, interleaved, "
           f"median of {a.repeat} runs per query", floor_ratio(outs))
    if vpol is not None:
        vpol.close()
    tmp.cleanup()
    return results


if __name__ == "__main__":
    main()
