"""Ranking metrics for MMEB-style evaluation, and the task-weighted aggregate.

Two protocols (``docs/evaluation.md``): ``strict`` (``ties="pessimistic"``,
``pairing="exact"``, what a standard IR evaluator computes) and ``official`` (``ties="stable"``,
``pairing="official"``, the MMEB-V2 scorer's numbers).

Strict ties are broken pessimistically: among candidates with equal scores, irrelevant (or
lower-gain) ones rank first. A lower-index-first rule would be deterministic too, but MMEB
image tasks put the positive at candidate 0, so a degenerate model (all-zero or constant
embeddings, every score tied) would score hit@1 = 100. Pessimistic ties make such a model
score 0, and a real model loses nothing unless its scores genuinely fail to separate.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from mmemb.eval.tasks import _SUITES, DEFAULT_SUITE

Relevance = int | Iterable[int] | Mapping[int, float] | np.ndarray
Ties = Literal["pessimistic", "stable"]
Pairing = Literal["exact", "official"]
Protocol = Literal["official", "strict"]
PROTOCOLS: tuple[str, ...] = ("official", "strict")


def protocol_rules(protocol: str) -> tuple[Ties, Pairing]:
    """(ties, ndcg pairing) of a protocol: strict = pessimistic + exact, official = stable +
    the official label/grade pairing."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: choose from {PROTOCOLS}")
    return ("stable", "official") if protocol == "official" else ("pessimistic", "exact")


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


def hit_at_k(scores: np.ndarray, relevant: Relevance, k: int = 1,
             ties: Ties = "pessimistic") -> float:
    """1.0 if a relevant candidate is in the top k.

    O(n) instead of a sort, since global tasks rank whole corpora: the best positive (score s)
    is placed after everything scoring above s and, pessimistic, every negative tied at s;
    stable (the official ``np.argsort(-scores)`` read as a stable sort, ``eval.py``), every
    candidate tied at s that comes before the first positive scoring s.
    """
    scores = _check_scores(scores)  # (n,)
    pos = _dense_gains(relevant, scores.size, binary=True) > 0  # (n,) bool
    best = scores[pos].max()
    tied = scores == best  # (n,) bool
    if ties == "stable":
        first = int(np.flatnonzero(pos & tied)[0])
        rank = np.count_nonzero(scores > best) + np.count_nonzero(tied[:first])
    elif ties == "pessimistic":
        rank = np.count_nonzero(scores > best) + np.count_nonzero(~pos & tied)
    else:
        raise ValueError(f"ties={ties!r}: 'pessimistic' or 'stable'")
    return float(rank < k)


def ndcg_at_k(scores: np.ndarray, gains: Relevance, k: int = 5, ties: Ties = "pessimistic",
              pairing: Pairing = "exact", label_keys: Sequence | None = None) -> float:
    """NDCG with linear gains (gain / log2(rank + 2)), as BEIR/pytrec_eval use for visdoc qrels.

    IDCG uses the ideal order of all gains, so a query with more relevant documents than k is
    still normalised to 1 when the top k are all of the highest grade.

    ``pairing="official"`` reproduces ``RankingMetrics.evaluate`` / ``ndcg_at_k`` of the
    official scorer (``src/utils/eval_utils/metrics.py``): the label list is replaced by
    ``list(set(labels))`` while the grades keep their order, so grades are re-attached to
    labels by position after the set reordered them. ``gains`` must then be a mapping in
    label (qrels) order and ``label_keys`` the labels' native ids in that order (ints for
    ViDoRe, whose set order is deterministic). Only DCG changes; IDCG uses the same grades.
    """
    scores = _check_scores(scores)  # (n,)
    g = _dense_gains(gains, scores.size, binary=False)  # (n,)
    if pairing == "official" and label_keys is not None:
        g = _official_pairing(g, gains, label_keys)
    elif pairing not in ("exact", "official"):
        raise ValueError(f"pairing={pairing!r}: 'exact' or 'official'")
    n = scores.size
    # Only candidates scoring at least the k-th best (ties included) can reach the top k.
    kth = np.partition(scores, n - k)[n - k] if n > k else -np.inf
    cand = np.flatnonzero(scores >= kth)  # (>=min(n, k),)
    if ties == "stable":
        top = cand[np.lexsort((cand, -scores[cand]))][:k]  # (<=k,) index order among ties
    elif ties == "pessimistic":
        top = cand[np.lexsort((g[cand], -scores[cand]))][:k]  # (<=k,) pessimistic order
    else:
        raise ValueError(f"ties={ties!r}: 'pessimistic' or 'stable'")
    disc = 1.0 / np.log2(np.arange(2, k + 2))  # (k,)
    dcg = float(g[top] @ disc[: top.size])
    ideal = np.sort(g)[::-1][:k]
    return dcg / float(ideal @ disc[: ideal.size])


