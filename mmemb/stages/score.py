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
from mmemb.configs.cli import stage_main
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
    direct = torch.nn.functional.normalize(q_without.double(), dim=-1)  # [H]
    reasoned = torch.nn.functional.normalize(q_with.double(), dim=-1)  # [K, H]
    targets = torch.nn.functional.normalize(pool.double(), dim=-1)  # [P, H]
    cos_direct = targets @ direct  # [P]
    cos_reasoned = reasoned @ targets.T  # [K, P]
    s_direct = torch.log_softmax(cos_direct / tau, dim=-1)[pos]  # []
    s_reasoned = torch.log_softmax(cos_reasoned / tau, dim=-1)[:, pos]  # [K]
    others = torch.ones(targets.shape[0], dtype=torch.bool)
    others[pos] = False
    rank_direct = 1 + (cos_direct[others] >= cos_direct[pos]).sum()  # []
    rank_reasoned = 1 + (cos_reasoned[:, others] >= cos_reasoned[:, pos:pos + 1]).sum(dim=1)
    return Counterfactual(cos_reasoned[:, pos], cos_direct[pos], s_reasoned, s_direct,
                          s_reasoned - s_direct, rank_reasoned, rank_direct)  # [K] each or []


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


def scored_fields(scores: Counterfactual, j: int) -> dict:
    """Candidate ``j``'s score row fields: status ``ok``, or ``error`` naming the value when
    one is not finite (NaN/inf embeddings), which the scores contract refuses as ``ok``."""
    f = {"cos_with": float(scores.cos_with[j]), "cos_without": float(scores.cos_without),
         "s_with": float(scores.s_with[j]), "s_without": float(scores.s_without),
         "delta": float(scores.delta[j])}
    bad = {k: v for k, v in f.items() if not math.isfinite(v)}
    if bad:
        return {"status": "error", "error": f"non-finite score {bad}: the model's embeddings "
                "hold NaN/inf for this query or rationale"}
    return {"status": "ok", "error": None, **f, "rank_with": int(scores.rank_with[j]),
            "rank_without": int(scores.rank_without)}


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
    """The reference embedder of ``cfg.embed_engine``: the transformers Embedder, or a vLLM
    pooling engine with the same inference surface (``embed``, ``hidden_size``) whose
    processes end with it (:class:`mmemb.model.vllm_embedder.VLLMEmbedder`)."""
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cfg.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if cfg.embed_engine == "vllm":
        from mmemb.model.vllm_embedder import VLLMEmbedder

        return VLLMEmbedder.from_pretrained(cfg.model, dtype=dtype, max_pixels=cfg.max_pixels,
                                            min_pixels=cfg.min_pixels,
                                            max_decode_pixels=cfg.max_decode_pixels)
    from mmemb.model.embedder import Embedder

    emb = Embedder.from_pretrained(cfg.model, dtype=dtype, device=device,
                                   max_pixels=cfg.max_pixels, min_pixels=cfg.min_pixels,
                                   max_decode_pixels=cfg.max_decode_pixels)
    emb.model.eval()
    return emb


def _model_stamp(model: str, out: str) -> list:
    """Weights identity for the resume fingerprint: the checkpoint's content digest (model
    files only), memoised in ``<out>/_digests.json`` by (path, size, mtime) so a rerun of a
    multi-GB base costs a ``stat`` per file, not a read of the weights; a hub id stands for
    itself."""
    from data_contracts.files import checkpoint_digest

    path = Path(model)
    return [checkpoint_digest(path, Path(out) / "_digests.json")] if path.is_dir() else [model]


def run(cfg: ScoreConfig, log: StepLogger = null_logger) -> StageResult:
    """Score every candidate rationale; write ``<out>/scores``."""
    with torch_threads(cfg.torch_threads):
        return _run(cfg)


