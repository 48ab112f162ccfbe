"""Ranking metrics for MMEB-style evaluation, and the task-weighted aggregate.

Ties are broken pessimistically: among candidates with equal scores, irrelevant (or
lower-gain) ones rank first. A lower-index-first rule would be deterministic too, but MMEB
image tasks put the positive at candidate 0, so a degenerate model (all-zero or constant
embeddings, every score tied) would score hit@1 = 100. Pessimistic ties make such a model
score 0, and a real model loses nothing unless its scores genuinely fail to separate.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from mmemb.eval.tasks import _SUITES, DEFAULT_SUITE

Relevance = int | Iterable[int] | Mapping[int, float] | np.ndarray


def _check_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D array, got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return scores


def rank_candidates(scores: np.ndarray, gains: np.ndarray | None = None) -> np.ndarray:
    """Candidate indices best-first; equal scores keep index order, or with `gains`, the
    pessimistic order (lower gain first), which is what the metrics below score."""
    scores = _check_scores(scores)  # (n,)
    if gains is None:
        return np.argsort(-scores, kind="stable")
    # lexsort sorts by the last key first and is stable, so index order breaks remaining ties.
    return np.lexsort((np.asarray(gains, dtype=np.float64), -scores))


def _dense_gains(relevance: Relevance, n: int, binary: bool) -> np.ndarray:
    """(n,) gains from an index, indices, {index: gain}, a bool mask or (ndcg) dense gains."""
    # A dense array is gains for ndcg; for hit only a boolean mask is dense (ints are indices).
    if isinstance(relevance, np.ndarray) and (not binary or relevance.dtype == np.bool_):
        gains = relevance.astype(np.float64)
        if gains.shape != (n,):
            raise ValueError(f"gains shape {gains.shape} does not match {n} candidates")
    else:
        if isinstance(relevance, Mapping):
            items = [(int(i), float(g)) for i, g in relevance.items()]
        elif isinstance(relevance, (int, np.integer)):
            items = [(int(relevance), 1.0)]
        else:
            items = [(int(i), 1.0) for i in np.asarray(list(relevance)).reshape(-1)]
        gains = np.zeros(n)
        for i, g in items:
            if not 0 <= i < n:
                raise ValueError(f"relevant index {i} out of range for {n} candidates")
            gains[i] = g
    if not np.isfinite(gains).all() or (gains < 0).any():
        raise ValueError("gains must be finite and non-negative")
    if not (gains > 0).any():
        raise ValueError("query has no positive (no candidate with gain > 0)")
    return (gains > 0).astype(np.float64) if binary else gains


def hit_at_k(scores: np.ndarray, relevant: Relevance, k: int = 1) -> float:
    """1.0 if a relevant candidate is in the pessimistic top k.

    O(n) instead of a sort, since global tasks rank whole corpora: the best positive (score s)
    is placed after everything scoring above s and every negative tied at s.
    """
    scores = _check_scores(scores)  # (n,)
    pos = _dense_gains(relevant, scores.size, binary=True) > 0  # (n,) bool
    best = scores[pos].max()
    rank = np.count_nonzero(scores > best) + np.count_nonzero(~pos & (scores == best))
    return float(rank < k)


def ndcg_at_k(scores: np.ndarray, gains: Relevance, k: int = 5) -> float:
    """NDCG with linear gains (gain / log2(rank + 2)), as BEIR/pytrec_eval use for visdoc qrels.

    IDCG uses the ideal order of all gains, so a query with more relevant documents than k is
    still normalised to 1 when the top k are all of the highest grade.
    """
    scores = _check_scores(scores)  # (n,)
    g = _dense_gains(gains, scores.size, binary=False)  # (n,)
    n = scores.size
    # Only candidates scoring at least the k-th best (ties included) can reach the top k.
    kth = np.partition(scores, n - k)[n - k] if n > k else -np.inf
    cand = np.flatnonzero(scores >= kth)  # (>=min(n, k),)
    top = cand[np.lexsort((g[cand], -scores[cand]))][:k]  # (<=k,) pessimistic order
    disc = 1.0 / np.log2(np.arange(2, k + 2))  # (k,)
    dcg = float(g[top] @ disc[: top.size])
    ideal = np.sort(g)[::-1][:k]
    return dcg / float(ideal @ disc[: ideal.size])


def parse_metric(metric: str) -> tuple[str, int]:
    """("hit" | "ndcg", k) of a metric name such as "hit@1"; unknown names raise."""
    m = re.fullmatch(r"(hit|ndcg)@([1-9]\d*)", metric)
    if not m:
        raise ValueError(f"unknown metric {metric!r}; expected hit@k or ndcg@k")
    return m.group(1), int(m.group(2))


def query_scores(
    scores: np.ndarray | Sequence[np.ndarray], relevance: Sequence[Relevance], metric: str
) -> np.ndarray:
    """(n_queries,) per-query metric values; kept separate from the mean for bootstrap CIs.

    `scores` is a (n_queries, n_candidates) matrix (global ranking, or local lists of equal
    length) or a list of 1-D arrays (local lists of varying length). `relevance[i]` is, for
    hit@k, a candidate index or indices; for ndcg@k, {index: gain} or a dense gain array.
    """
    kind, k = parse_metric(metric)
    fn = hit_at_k if kind == "hit" else ndcg_at_k
    if len(scores) != len(relevance):
        raise ValueError(f"{len(scores)} score rows but {len(relevance)} relevance entries")
    if len(scores) == 0:
        raise ValueError("no queries to score")
    out = np.empty(len(scores))
    for i, (row, rel) in enumerate(zip(scores, relevance, strict=True)):
        try:
            out[i] = fn(row, rel, k)
        except ValueError as err:
            raise ValueError(f"query {i}: {err}") from None
    return out


def mean_metric(
    scores: np.ndarray | Sequence[np.ndarray], relevance: Sequence[Relevance], metric: str
) -> float:
    """Mean of the per-query metric, in [0, 1]; NaN scores or a query without a positive raise
    with the query index rather than being dropped, since dropping inflates the score."""
    return float(query_scores(scores, relevance, metric).mean())


def _group(name: str, tasks: list[str], table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    metrics = sorted({table[t]["metric"] for t in tasks})
    return {
        "name": name,
        # A mixed label ("hit@1/ndcg@5") says the number is a mean across different metrics.
        "metric": "/".join(metrics),
        "score": math.fsum(table[t]["score"] for t in tasks) / len(tasks),
        "n_tasks": len(tasks),
        "tasks": tasks,
    }


def aggregate(results: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-task, per-(modality, category), per-modality and overall means, scores in [0, 1].

    Overall is the mean over tasks (MMEB-V2's definition), not the mean of modality means,
    which would overweight the 18 video tasks. Results must come from one suite: mixing the
    synthetic benchmark into an MMEB overall would make it incomparable with published numbers.
    Tasks of a registered suite that are absent are listed under "missing" so a partial run is
    never mistaken for a full one.
    """
    results = list(results)
    if not results:
        raise ValueError("no results to aggregate")
    suite_names = {r.get("suite", DEFAULT_SUITE) for r in results}
    if len(suite_names) != 1:
        raise ValueError(f"results mix suites {sorted(suite_names)}; aggregate one at a time")
    (suite,) = suite_names
    registry = _SUITES.get(suite)
    table: dict[str, dict[str, Any]] = {}
    for r in results:
        name, score = r["task"], float(r["score"])
        if name in table:
            raise ValueError(f"duplicate result for task {name!r}")
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"task {name!r}: score {score} not in [0, 1] (pass fractions)")
        entry = {k: r[k] for k in ("modality", "category", "metric")}
        if registry is not None:
            if name not in registry:
                raise ValueError(f"task {name!r} is not in suite {suite!r}")
            spec = registry[name]
            expected = {"modality": spec.modality, "category": spec.category, "metric": spec.metric}
            if entry != expected:
                raise ValueError(f"task {name!r}: result says {entry}, registry says {expected}")
        table[name] = {**entry, "score": score}
    order = list(registry) if registry is not None else list(table)
    names = [t for t in order if t in table]
    cats: dict[tuple[str, str], list[str]] = {}
    mods: dict[str, list[str]] = {}
    for t in names:
        cats.setdefault((table[t]["modality"], table[t]["category"]), []).append(t)
        mods.setdefault(table[t]["modality"], []).append(t)
    return {
        "suite": suite,
        "tasks": {t: table[t] for t in names},
        "categories": {key: _group("/".join(key), ts, table) for key, ts in cats.items()},
        "modalities": {m: _group(m, ts, table) for m, ts in mods.items()},
        "overall": _group("overall", names, table),
        "missing": [t for t in order if t not in table],
    }