def _official_pairing(g: np.ndarray, gains: Relevance, label_keys: Sequence) -> np.ndarray:
    """(n,) gains after the official scorer's ``dict(zip(list(set(labels)), grades))``."""
    if not isinstance(gains, Mapping):
        raise ValueError("pairing='official' needs gains as {index: grade} in label order")
    idx = [int(i) for i in gains]
    grades = [float(v) for v in gains.values()]
    if len(label_keys) != len(idx):
        raise ValueError(f"{len(label_keys)} label keys for {len(idx)} labels")
    where = dict(zip(label_keys, idx, strict=True))
    out = np.zeros_like(g)
    for key, grade in zip(list(set(label_keys)), grades, strict=True):
        out[where[key]] = grade
    return out


def pairing_is_hash_dependent(label_keys: Sequence, grades: Sequence[float]) -> bool:
    """True when the official pairing of these labels depends on ``PYTHONHASHSEED``: string
    ids (their set order is randomised per process) with at least two different grades."""
    return (any(isinstance(x, str) for x in label_keys) and len(set(grades)) > 1)


#: The official per-task score file's metrics and cut-offs, in its key order.
OFFICIAL_METRICS = ("hit", "ndcg_linear", "ndcg_exponential", "precision", "recall", "f1",
                    "map", "mrr")
OFFICIAL_KS = (1, 5, 10)


def stable_top(scores: np.ndarray, k: int) -> np.ndarray:
    """(<=k,) indices of the k best scores, ties in index order (a stable sort), without
    sorting a whole corpus."""
    scores = _check_scores(scores)  # (n,)
    n = scores.size
    kth = np.partition(scores, n - k)[n - k] if n > k else -np.inf
    cand = np.flatnonzero(scores >= kth)  # (>=min(n, k),)
    return cand[np.lexsort((cand, -scores[cand]))][:k]


def official_query_metrics(prediction: Sequence, labels: set, grades: Mapping | None
                           ) -> dict[str, float]:
    """One query's official metrics (``RankingMetrics`` of the official
    ``src/utils/eval_utils/metrics.py``) from its top-10 predicted names, its label names and
    (graded tasks) ``{name: grade}`` as the official pairing attached them. Names repeat in a
    local list with duplicates, as officially; set-based metrics count them once."""
    out: dict[str, float] = {}
    for k in OFFICIAL_KS:
        top = list(prediction[:k])
        hits = len(set(top) & labels)
        p, r = hits / k, hits / len(labels)
        if grades is None:
            rel = [1.0 if x in labels else 0.0 for x in top]
            ideal = [1.0] * min(len(labels), k)
        else:
            rel = [float(grades.get(x, 0.0)) for x in top]
            ideal = sorted((float(g) for g in grades.values()), reverse=True)[:k]
        disc = [1 / math.log2(i + 2) for i in range(k)]
        for form, gain in (("linear", lambda g: g), ("exponential", lambda g: 2 ** g - 1)):
            idcg = sum(gain(g) * d for g, d in zip(ideal, disc, strict=False)) if ideal else 1
            dcg = sum(gain(g) * d for g, d in zip(rel, disc, strict=False))
            out[f"ndcg_{form}@{k}"] = dcg / idcg if idcg > 0 else 0.0
        n_hit, ap, rr = 0, 0.0, 0.0
        for i, x in enumerate(top):
            if x in labels:
                n_hit += 1
                ap += n_hit / (i + 1)
                rr = rr or 1 / (i + 1)
        out.update({f"hit@{k}": float(hits > 0), f"precision@{k}": p, f"recall@{k}": r,
                    f"f1@{k}": 2 * p * r / (p + r) if p + r else 0.0,
                    f"map@{k}": ap / min(len(labels), k) if n_hit else 0.0, f"mrr@{k}": rr})
    return out