def _run(cfg: ScoreConfig) -> StageResult:
    """The recipe: inputs and pools, the resume fingerprint, every shard scored (the model
    loaded only if one is left to do), metrics."""
    t0 = time.perf_counter()
    data = load_score_inputs(cfg)
    out = Path(cfg.out) / "scores"
    fp = fingerprint("score-v1", input_digest(cfg.pairs), input_digest(cfg.rationales),
                     _model_stamp(cfg.model, cfg.out),
                     cfg.digest_view("resume"))
    targets = TargetVectors(cfg, data.pools)
    blocks = split(data.pairs, cfg.shard_size)
    res = run_sharded([(f"{i:05d}", b) for i, b in enumerate(blocks)], out, SCORES,
                      lambda name, block: score_block(cfg, data, targets, name, block),
                      fp, resume=cfg.resume, progress=cfg.progress)
    return stage_result(cfg, data, res, out, time.perf_counter() - t0)


@dataclass
class ScoreInputs:
    """The pairs, their candidates (scored side) and every pair's candidate pool."""

    pairs: list[dict]
    by_pair: dict[str, list[dict]]
    other_side: int  # candidates of the side not scored
    pools: dict[str, list[TargetKey]]

    def candidates(self, pair: dict) -> list[dict]:
        return self.by_pair.get(pair["pair_id"], [])


def load_score_inputs(cfg: ScoreConfig) -> ScoreInputs:
    pairs, by_pair, other_side = _load(cfg)
    return ScoreInputs(pairs, by_pair, other_side,
                       build_pools(pairs, cfg.pool_size, cfg.seed, cfg.hard_negatives))


@dataclass
class TargetVectors:
    """The embedder and every distinct pool member's embedding, computed on first use (a
    fully resumed run loads no model)."""

    cfg: ScoreConfig
    pools: dict[str, list[TargetKey]]
    emb: object = None
    vecs: dict[TargetKey, torch.Tensor] | None = None

    def get(self) -> tuple[object, dict[TargetKey, torch.Tensor]]:
        if self.emb is None:
            cfg = self.cfg
            self.emb = _load_embedder(cfg)
            keys = sorted({k for pool in self.pools.values() for k in pool})
            inputs = [EmbedInput.from_row(i, t, im, cfg.image_root) for i, t, im in keys]
            vecs, errs = embed_sorted(self.emb, inputs, "direct", cfg.batch_size, "targets",
                                      cfg.progress)
            bad = [(k, e) for k, e in zip(keys, errs, strict=True) if e]
            if bad:
                raise ContractError(cfg.pairs, f"target {bad[0][0]} cannot be embedded "
                                    f"({bad[0][1]})", column="pos_text",
                                    fix="fix or remove the pair's target (or its image).")
            self.vecs = dict(zip(keys, vecs, strict=True))
        return self.emb, self.vecs


CandKey = tuple[str, str, int]  # (pair_id, teacher_id, cand_idx)


def cand_key(cand: dict) -> CandKey:
    return (cand["pair_id"], cand["teacher_id"], cand["cand_idx"])


def score_block(cfg: ScoreConfig, data: ScoreInputs, targets: TargetVectors, name: str,
                block: list[dict]) -> list[dict]:
    """The score rows of one shard: each query embedded once in direct mode, each usable
    candidate once with its rationale, then the counterfactual per pair."""
    emb, target_vecs = targets.get()
    queries = [EmbedInput.from_row(p["qry_inst"], p["qry_text"], p["qry_img_path"],
                                   cfg.image_root) for p in block]
    direct, direct_err = embed_direct(cfg, emb, data, block, queries, name)
    todo = [(b, c) for b, p in enumerate(block) for c in data.candidates(p)
            if skip_reason(c) is None and direct_err[b] is None]
    reasoned_inputs = [EmbedInput(queries[b].text, queries[b].instruction, queries[b].images,
                                  rationale=c["text"]) for b, c in todo]
    reasoned, reasoned_err = embed_sorted(emb, reasoned_inputs, "reason", cfg.batch_size,
                                          f"{name} q+r", cfg.progress)  # [N, H]
    with_rationale = {cand_key(c): (reasoned[n], reasoned_err[n])
                      for n, (_, c) in enumerate(todo)}
    rows = []
    for b, p in enumerate(block):
        pool = torch.stack([target_vecs[k] for k in data.pools[p["pair_id"]]])  # [P, H]
        rows += pair_rows(cfg, p, data.candidates(p), direct[b], direct_err[b], pool,
                          with_rationale)
    return [{k: r.get(k) for k in SCORES.columns} for r in rows]


