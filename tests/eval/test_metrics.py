import math

import numpy as np
import pytest

from mmemb.eval.metrics import (
    aggregate,
    hit_at_k,
    mean_metric,
    ndcg_at_k,
    query_scores,
    rank_candidates,
)
from mmemb.eval.tasks import select_tasks


def test_rank_candidates_stable_and_pessimistic():
    s = np.array([0.1, 0.5, 0.5])
    assert rank_candidates(s).tolist() == [1, 2, 0]
    assert rank_candidates(s, gains=np.array([0, 1, 0])).tolist() == [2, 1, 0]


def test_hit_at_1_basic_and_ties():
    assert hit_at_k(np.array([0.9, 0.5, 0.1]), {0}) == 1.0
    assert hit_at_k(np.array([0.4, 0.5, 0.1]), 0) == 0.0
    # Positive tied with a negative at the top: pessimistic, no hit.
    assert hit_at_k(np.array([0.5, 0.5, 0.1]), {0}) == 0.0
    # Degenerate constant embeddings must not score 100 even though the positive is index 0.
    assert hit_at_k(np.zeros(4), [0]) == 0.0


def test_hit_several_relevant_and_k():
    s = np.array([0.2, 0.9, 0.9, 0.1])
    assert hit_at_k(s, {1, 2}) == 1.0  # tie among positives only
    assert hit_at_k(s, {2, 3}) == 0.0  # best positive (2) tied with negative 1
    assert hit_at_k(s, np.array([2]), k=2) == 1.0  # rank 1 after the tied negative
    assert hit_at_k(s, np.array([False, False, True, True])) == 0.0  # bool mask
    assert hit_at_k(s, {0: 1.0, 1: 0.0}, k=2) == 0.0  # mapping: gain 0 is not a positive


def test_ndcg_graded():
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    g = np.array([0, 2, 0, 1, 0, 3])
    # top5 = idx 0..4, gains 0,2,0,1,0: DCG = 2/log2(3) + 1/log2(5) = 1.26186 + 0.43068 = 1.69254
    # ideal gains 3,2,1,0,0: IDCG = 3/1 + 2/log2(3) + 1/log2(4) = 3 + 1.26186 + 0.5 = 4.76186
    # NDCG@5 = 1.69254 / 4.76186 = 0.35544
    assert ndcg_at_k(s, g) == pytest.approx(0.35544, abs=1e-5)
    assert ndcg_at_k(s, {1: 2, 3: 1, 5: 3}) == pytest.approx(0.35544, abs=1e-5)
    assert ndcg_at_k(s[::-1], g[::-1]) == pytest.approx(0.35544, abs=1e-5)
    assert ndcg_at_k(np.array([0.1, 0.9, 0.3]), np.array([0, 1, 0])) == 1.0


def test_ndcg_fewer_than_k_candidates():
    # order idx1 (0), idx2 (1), idx0 (1): DCG = 1/log2(3) + 1/log2(4) = 0.63093 + 0.5 = 1.13093
    # IDCG = 1 + 1/log2(3) = 1.63093 -> 0.69343
    assert ndcg_at_k(np.array([0.1, 0.5, 0.3]), np.array([1, 0, 1])) == pytest.approx(
        0.69343, abs=1e-5
    )


def test_ndcg_ties_pessimistic():
    # the irrelevant tied candidate goes first: DCG = 1/log2(3) = 0.63093, IDCG = 1
    assert ndcg_at_k(np.array([0.5, 0.5, 0.1]), np.array([1, 0, 0])) == pytest.approx(
        1 / math.log2(3)
    )
    # ties at the k-th place in a larger list are included in the candidate pool
    s = np.array([0.9, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2])
    g = np.array([0, 0, 0, 0, 0, 0, 1])
    assert ndcg_at_k(s, g) == 0.0


def test_no_positive_raises():
    with pytest.raises(ValueError, match="query has no positive"):
        ndcg_at_k(np.array([0.1, 0.2]), np.zeros(2))
    with pytest.raises(ValueError, match="query has no positive"):
        hit_at_k(np.array([0.1, 0.2]), set())
    with pytest.raises(ValueError, match="out of range"):
        hit_at_k(np.array([0.1, 0.2]), {5})


def test_mean_metric_matrix_and_lists():
    m = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    assert mean_metric(m, [0, 0, 0], "hit@1") == pytest.approx(1 / 3)
    ragged = [np.array([0.9, 0.1, 0.0]), np.array([0.2, 0.8])]
    assert mean_metric(ragged, [0, {1}], "hit@1") == 1.0
    corpus = np.array([[0.1, 0.5, 0.3], [0.9, 0.8, 0.7]])
    per_q = query_scores(corpus, [{0: 1, 2: 1}, {0: 1}], "ndcg@5")
    assert per_q == pytest.approx([0.69343, 1.0], abs=1e-5)


def test_mean_metric_errors_name_query():
    m = np.array([[0.9, 0.1], [np.nan, 0.8]])
    with pytest.raises(ValueError, match="query 1: scores contain NaN"):
        mean_metric(m, [0, 0], "hit@1")
    with pytest.raises(ValueError, match="query 0: query has no positive"):
        mean_metric(np.ones((1, 3)), [np.zeros(3)], "ndcg@5")
    with pytest.raises(ValueError, match="unknown metric"):
        mean_metric(np.ones((1, 3)), [0], "map@5")


def _full_results():
    value = {"image": 0.649, "video": 0.346, "visdoc": 0.692}
    return [
        {
            "task": s.name,
            "modality": s.modality,
            "category": s.category,
            "metric": s.metric,
            "score": value[s.modality],
            "suite": s.suite,
        }
        for s in select_tasks()
    ]


def test_aggregate_overall_is_task_weighted():
    agg = aggregate(_full_results())
    # (64.9*36 + 34.6*18 + 69.2*24) / 78 = 46.2 / 78 * 100 = 59.23; modality-mean would be 56.2
    assert round(100 * agg["overall"]["score"], 1) == 59.2
    assert agg["overall"]["n_tasks"] == 78 and agg["overall"]["metric"] == "hit@1/ndcg@5"
    assert agg["modalities"]["video"]["score"] == pytest.approx(0.346)
    assert agg["modalities"]["visdoc"]["metric"] == "ndcg@5"
    assert agg["categories"][("image", "RET")]["n_tasks"] == 12
    assert agg["categories"][("video", "CLS")]["metric"] == "hit@1"
    assert agg["missing"] == [] and len(agg["tasks"]) == 78


def test_aggregate_partial_and_validation():
    res = _full_results()
    agg = aggregate(res[:3])
    assert len(agg["missing"]) == 75
    bad = dict(res[40], metric="ndcg@5")
    with pytest.raises(ValueError, match="registry says"):
        aggregate([bad])
    with pytest.raises(ValueError, match="duplicate"):
        aggregate([res[0], res[0]])
    with pytest.raises(ValueError, match="mix suites"):
        aggregate([res[0], dict(res[1], suite="synthetic")])
    with pytest.raises(ValueError, match="not in"):
        aggregate([dict(res[0], score=64.9)])
    other = aggregate(
        [
            {
                "task": "a",
                "modality": "image",
                "category": "X",
                "metric": "hit@1",
                "score": 0.5,
                "suite": "unregistered",
            }
        ]
    )
    assert other["overall"]["score"] == 0.5 and other["missing"] == []
