"""mmemb.eval.ranking.topk equals the full-matrix ranking (stable argsort of q @ c.T)."""

from __future__ import annotations

import numpy as np
import pytest

from mmemb.eval import metrics
from mmemb.eval.ranking import topk


def _full(q: np.ndarray, c: np.ndarray, k: int, valid=None) -> tuple[np.ndarray, np.ndarray]:
    sim = q.astype(np.float32) @ c.astype(np.float32).T  # [Q, C]
    if valid is not None:
        sim[:, ~valid] = -np.inf
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]  # ties: lower index first
    return np.take_along_axis(sim, idx, 1), idx


@pytest.mark.parametrize("seed", range(40))
def test_topk_equals_full_matrix_with_ties_masks_and_small_chunks(seed):
    """Small-integer vectors make many exact ties (and exact products whatever the chunking),
    so the index order among ties is checked, with k from 0 to beyond C."""
    rng = np.random.default_rng(seed)
    n_q, n_c, h = (int(x) for x in rng.integers(1, 30, 3))
    q = rng.integers(-2, 3, (n_q, h)).astype(np.float32)
    c = rng.integers(-2, 3, (n_c, h)).astype(np.float32)
    k, chunk = int(rng.integers(0, 40)), int(rng.integers(1, 12))
    valid = rng.random(n_c) > 0.25
    s, i = topk(q, c, k, chunk, valid=valid)
    rs, ri = _full(q, c, k, valid)
    assert s.shape == i.shape == (n_q, min(k, n_c))
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_array_equal(s, rs)


def test_topk_random_floats_at_default_chunk_and_across_blocks():
    """Real-valued unit vectors (with duplicated candidates: exact ties) over several blocks:
    indices equal and scores allclose to the full matrix; the stable top of each row is
    what metrics.stable_top (the official tie rule) picks."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((300, 64)).astype(np.float32)
    c = rng.standard_normal((1000, 64)).astype(np.float32)
    c[[500, 999]] = c[3]  # three equal candidates
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    rs, ri = _full(q, c, 20)
    for chunk in (128, 1024):
        s, i = topk(q, c, 20, chunk)
        np.testing.assert_array_equal(i, ri)
        np.testing.assert_allclose(s, rs, rtol=0, atol=1e-6)
    full = q @ c.T
    for row in (0, 17, 299):
        np.testing.assert_array_equal(i[row, :10], metrics.stable_top(full[row], 10))


def test_topk_edge_cases():
    q = np.array([[1.0, 0.0], [0.0, 0.0]], np.float32)
    c = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]], np.float32)
    s, i = topk(q, c, k=10)  # k > C: every candidate, ranked
    assert i.tolist() == [[1, 2, 0], [0, 1, 2]]  # the zero query ties all: index order
    assert s.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    assert topk(q, c, 0)[1].shape == (2, 0)
    assert topk(np.zeros((0, 2), np.float32), c, 3)[1].shape == (0, 3)
    assert topk(q, np.zeros((0, 2), np.float32), 3)[1].shape == (2, 0)
    s16, i16 = topk(q.astype(np.float16), c.astype(np.float16), 2)  # float16 stores
    assert s16.dtype == np.float32 and i16.tolist() == [[1, 2], [0, 1]]
    neg = np.array([[-1.0, 0.0]], np.float32)  # negative scores and -0.0 == +0.0
    assert topk(neg, c, 3)[1].tolist() == [[0, 1, 2]]
    with pytest.raises(ValueError, match="NaN"):
        topk(np.array([[np.nan, 0.0]], np.float32), c, 1)
    with pytest.raises(ValueError, match=r"\[Q, H\]"):
        topk(q, np.zeros((3, 5), np.float32), 1)