def embed_direct(cfg: ScoreConfig, emb, data: ScoreInputs, block: list[dict],
                 queries: list[EmbedInput], name: str
                 ) -> tuple[torch.Tensor, list[str | None]]:
    """Direct-mode embeddings ``[B, H]`` (NaN where not needed) and errors of the block's
    queries; only queries with a usable candidate are embedded, each once for its K."""
    need = [b for b, p in enumerate(block)
            if any(skip_reason(c) is None for c in data.candidates(p))]
    got, got_err = embed_sorted(emb, [queries[b] for b in need], "direct", cfg.batch_size,
                                f"{name} queries", cfg.progress)
    direct = torch.full((len(block), got.shape[1] if len(need) else 1), float("nan"))
    direct_err: list[str | None] = [None] * len(block)
    for n, b in enumerate(need):
        direct[b], direct_err[b] = got[n], got_err[n]
    return direct, direct_err


def pair_rows(cfg: ScoreConfig, pair: dict, cands: list[dict], direct: torch.Tensor,
              direct_err: str | None, pool: torch.Tensor,
              with_rationale: dict[CandKey, tuple[torch.Tensor, str | None]]) -> list[dict]:
    """One row per candidate of a pair (teacher, candidate order): scored, skipped, or the
    error of the query's or the candidate's embedding."""
    cands = sorted(cands, key=lambda c: (c["teacher_id"], c["cand_idx"]))
    ok = [c for c in cands if with_rationale.get(cand_key(c), (None, "x"))[1] is None]
    scores = None
    if ok:
        scores = counterfactual(direct, torch.stack([with_rationale[cand_key(c)][0]
                                                     for c in ok]), pool, cfg.tau)
    rows, j = [], 0
    for c in cands:
        row = {"pair_id": pair["pair_id"], "teacher_id": c["teacher_id"],
               "cand_idx": c["cand_idx"], "pool_size": len(pool)}
        if direct_err is not None:
            row.update(status="error", error=f"query: {direct_err}")
        elif skip_reason(c) is not None:
            row.update(status="skipped", error=skip_reason(c))
        elif with_rationale[cand_key(c)][1] is not None:
            row.update(status="error", error=with_rationale[cand_key(c)][1])
        else:
            row.update(scored_fields(scores, j))
            j += 1
        rows.append(row)
    return rows


def stage_result(cfg: ScoreConfig, data: ScoreInputs, res, out: Path, seconds: float
                 ) -> StageResult:
    """Metrics over the whole artifact (resumed shards included) and the summary."""
    table = io.read(out, SCORES)
    deltas = [d for d, s in zip(table.column("delta").to_pylist(),
                                table.column("status").to_pylist(), strict=True) if s == "ok"]
    n, pools = table.num_rows, data.pools
    metrics = {"rows": float(n), "scored": float(len(deltas)),
               "skipped": float(n - len(deltas)), "other_side_rows": float(data.other_side),
               "mean_delta": sum(deltas) / max(1, len(deltas)),
               "share_delta_positive": sum(d > 0 for d in deltas) / max(1, len(deltas)),
               "mean_pool_size": sum(len(v) for v in pools.values()) / max(1, len(pools)),
               "shards_skipped": float(len(res.skipped)), "seconds": seconds}
    summary = (f"score: {len(deltas)} candidates scored, {n - len(deltas)} skipped; mean delta "
               f"{metrics['mean_delta']:+.3f}, {metrics['share_delta_positive']:.0%} positive; "
               f"pools of {metrics['mean_pool_size']:.1f} (tau {cfg.tau})")
    print(f"[score] {summary}", flush=True)
    return StageResult("score", outputs={"scores": res.ref}, metrics=metrics, summary=summary)


def main(argv: list[str] | None = None) -> None:
    """``python -m mmemb.stages.score``: flags generated from its config class."""
    stage_main("score", run, argv)


if __name__ == "__main__":
    main()
