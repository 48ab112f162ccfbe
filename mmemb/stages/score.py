"""Stage 2: counterfactual scoring, does rationale r help query q find its positive?

For pair i with candidate pool C_i = {t_i+} + negatives, and a reference embedder f::

    s(x)     = log_softmax_{t in C_i}( cos(f(x), f(t)) / tau )[t_i+]
    delta_ik = s(q_i + r_ik) - s(q_i)        # do(r = r_ik) versus do(r = none)

``q + r`` is the query embedded in reasoning mode (``<think> r </think><emb>``), ``q`` the
same query in direct mode. Pools: the positive, the pair's hard negatives (``neg_text``)
when present, then positives of other pairs of the same dataset (in-batch negatives),
drawn in O(pool size) per pair with a per-pair seed so pools do not depend on sharding.

Two resumable artifacts: ``<out>/vectors`` holds the embedding of every *distinct* input
(key: mode, instruction, text, images, rationale), so a target shared by pools, a query
reused by its K candidates and a repeated rationale each cost one forward pass; then
``<out>/scores`` is computed from those vectors, pair by pair (pure math).

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

import hashlib
import json
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from data_contracts import io
from data_contracts.io import ContractError
from data_contracts.schemas import PAIRS, RATIONALES, SCORES, VECTORS
from data_contracts.vectors import matrix as vector_matrix
from data_contracts.vectors import vector_array
from mmemb.configs.cli import stage_main
from mmemb.configs.score import ScoreConfig
from mmemb.model.prompts import EmbedInput
from mmemb.pools import PoolIndex
from mmemb.sharding import (
    complete_with,
    fingerprint,
    input_digest,
    run_sharded,
    split,
    torch_threads,
)
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


def target_key(inst: str | None, text: str | None, img: str | None) -> TargetKey:
    return (inst or "", text or "", img or "")


def build_pools(pairs: list[dict], pool_size: int, seed: int, hard_negatives: bool = True
                ) -> dict[str, list[TargetKey]]:
    """Per pair: [positive, hard negatives..., in-batch positives of the same dataset...].

    Negatives equal to the positive (same text and image) are left out: a duplicate of the
    positive is not a negative. Each dataset's distinct positives are indexed once (sorted,
    so the pairs' order does not matter); a pair draws its in-batch negatives from that index
    in O(pool size) (:class:`mmemb.pools.PoolIndex`), with a generator seeded by the pair, so
    its pool is the same whichever shard it is scored in.
    """
    members: dict[str, set[TargetKey]] = defaultdict(set)
    for p in pairs:
        members[p["dataset"]].add(target_key(p["pos_inst"], p["pos_text"], p["pos_img_path"]))
    index = {ds: PoolIndex(sorted(m)) for ds, m in members.items()}
    pools = {}
    for p in pairs:
        pos = target_key(p["pos_inst"], p["pos_text"], p["pos_img_path"])
        negs: list[TargetKey] = []
        if hard_negatives:
            for t, im in zip(p["neg_text"] or [], p["neg_img_path"] or [], strict=True):
                k = target_key(p["pos_inst"], t, im)
                if k != pos and k not in negs:
                    negs.append(k)
        negs = negs[: pool_size - 1]
        rng = random.Random(f"{seed}:{p['pair_id']}")
        others = index[p["dataset"]].sample(rng, pool_size - 1 - len(negs), [pos, *negs])
        pools[p["pair_id"]] = [pos, *negs, *others]
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
    """The recipe: inputs and pools; every distinct input embedded once into
    ``<out>/vectors`` (resumable shards; the model loaded only if one is left to do); then
    every pair scored from those vectors into ``<out>/scores`` (pure math, resumable too)."""
    t0 = time.perf_counter()
    data = load_score_inputs(cfg)
    out = Path(cfg.out)
    stamp = _model_stamp(cfg.model, cfg.out)
    fp = fingerprint("score-v2", input_digest(cfg.pairs), input_digest(cfg.rationales), stamp,
                     cfg.digest_view("resume"))
    plan = plan_inputs(data, cfg.shard_size)
    vec_res = None
    if not (cfg.resume and complete_with(out / "scores", fp)):
        vec_res = run_sharded(plan.shards, out / "vectors", VECTORS, EmbedShard(cfg),
                              vectors_fingerprint(cfg, plan, stamp), resume=cfg.resume,
                              progress=cfg.progress, distributed=cfg.distributed)
    blocks = split(data.pairs, cfg.shard_size)
    res = run_sharded([(f"{i:05d}", b) for i, b in enumerate(blocks)], out / "scores", SCORES,
                      ScoreShard(cfg, data, out / "vectors"), fp, resume=cfg.resume,
                      progress=cfg.progress)
    return stage_result(cfg, data, res, out / "scores", time.perf_counter() - t0, plan,
                        vec_res)


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


# --------------------------------------------------------------------------- distinct inputs

#: One thing stage 2 embeds: (mode, instruction, text, image paths as in the row, rationale).
#: Equal keys give equal prompts, so each distinct key is embedded once per stage: a target
#: shared by many pools, a query that is also a target, and a rationale repeated by a
#: teacher (36.5% of the oracle's (query, rationale) inputs) cost one forward pass.
InputKey = tuple[str, str, str, tuple[str, ...], str | None]


def query_key(pair: dict, rationale: str | None = None) -> InputKey:
    """The pair's query, direct (no rationale) or reasoning with ``rationale``."""
    img = pair["qry_img_path"]
    return ("direct" if rationale is None else "reason", pair["qry_inst"] or "",
            pair["qry_text"] or "", (img,) if img else (), rationale)


