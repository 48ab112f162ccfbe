"""The two scoring protocols at the metric level (issue 15).

``strict`` must equal a standard IR evaluator (``pytrec_eval``, the trec_eval library)
exactly; ``official`` must equal a re-derivation of the official MMEB-V2 scorer
(``RankingMetrics`` of TIGER-AI-Lab/VLM2Vec, ``src/utils/eval_utils/metrics.py``, with
``np.argsort(-scores)`` read as a stable sort). Each quirk of the official scorer has a test
named after it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mmemb.eval.metrics import (
    hit_at_k,
    ndcg_at_k,
    pairing_is_hash_dependent,
    protocol_rules,
    query_scores,
)


def test_protocol_rules():
    assert protocol_rules("strict") == ("pessimistic", "exact")
    assert protocol_rules("official") == ("stable", "official")
    with pytest.raises(ValueError, match="protocol"):
        protocol_rules("loose")


def test_official_ties_stable_positive_first():
    # the positive at index 0 tied with a negative: official (stable) hit, strict miss
    s = np.array([0.5, 0.5, 0.1])
    assert hit_at_k(s, [0], ties="stable") == 1.0
    assert hit_at_k(s, [0], ties="pessimistic") == 0.0
    # index 1 wins a tie with index 2 under the stable order
    s = np.array([0.2, 0.7, 0.7])
    assert hit_at_k(s, [2], ties="stable") == 0.0
    assert hit_at_k(s, [1], ties="stable") == 1.0
    assert hit_at_k(s, [2], ties="pessimistic") == hit_at_k(s, [1], ties="pessimistic") == 0.0
    # a degenerate model (every score tied) scores 100 officially on index-0 positives
    assert hit_at_k(np.zeros(4), [0], ties="stable") == 1.0
    assert hit_at_k(np.zeros(4), [0], ties="pessimistic") == 0.0


def test_official_hit_by_name_duplicate_of_positive():
    # A negative with the positive's name is the same candidate officially (same embedding,
    # so the same score) and counts as relevant: the loader marks it relevant. Strict keeps
    # it a negative tied with the positive: a miss.
    s = np.array([0.4, 0.3, 0.4])  # [pos "cat", "dog", duplicate "cat"]
    assert hit_at_k(s, [0, 2], ties="stable") == 1.0
    assert hit_at_k(s, [0], ties="pessimistic") == 0.0


def test_official_graded_ndcg_set_pairing():
    # labels [3, 10] with grades [1, 2]; ranking 3, 7, 10, 4, 5 (candidate index = doc id)
    scores = np.zeros(11)
    for rank, doc in enumerate([3, 7, 10, 4, 5]):
        scores[doc] = 10 - rank
    gains = {3: 1.0, 10: 2.0}
    strict = ndcg_at_k(scores, gains, 5)
    assert strict == pytest.approx(0.7601875334318685, abs=1e-15)
    # list(set([3, 10])) == [10, 3]: grades re-attached by position, 10 -> 1, 3 -> 2:
    # DCG = 2 + 0 + 1/log2(4) = 2.5, IDCG = 2 + 1/log2(3)
    assert list({3, 10}) == [10, 3]
    official = ndcg_at_k(scores, gains, 5, ties="stable", pairing="official",
                         label_keys=[3, 10])
    assert official == pytest.approx(2.5 / (2 + 1 / math.log2(3)), abs=1e-15)
    assert official == pytest.approx(0.9502344167898356, abs=1e-15)
    # control: the same qrels listed in set order ([10, 3] with grades [2, 1]) -> the grades
    # stay on their labels, no quirk: official equals strict (the correct 0.76019)
    gains2 = {10: 2.0, 3: 1.0}
    assert ndcg_at_k(scores, gains2, 5, ties="stable", pairing="official",
                     label_keys=[10, 3]) == pytest.approx(strict, abs=1e-15)
    assert ndcg_at_k(scores, gains2, 5) == pytest.approx(strict, abs=1e-15)


def test_official_pairing_string_ids_are_hash_dependent():
    assert pairing_is_hash_dependent(["a.png", "b.png"], [1.0, 2.0])
    assert not pairing_is_hash_dependent(["a.png", "b.png"], [1.0, 1.0])
    assert not pairing_is_hash_dependent([3, 10], [1.0, 2.0])


def _rederived_official_ndcg(scores: np.ndarray, labels: list[int], grades: list[float],
                             k: int) -> float:
    """The official formula written out independently: stable order on -score, labels
    replaced by list(set(labels)), grades zipped onto that list, linear DCG / IDCG."""
    order = sorted(range(scores.size), key=lambda i: -scores[i])  # Python sort is stable
    grade = dict(zip(list(set(labels)), grades, strict=True))
    dcg = sum(grade.get(order[i], 0.0) / math.log2(i + 2) for i in range(min(k, len(order))))
    ideal = sorted(grade.values(), reverse=True)[:k]
    return dcg / sum(g / math.log2(i + 2) for i, g in enumerate(ideal))


def _rederived_official_hit(scores: np.ndarray, labels: list[int], k: int) -> float:
    order = sorted(range(scores.size), key=lambda i: -scores[i])
    return float(any(i in labels for i in order[:k]))


def test_official_equals_rederived_formula_random():
    rng = np.random.default_rng(0)
    n_differ = 0
    for _ in range(400):
        n = int(rng.integers(3, 40))
        scores = rng.integers(0, 4, n).astype(np.float64)  # many ties
        n_rel = int(rng.integers(1, min(n, 5) + 1))
        labels = [int(x) for x in rng.choice(n, n_rel, replace=False)]
        grades = [float(g) for g in rng.integers(1, 4, n_rel)]
        gains = dict(zip(labels, grades, strict=True))
        got = query_scores([scores], [gains], "ndcg@5", "official", [labels])[0]
        assert got == pytest.approx(_rederived_official_ndcg(scores, labels, grades, 5),
                                    abs=1e-12)
        hit = query_scores([scores], [labels], "hit@1", "official")[0]
        assert hit == _rederived_official_hit(scores, labels, 1)
        n_differ += got != pytest.approx(query_scores([scores], [gains], "ndcg@5")[0])
    assert n_differ > 0  # the quirks are exercised, not vacuous


def _pytrec(qrels: dict, run: dict, measures: set[str]) -> dict:
    pytrec_eval = pytest.importorskip("pytrec_eval")
    return pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)


def test_strict_equals_pytrec_eval_random_with_ties():
    """Strict ndcg@5 and hit@1 equal trec_eval's ndcg_cut_5 and success_1 on random graded
    qrels with many tied scores. trec_eval breaks ties by docno descending, so each doc is
    named ``f"{9 - gain}{idx:06d}"``: among tied docs the lowest gain has the highest name,
    which is the pessimistic order strict uses. (With other names the two differ on ties:
    that is the point of the strict rule, not a mismatch.)"""
    rng = np.random.default_rng(1)
    qrels, run, ours_ndcg, ours_hit = {}, {}, {}, {}
    for q in range(300):
        n = int(rng.integers(2, 30))
        scores = rng.integers(0, 4, n).astype(np.float64)
        gains = np.zeros(n)
        rel = rng.choice(n, int(rng.integers(1, min(n, 6) + 1)), replace=False)
        gains[rel] = rng.integers(1, 4, rel.size)
        name = [f"{9 - int(gains[i])}{i:06d}" for i in range(n)]
        qid = f"q{q}"
        qrels[qid] = {name[i]: int(gains[i]) for i in range(n) if gains[i] > 0}
        run[qid] = {name[i]: float(scores[i]) for i in range(n)}
        ours_ndcg[qid] = ndcg_at_k(scores, gains, 5)
        ours_hit[qid] = hit_at_k(scores, gains > 0, 1)
    ref = _pytrec(qrels, run, {"ndcg_cut.5", "success.1"})
    for qid in qrels:
        assert ours_ndcg[qid] == pytest.approx(ref[qid]["ndcg_cut_5"], abs=1e-12), qid
        assert ours_hit[qid] == ref[qid]["success_1"], qid


def test_strict_graded_example_equals_pytrec_eval():
    qrels = {"q": {"3": 1, "10": 2}}
    run = {"q": {d: float(10 - r) for r, d in enumerate(["3", "7", "10", "4", "5"])}}
    ref = _pytrec(qrels, run, {"ndcg_cut.5"})["q"]["ndcg_cut_5"]
    assert ref == pytest.approx(0.7601875334318685, abs=1e-12)


def test_partial_mmeb_has_no_overall_nor_partial_modality_means():
    from mmemb.eval.metrics import aggregate
    from mmemb.eval.tasks import select_tasks

    res = [{"task": t.name, "modality": t.modality, "category": t.category,
            "metric": t.metric, "score": 0.5, "suite": t.suite} for t in select_tasks()]
    full = aggregate(res)
    assert full["partial"] is None and full["overall"]["score"] == 0.5
    assert all(g["score"] == 0.5 and "partial" not in g for g in full["modalities"].values())
    video = [r for r in res if r["modality"] == "video"]
    part = aggregate(res[:3] + video)
    assert part["partial"] == "21/78" and part["overall"]["score"] is None
    assert part["modalities"]["image"]["score"] is None
    assert part["modalities"]["image"]["partial"] == "3/36"
    assert part["modalities"]["video"]["score"] == 0.5  # complete: its mean is shown
