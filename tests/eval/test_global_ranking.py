"""The harness ranks global tasks through ranking.candidate_rows, without the full matrix:
per query the same metric values (both protocols, hit@1 and ndcg@5), the same official
metrics and the same worst-queries preview as the full [queries, corpus] matrix gives."""

from __future__ import annotations

import numpy as np
import pytest

from mmemb.eval import harness, metrics
from mmemb.eval.harness import Embedded, _rank_and_score
from mmemb.eval.tasks import TaskSpec


def _full_reference(q, c, c_ok, q_ok, gains, metric, protocol, label_keys):
    """What the harness computed before: the full matrix, failed candidates at -inf."""
    kind, _ = metrics.parse_metric(metric)
    sim = q @ c.T  # [Nq, Nc]
    sim[:, ~c_ok] = -np.inf
    rows = list(sim)
    rels = [[i for i, v in g.items() if v > 0] if kind == "hit" else g for g in gains]
    per = metrics.query_scores(rows, rels, metric, protocol, label_keys)
    per[~q_ok] = 0.0
    lists = [list(range(c.shape[0]))] * len(gains)
    off = harness.official_query_metrics(rows, lists, gains, q_ok, label_keys, True)
    return per, off, harness.lowest_queries(per, rows)


def _embedded(v: np.ndarray, ok: np.ndarray) -> Embedded:
    return Embedded([str(i) for i in range(len(v))], v, ok, [])


@pytest.mark.parametrize("seed", range(24))
@pytest.mark.parametrize("protocol", ["strict", "official"])
def test_global_rank_and_score_equals_full_matrix(seed, protocol):
    """Small-integer vectors (many exact ties, the degenerate all-zero query too), graded
    and binary labels, failed candidates and queries, corpora smaller and larger than the
    cut-offs."""
    rng = np.random.default_rng(seed)
    n_q, n_c, h = int(rng.integers(1, 12)), int(rng.integers(1, 60)), int(rng.integers(1, 4))
    q = rng.integers(-1, 2, (n_q, h)).astype(np.float32)
    c = rng.integers(-1, 2, (n_c, h)).astype(np.float32)
    c_ok, q_ok = rng.random(n_c) > 0.2, rng.random(n_q) > 0.1
    metric = "ndcg@5" if seed % 2 else "hit@1"
    gains = []
    for _ in range(n_q):
        lab = rng.choice(n_c, size=int(rng.integers(1, min(n_c, 6) + 1)), replace=False)
        grade = rng.integers(1, 3, lab.size) if metric == "ndcg@5" else np.ones(lab.size)
        gains.append({int(i): float(g) for i, g in zip(lab, grade, strict=True)})
    keys = [[int(i) * 7 for i in g] for g in gains] if protocol == "official" else None
    spec = TaskSpec("t", "visdoc", "RET", metric, "global", suite="s")
    official, lowest = [], []
    per = _rank_and_score(spec, [], gains, _embedded(q, q_ok), _embedded(c, c_ok), protocol,
                          keys, official, lowest)
    ref, ref_off, ref_low = _full_reference(q, c, c_ok, q_ok, gains, metric, protocol, keys)
    np.testing.assert_array_equal(per, ref)
    assert official == ref_off
    assert lowest == ref_low


@pytest.mark.parametrize("metric", ["hit@1", "ndcg@5"])
def test_pessimistic_ties_reach_past_the_stable_top(metric):
    """A degenerate (all-equal) corpus whose first 12 items are the positives: the stable top
    holds only positives, yet strict (pessimistic) ties rank every negative first, a miss.
    The short rows must reach k + (labelled items) deep to see it."""
    q = np.zeros((1, 2), np.float32)
    c = np.ones((40, 2), np.float32)
    gains = [{i: 1.0 for i in range(12)}]
    spec = TaskSpec("t", "visdoc", "RET", metric, "global", suite="s")
    ok_c, ok_q = np.ones(40, bool), np.ones(1, bool)
    per = _rank_and_score(spec, [], gains, _embedded(q, ok_q), _embedded(c, ok_c), "strict")
    ref, _, _ = _full_reference(q, c, ok_c, ok_q, gains, metric, "strict", None)
    assert ref[0] == 0.0
    np.testing.assert_array_equal(per, ref)