def pool_key(target: TargetKey) -> InputKey:
    inst, text, img = target
    return ("direct", inst, text, (img,) if img else (), None)


def key_digest(key: InputKey) -> str:
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]


def embed_input(key: InputKey, image_root: str | None) -> EmbedInput:
    _, inst, text, images, rationale = key
    return EmbedInput(text, inst, [str(Path(image_root) / p) if image_root else p
                                   for p in images], rationale)


def pair_inputs(data: ScoreInputs, pair: dict) -> tuple[InputKey | None,
                                                         list[tuple[dict, InputKey]]]:
    """The pair's direct query (None when no candidate is usable, so nothing needs it) and
    each usable candidate with its reasoning input."""
    usable = [c for c in data.candidates(pair) if skip_reason(c) is None]
    if not usable:
        return None, []
    return query_key(pair), [(c, query_key(pair, c["text"])) for c in usable]


@dataclass
class InputPlan:
    """The distinct inputs in shards of ``(digest, key)``: shard i holds the inputs first
    needed by the pairs of block i (its pools' targets, its queries, its (query, rationale)
    inputs), so a query's K + 1 prompts share a shard and its image cache."""

    shards: list[tuple[str, list[tuple[str, InputKey]]]]
    needed: int  # inputs before deduplication: distinct targets + queries + (q, r) inputs

    @property
    def distinct(self) -> int:
        return sum(len(items) for _, items in self.shards)


def plan_inputs(data: ScoreInputs, shard_size: int) -> InputPlan:
    """Every distinct input once, in O(total pool and candidate size)."""
    seen: set[InputKey] = set()
    targets: set[TargetKey] = set()
    shards, per_pair = [], 0
    for i, block in enumerate(split(data.pairs, shard_size)):
        items = []
        for p in block:
            direct, reasoned = pair_inputs(data, p)
            pool = data.pools[p["pair_id"]]
            targets.update(pool)
            keys = [pool_key(t) for t in pool]
            if direct is not None:
                keys += [direct, *(k for _, k in reasoned)]
                per_pair += 1 + len(reasoned)
            for k in keys:
                if k not in seen:
                    seen.add(k)
                    items.append((key_digest(k), k))
        if items:
            shards.append((f"{i:05d}", items))
    return InputPlan(shards, per_pair + len(targets))


#: Config fields that change scores but not embeddings: changing one reuses the vectors.
SCORE_ONLY = ("pairs", "rationales", "pool_size", "hard_negatives", "tau", "seed",
              "shard_size", "side")


