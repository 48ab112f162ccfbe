"""Stage 2: counterfactual scoring, does rationale r help query q find its positive?

For pair i with candidate pool C_i = {t_i+} + negatives, and a reference embedder f::

    s(x)     = log_softmax_{t in C_i}( cos(f(x), f(t)) / tau )[t_i+]
    delta_ik = s(q_i + r_ik) - s(q_i)        # do(r = r_ik) versus do(r = none)

``q + r`` is the query embedded in reasoning mode (``<think> r </think><emb>``), ``q`` the
same query in direct mode. Each query is embedded without reasoning once (reused for its K
candidates) and every distinct target once. Pools: the positive, the pair's hard negatives
(``neg_text``) when present, then positives of other pairs of the same dataset (in-batch
negatives), sampled with a per-pair seed so pools do not depend on sharding.

Rows (contract ``scores``): s_with, s_without, delta, both cosines to the positive, the
positive's rank (1 = first; ties count against it) with and without. A candidate whose
rationale status is not ``ok`` gets a row with status ``skipped`` (nothing is dropped).

Run alone on the embedded default (after stage 1)::

    python -m mmemb.stages.score --config configs/demo.yaml --section score
    python -m mmemb.stages.score --pairs runs/demo/data/pairs \\
        --rationales runs/demo/generate/rationales --model runs/demo/base_model \\
        --image-root runs/demo/data --out runs/demo/score
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from data_contracts import io
from data_contracts.io import ContractError
from data_contracts.schemas import PAIRS, RATIONALES, SCORES
from mmemb.configs.score import ScoreConfig
from mmemb.model.prompts import EmbedInput
from mmemb.sharding import fingerprint, input_digest, run_sharded, split, torch_threads
from mmemb.stages.base import StageResult, StepLogger, null_logger
from mmemb.teachers.base import reserved_in

TargetKey = tuple[str, str, str]  # (instruction, text, image path)


# --------------------------------------------------------------------------- the math


@dataclass
class Counterfactual:
    """Per candidate k: the scores of the positive with and without the rationale."""

    cos_with: torch.Tensor  # [K]
    cos_without: torch.Tensor  # [] (one per query, shared by its K candidates)
    s_with: torch.Tensor  # [K]
    s_without: torch.Tensor  # []
    delta: torch.Tensor  # [K]
    rank_with: torch.Tensor  # [K], 1 = the positive ranks first
    rank_without: torch.Tensor  # []


def counterfactual(q_without: torch.Tensor, q_with: torch.Tensor, pool: torch.Tensor,
                   tau: float, pos: int = 0) -> Counterfactual:
    """The pure math of stage 2 for one query, its K rationales and its pool.

    ``q_without`` [H], ``q_with`` [K, H], ``pool`` [P, H] (row ``pos`` is the positive).
    Vectors need not be normalised: cosines are computed here. Ranks are pessimistic: a
    negative that ties with the positive ranks before it.
    """
    q0 = torch.nn.functional.normalize(q_without.double(), dim=-1)  # [H]
    qk = torch.nn.functional.normalize(q_with.double(), dim=-1)  # [K, H]
    t = torch.nn.functional.normalize(pool.double(), dim=-1)  # [P, H]
    cos0 = t @ q0  # [P]
    cosk = qk @ t.T  # [K, P]
    s0 = torch.log_softmax(cos0 / tau, dim=-1)[pos]  # []
    sk = torch.log_softmax(cosk / tau, dim=-1)[:, pos]  # [K]
    others = torch.ones(t.shape[0], dtype=torch.bool)
    others[pos] = False
    rank0 = 1 + (cos0[others] >= cos0[pos]).sum()  # []
    rankk = 1 + (cosk[:, others] >= cosk[:, pos:pos + 1]).sum(dim=1)  # [K]
    return Counterfactual(cosk[:, pos], cos0[pos], sk, s0, sk - s0, rankk, rank0)


# --------------------------------------------------------------------------- pools


def build_pools(pairs: list[dict], pool_size: int, seed: int, hard_negatives: bool = True
                ) -> dict[str, list[TargetKey]]:
    """Per pair: [positive, hard negatives..., in-batch positives of the same dataset...].

    Negatives equal to the positive (same text and image) are left out: a duplicate of the
    positive is not a negative. The in-batch choice is seeded per pair, so a pair's pool is
    the same whichever shard it is scored in.
    """
    def key(inst, text, img) -> TargetKey:
        return (inst or "", text or "", img or "")

    by_ds: dict[str, set[TargetKey]] = defaultdict(set)
    for p in pairs:
        by_ds[p["dataset"]].add(key(p["pos_inst"], p["pos_text"], p["pos_img_path"]))
    pools = {}
    for p in pairs:
        pos = key(p["pos_inst"], p["pos_text"], p["pos_img_path"])
        negs: list[TargetKey] = []
        if hard_negatives:
            for t, im in zip(p["neg_text"] or [], p["neg_img_path"] or [], strict=True):
                k = key(p["pos_inst"], t, im)
                if k != pos and k not in negs:
                    negs.append(k)
        others = sorted(by_ds[p["dataset"]] - {pos} - set(negs))
        random.Random(f"{seed}:{p['pair_id']}").shuffle(others)
        pools[p["pair_id"]] = [pos] + (negs + others)[: pool_size - 1]
    return pools


# --------------------------------------------------------------------------- embedding


def embed_sorted(emb, inputs: list[EmbedInput], mode: str, batch_size: int, desc: str,
                 progress: bool = True) -> tuple[torch.Tensor, list[str | None]]:
    """Embeddings [N, H] in input order, computed in batches sorted by prompt length.

    Sorting by (images, characters incl. the rationale) keeps padding, and so wasted
    compute, small when rationale lengths vary a lot. A batch that fails is retried input by
    input; an input that still fails gets a NaN row and its error message (second value).
    """
    from tqdm.auto import tqdm

    if not inputs:
        return torch.zeros(0, emb.hidden_size), []
    order = sorted(range(len(inputs)), key=lambda i: (
        len(inputs[i].images), len(inputs[i].text) + len(inputs[i].instruction)
        + len(inputs[i].rationale or "")))
    out = torch.full((len(inputs), emb.hidden_size), float("nan"))  # [N, H]
    errors: list[str | None] = [None] * len(inputs)
    with torch.no_grad():
        for s in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch",
                      disable=not progress, leave=False):
            idx = order[s:s + batch_size]
            try:
                out[idx] = emb.embed([inputs[i] for i in idx], mode=mode).embeddings.float().cpu()
            except Exception:  # noqa: BLE001 - isolate the input(s) that fail
                for i in idx:
                    try:
                        out[i] = emb.embed([inputs[i]], mode=mode).embeddings[0].float().cpu()
                    except Exception as e:  # noqa: BLE001
                        errors[i] = f"embedding failed: {type(e).__name__}: {e}"[:500]
    return out, errors


def scored_fields(cf: Counterfactual, j: int) -> dict:
    """Candidate ``j``'s score row fields: status ``ok``, or ``error`` naming the value when
    one is not finite (NaN/inf embeddings), which the scores contract refuses as ``ok``."""
    f = {"cos_with": float(cf.cos_with[j]), "cos_without": float(cf.cos_without),
         "s_with": float(cf.s_with[j]), "s_without": float(cf.s_without),
         "delta": float(cf.delta[j])}
    bad = {k: v for k, v in f.items() if not math.isfinite(v)}
    if bad:
        return {"status": "error", "error": f"non-finite score {bad}: the model's embeddings "
                "hold NaN/inf for this query or rationale"}
    return {"status": "ok", "error": None, **f, "rank_with": int(cf.rank_with[j]),
            "rank_without": int(cf.rank_without)}


# --------------------------------------------------------------------------- the stage


def skip_reason(cand: dict) -> str | None:
    """Why a candidate is not embedded: its generation did not finish well, or it holds a
    reserved token (chat/vision markers in a rationale break the prompt, and stage 3 drops
    malformed candidates anyway)."""
    if cand["status"] != "ok":
        return f"rationale status {cand['status']!r}"
    bad = reserved_in(cand["text"])
    if bad:
        return f"malformed rationale (reserved token(s) {bad}): not embedded"
    return None


def _load(cfg: ScoreConfig) -> tuple[list[dict], dict[str, list[dict]], int]:
    """Pairs, and the candidates of the scored side grouped by pair (checked against pairs)."""
    pairs = io.read(cfg.pairs, PAIRS, image_root=cfg.image_root,
                    allow_outside_root=cfg.allow_images_outside_root).to_pylist()
    rat = io.read(cfg.rationales, RATIONALES).to_pylist()
    ids = {p["pair_id"] for p in pairs}
    by_pair: dict[str, list[dict]] = defaultdict(list)
    other_side = 0
    for i, r in enumerate(rat):
        if r["pair_id"] not in ids:
            raise ContractError(cfg.rationales, f"pair_id {r['pair_id']!r} is not in the pairs "
                                f"artifact {cfg.pairs}", column="pair_id", row=i,
                                fix="score with the pairs the rationales were generated from.")
        if r["side"] != cfg.side:
            other_side += 1
            continue
        by_pair[r["pair_id"]].append(r)
    return pairs, by_pair, other_side


def _load_embedder(cfg: ScoreConfig):
    from mmemb.model.embedder import Embedder

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cfg.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    emb = Embedder.from_pretrained(cfg.model, dtype=dtype, device=device,
                                   max_pixels=cfg.max_pixels, min_pixels=cfg.min_pixels,
                                   max_decode_pixels=cfg.max_decode_pixels)
    emb.model.eval()
    return emb


def _model_stamp(model: str) -> list:
    """Weights identity for the resume fingerprint: the checkpoint's content digest (model
    files only; about one read of the weights, which the stage loads next anyway, so they
    come from the page cache); a hub id stands for itself."""
    from data_contracts.files import checkpoint_digest

    path = Path(model)
    return [checkpoint_digest(path)] if path.is_dir() else [model]


def run(cfg: ScoreConfig, log: StepLogger = null_logger) -> StageResult:
    """Score every candidate rationale; write ``<out>/scores``."""
    with torch_threads(cfg.torch_threads):
        return _run(cfg)


def _run(cfg: ScoreConfig) -> StageResult:
    t0 = time.perf_counter()
    pairs, by_pair, other_side = _load(cfg)
    pools = build_pools(pairs, cfg.pool_size, cfg.seed, cfg.hard_negatives)
    out = Path(cfg.out) / "scores"
    fp = fingerprint("score-v1", input_digest(cfg.pairs), input_digest(cfg.rationales),
                     _model_stamp(cfg.model),
                     cfg.digest_view("resume"))
    state: dict = {}

    def targets() -> tuple[object, dict[TargetKey, torch.Tensor]]:
        """The embedder and every distinct pool member's embedding, computed once."""
        if "emb" not in state:
            state["emb"] = _load_embedder(cfg)
            keys = sorted({k for pool in pools.values() for k in pool})
            inputs = [EmbedInput.from_row(i, t, im, cfg.image_root) for i, t, im in keys]
            vecs, errs = embed_sorted(state["emb"], inputs, "direct", cfg.batch_size,
                                      "targets", cfg.progress)
            bad = [(k, e) for k, e in zip(keys, errs, strict=True) if e]
            if bad:
                raise ContractError(cfg.pairs, f"target {bad[0][0]} cannot be embedded "
                                    f"({bad[0][1]})", column="pos_text",
                                    fix="fix or remove the pair's target (or its image).")
            state["t"] = dict(zip(keys, vecs, strict=True))
        return state["emb"], state["t"]

    def process(name: str, block: list[dict]) -> list[dict]:
        emb, tvec = targets()
        queries = [EmbedInput.from_row(p["qry_inst"], p["qry_text"], p["qry_img_path"],
                                       cfg.image_root) for p in block]
        need = [b for b, p in enumerate(block)
                if any(skip_reason(c) is None for c in by_pair.get(p["pair_id"], []))]
        got, got_err = embed_sorted(emb, [queries[b] for b in need], "direct", cfg.batch_size,
                                    f"{name} queries", cfg.progress)  # once per query
        q0 = torch.full((len(block), got.shape[1] if len(need) else 1), float("nan"))
        q0_err: list[str | None] = [None] * len(block)
        for n, b in enumerate(need):
            q0[b], q0_err[b] = got[n], got_err[n]  # [B, H], reused for the query's K
        todo = [(b, c) for b, p in enumerate(block) for c in by_pair.get(p["pair_id"], [])
                if skip_reason(c) is None and q0_err[b] is None]
        reasoned = [EmbedInput(queries[b].text, queries[b].instruction, queries[b].images,
                               rationale=c["text"]) for b, c in todo]
        qk, qk_err = embed_sorted(emb, reasoned, "reason", cfg.batch_size, f"{name} q+r",
                                  cfg.progress)  # [N, H]
        vec_of = {(c["pair_id"], c["teacher_id"], c["cand_idx"]): (qk[n], qk_err[n])
                  for n, (_, c) in enumerate(todo)}
        rows = []
        for b, p in enumerate(block):
            cands = sorted(by_pair.get(p["pair_id"], []),
                           key=lambda c: (c["teacher_id"], c["cand_idx"]))
            pool = torch.stack([tvec[k] for k in pools[p["pair_id"]]])  # [P, H]
            key_of = {id(c): (c["pair_id"], c["teacher_id"], c["cand_idx"]) for c in cands}
            ok = [c for c in cands if vec_of.get(key_of[id(c)], (None, "x"))[1] is None]
            cf = None
            if ok:
                cf = counterfactual(q0[b], torch.stack([vec_of[key_of[id(c)]][0] for c in ok]),
                                    pool, cfg.tau)
            j = 0
            for c in cands:
                row = {"pair_id": p["pair_id"], "teacher_id": c["teacher_id"],
                       "cand_idx": c["cand_idx"], "pool_size": len(pools[p["pair_id"]])}
                key = key_of[id(c)]
                if q0_err[b] is not None:
                    row.update(status="error", error=f"query: {q0_err[b]}")
                elif skip_reason(c) is not None:
                    row.update(status="skipped", error=skip_reason(c))
                elif vec_of[key][1] is not None:
                    row.update(status="error", error=vec_of[key][1])
                else:
                    row.update(scored_fields(cf, j))
                    j += 1
                rows.append(row)
        return [{k: r.get(k) for k in SCORES.columns} for r in rows]

    blocks = split(pairs, cfg.shard_size)
    res = run_sharded([(f"{i:05d}", b) for i, b in enumerate(blocks)], out, SCORES, process,
                      fp, resume=cfg.resume, progress=cfg.progress)
    table = io.read(out, SCORES)
    deltas = [d for d, s in zip(table.column("delta").to_pylist(),
                                table.column("status").to_pylist(), strict=True) if s == "ok"]
    n = table.num_rows
    metrics = {"rows": float(n), "scored": float(len(deltas)),
               "skipped": float(n - len(deltas)), "other_side_rows": float(other_side),
               "mean_delta": sum(deltas) / max(1, len(deltas)),
               "share_delta_positive": sum(d > 0 for d in deltas) / max(1, len(deltas)),
               "mean_pool_size": sum(len(v) for v in pools.values()) / max(1, len(pools)),
               "shards_skipped": float(len(res.skipped)), "seconds": time.perf_counter() - t0}
    summary = (f"score: {len(deltas)} candidates scored, {n - len(deltas)} skipped; mean delta "
               f"{metrics['mean_delta']:+.3f}, {metrics['share_delta_positive']:.0%} positive; "
               f"pools of {metrics['mean_pool_size']:.1f} (tau {cfg.tau})")
    print(f"[score] {summary}", flush=True)
    return StageResult("score", outputs={"scores": res.ref}, metrics=metrics, summary=summary)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Stage 2: counterfactual scoring of rationales.")
    ap.add_argument("--config", help="YAML config file")
    ap.add_argument("--section", default=None, help="section of the YAML (e.g. score)")
    for k in ("pairs", "rationales", "model", "image-root", "out", "device"):
        ap.add_argument(f"--{k}")
    ap.add_argument("--pool-size", type=int)
    ap.add_argument("--tau", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--shard-size", type=int)
    a = ap.parse_args(argv)
    over = {k: v for k, v in vars(a).items() if k not in ("config", "section") and v is not None}
    cfg = ScoreConfig.from_args(a.config, a.section or "score", over)
    res = run(cfg)
    print(json.dumps(res.to_dict(), indent=2))


if __name__ == "__main__":
    main()