def official_score_dict(per_query: Sequence[Mapping[str, float] | None]) -> dict[str, Any]:
    """The official ``<T>_score.json`` body: each metric's mean over the queries (a query
    that could not be embedded, None, counts 0), in the official key order, then
    ``num_pred`` and ``num_data``."""
    keys = [f"{m}@{k}" for m in OFFICIAL_METRICS for k in OFFICIAL_KS]
    n = len(per_query)
    body: dict[str, Any] = {key: float(math.fsum((q or {}).get(key, 0.0) for q in per_query)
                                       / n) if n else 0.0 for key in keys}
    body["num_pred"] = n
    body["num_data"] = n
    return body


def parse_metric(metric: str) -> tuple[str, int]:
    """("hit" | "ndcg", k) of a metric name such as "hit@1"; unknown names raise."""
    m = re.fullmatch(r"(hit|ndcg)@([1-9]\d*)", metric)
    if not m:
        raise ValueError(f"unknown metric {metric!r}; expected hit@k or ndcg@k")
    return m.group(1), int(m.group(2))


def query_scores(
    scores: np.ndarray | Sequence[np.ndarray], relevance: Sequence[Relevance], metric: str,
    protocol: Protocol = "strict", label_keys: Sequence[Sequence | None] | None = None,
) -> np.ndarray:
    """(n_queries,) per-query metric values; kept separate from the mean for bootstrap CIs.

    `scores` is a (n_queries, n_candidates) matrix (global ranking, or local lists of equal
    length) or a list of 1-D arrays (local lists of varying length). `relevance[i]` is, for
    hit@k, a candidate index or indices; for ndcg@k, {index: gain} or a dense gain array.
    """
    kind, k = parse_metric(metric)
    ties, pairing = protocol_rules(protocol)
    if len(scores) != len(relevance):
        raise ValueError(f"{len(scores)} score rows but {len(relevance)} relevance entries")
    if len(scores) == 0:
        raise ValueError("no queries to score")
    out = np.empty(len(scores))
    for i, (row, rel) in enumerate(zip(scores, relevance, strict=True)):
        try:
            if kind == "hit":
                out[i] = hit_at_k(row, rel, k, ties=ties)
            else:
                keys = label_keys[i] if label_keys is not None else None
                out[i] = ndcg_at_k(row, rel, k, ties=ties, pairing=pairing, label_keys=keys)
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
    missing = [t for t in order if t not in table]
    return {
        "suite": suite,
        "tasks": {t: table[t] for t in names},
        "categories": {key: _group("/".join(key), ts, table) for key, ts in cats.items()},
        "modalities": {m: _modality(suite, m, ts, table, registry) for m, ts in mods.items()},
        "overall": _overall(suite, names, table, missing),
        "missing": missing,
        "partial": partial_label(suite, len(names), missing),
    }


def partial_label(suite: str, n_done: int, missing: Sequence[str]) -> str | None:
    """``"N/78"`` for an MMEB-V2 run that did not score every registered task, else None.

    Only the MMEB-V2 registry has a published overall to be mistaken for; the synthetic and
    custom suites keep their overall over the tasks they ran."""
    if suite != DEFAULT_SUITE or not missing:
        return None
    return f"{n_done}/{n_done + len(missing)}"


def _modality(suite: str, modality: str, tasks: list[str], table: dict[str, dict[str, Any]],
              registry) -> dict[str, Any]:
    """A modality's group; for MMEB-V2 its mean only when every registered task of the
    modality ran (else score None and ``partial`` = "k/n"), like the overall."""
    g = _group(modality, tasks, table)
    if suite == DEFAULT_SUITE and registry is not None:
        n_all = sum(1 for spec in registry.values() if spec.modality == modality)
        if len(tasks) < n_all:
            g["score"], g["partial"] = None, f"{len(tasks)}/{n_all}"
    return g


def _overall(suite: str, names: list[str], table: dict[str, dict[str, Any]],
             missing: list[str]) -> dict[str, Any]:
    """The overall group; its score is None for a partial MMEB-V2 run (no silent partial
    average, which ``report_score_v2.py`` of the official code prints)."""
    g = _group("overall", names, table)
    if partial_label(suite, len(names), missing):
        g["score"] = None
    return g