def vectors_fingerprint(cfg: ScoreConfig, plan: InputPlan, stamp: list) -> str:
    """What the vectors depend on: the inputs (by shard), the weights, the settings that
    change an embedding (resolution, dtype, image root...), not the pools or tau."""
    view = {k: v for k, v in cfg.digest_view("resume").items() if k not in SCORE_ONLY}
    return fingerprint("score-vectors-v1", [(n, [d for d, _ in items])
                                            for n, items in plan.shards], stamp, view)


@dataclass
class EmbedShard:
    """``run_sharded``'s process for ``<out>/vectors``: one shard's inputs embedded in
    length-sorted batches. A picklable object, not a closure: the embedder is created on
    the first call in the process (or Ray actor) that runs it and is never pickled, so a
    fully resumed run loads no model and a worker loads its own."""

    cfg: ScoreConfig
    emb: object = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "emb": None}

    def __call__(self, name: str, items: list[tuple[str, InputKey]]) -> pa.Table:
        """The shard's vectors rows, in ``items`` order: one length-sorted pass per mode;
        an input that fails keeps a NaN vector and its error (status ``error``)."""
        if self.emb is None:
            self.emb = _load_embedder(self.cfg)
        inputs = [embed_input(k, self.cfg.image_root) for _, k in items]
        images = {p for x in inputs for p in x.images}
        cache = getattr(self.emb, "image_cache", None)
        if cache is not None:  # room for every image of the shard: each decoded once
            cache.max_items = max(cache.max_items, len(images))
        vecs = np.full((len(items), self.emb.hidden_size), np.nan, np.float32)  # [N, H]
        errs: list[str | None] = [None] * len(items)
        for mode in ("direct", "reason"):  # one pass per mode: any engine's embed() serves
            idx = [i for i, (_, k) in enumerate(items) if k[0] == mode]
            got, got_err = embed_sorted(self.emb, [inputs[i] for i in idx], mode,
                                        self.cfg.batch_size, f"{name} {mode}",
                                        self.cfg.progress)  # [n, H]
            if idx:
                vecs[idx] = got.numpy()
            for i, e in zip(idx, got_err, strict=True):
                errs[i] = e
        if cache is not None:
            cache.clear()  # the next shard holds other queries
        return vector_table(items, vecs, errs)


def vector_table(items: list[tuple[str, InputKey]], vecs: np.ndarray,
                 errors: list[str | None]) -> pa.Table:
    """The vectors rows of one shard: ``vecs`` [N, H] as one fixed-size-list buffer."""
    col = vector_array(vecs.astype(np.float32, copy=False))  # fixed_size_list<float32, H>
    return pa.table({"key": [d for d, _ in items], "mode": [k[0] for _, k in items],
                     "vector": col, "status": ["ok" if e is None else "error" for e in errors],
                     "error": errors})


class VectorStore:
    """``<out>/vectors`` read once as an ``[N, H]`` matrix and a digest -> row index."""

    def __init__(self, path: Path):
        table = io.read(path, VECTORS)
        self.rows = {d: i for i, d in enumerate(table.column("key").to_pylist())}
        self.vectors = vector_matrix(table.column("vector"), np.float32)  # [N, H]
        self.errors = table.column("error").to_pylist()
        self._row_of: dict[InputKey, int] = {}  # a pool member is looked up by many pairs

    def row(self, key: InputKey) -> int:
        i = self._row_of.get(key)
        if i is None:
            i = self._row_of[key] = self.rows[key_digest(key)]
        return i

    def get(self, key: InputKey) -> tuple[torch.Tensor, str | None]:
        i = self.row(key)
        return torch.from_numpy(self.vectors[i].copy()), self.errors[i]  # [H]

    def stack(self, keys: list[InputKey]) -> torch.Tensor:
        return torch.from_numpy(self.vectors[[self.row(k) for k in keys]])  # [P, H]


CandKey = tuple[str, str, int]  # (pair_id, teacher_id, cand_idx)


def cand_key(cand: dict) -> CandKey:
    return (cand["pair_id"], cand["teacher_id"], cand["cand_idx"])


@dataclass
class ScoreShard:
    """``run_sharded``'s process for ``<out>/scores``: one block of pairs scored from the
    vectors (read on the first call, so a complete artifact reads none). A target that could
    not be embedded stops the stage, as it would corrupt every pool holding it."""

    cfg: ScoreConfig
    data: ScoreInputs
    path: Path
    store: VectorStore | None = field(default=None, repr=False)

    def load(self) -> VectorStore:
        if self.store is None:
            self.store = VectorStore(self.path)
            check_targets(self.cfg, self.data, self.store)
        return self.store

    def __call__(self, name: str, block: list[dict]) -> list[dict]:
        store = self.load()
        rows = []
        for p in block:
            direct_key, reasoned = pair_inputs(self.data, p)
            pool = store.stack([pool_key(t) for t in self.data.pools[p["pair_id"]]])  # [P, H]
            direct, direct_err = (torch.full((pool.shape[1],), float("nan")), None) \
                if direct_key is None else store.get(direct_key)
            with_rationale = {cand_key(c): store.get(k) for c, k in reasoned}
            rows += pair_rows(self.cfg, p, self.data.candidates(p), direct, direct_err, pool,
                              with_rationale)
        return [{k: r.get(k) for k in SCORES.columns} for r in rows]


def check_targets(cfg: ScoreConfig, data: ScoreInputs, store: VectorStore) -> None:
    """Refuse pools holding a target whose embedding failed, naming it."""
    for target in sorted({t for pool in data.pools.values() for t in pool}):
        _, err = store.get(pool_key(target))
        if err:
            raise ContractError(cfg.pairs, f"target {target} cannot be embedded ({err})",
                                column="pos_text",
                                fix="fix or remove the pair's target (or its image).")


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


def stage_result(cfg: ScoreConfig, data: ScoreInputs, res, out: Path, seconds: float,
                 plan: InputPlan, vec_res=None) -> StageResult:
    """Metrics over the whole artifact (resumed shards included) and the summary;
    ``vec_res`` None: the scores were complete, no vector shard was looked at."""
    table = io.read(out, SCORES)
    deltas = [d for d, s in zip(table.column("delta").to_pylist(),
                                table.column("status").to_pylist(), strict=True) if s == "ok"]
    n, pools = table.num_rows, data.pools
    metrics = {"rows": float(n), "scored": float(len(deltas)),
               "skipped": float(n - len(deltas)), "other_side_rows": float(data.other_side),
               "mean_delta": sum(deltas) / max(1, len(deltas)),
               "share_delta_positive": sum(d > 0 for d in deltas) / max(1, len(deltas)),
               "mean_pool_size": sum(len(v) for v in pools.values()) / max(1, len(pools)),
               "shards_skipped": float(len(res.skipped)), "seconds": seconds,
               "inputs_needed": float(plan.needed), "inputs_embedded": float(plan.distinct),
               "duplicate_share": 1 - plan.distinct / max(1, plan.needed),
               "vector_shards_skipped": float(len(plan.shards) if vec_res is None
                                              else len(vec_res.skipped))}
    summary = (f"score: {len(deltas)} candidates scored, {n - len(deltas)} skipped; mean delta "
               f"{metrics['mean_delta']:+.3f}, {metrics['share_delta_positive']:.0%} positive; "
               f"pools of {metrics['mean_pool_size']:.1f} (tau {cfg.tau}); {plan.distinct} "
               f"distinct inputs of {plan.needed} embedded "
               f"({metrics['duplicate_share']:.0%} duplicates)")
    print(f"[score] {summary}", flush=True)
    return StageResult("score", outputs={"scores": res.ref}, metrics=metrics, summary=summary)


def main(argv: list[str] | None = None) -> None:
    """``python -m mmemb.stages.score``: flags generated from its config class."""
    stage_main("score", run, argv)


if __name__ == "__main__":
    main()
