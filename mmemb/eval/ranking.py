"""Global ranking in bounded memory: chunked matmul with a running top-k.

Why: a globally ranked task (a retrieval corpus of up to ~10^5 documents) scored through a
full ``[queries, candidates]`` similarity matrix needs ``Q x C x 4`` bytes at once (10^4 x
10^5 queries/documents: 4 GB). :func:`topk` walks the matrix in ``[chunk, chunk]`` blocks
and keeps only each query's best ``k`` so far, so its memory is ``O(chunk^2 + Q k)``
whatever the corpus size, and its result equals the full matrix's.

Order (the tie rule): higher score first; equal scores in candidate-index order, the order
a stable ``np.argsort(-scores)`` of the full row gives, which is how the harness reads the
official MMEB-V2 scorer's ``np.argsort(-scores)`` (``metrics.stable_top``). To select that
order exactly in one vectorised ``np.partition`` (which alone would cut ties at the k-th
score arbitrarily), each block's float32 score and its candidate index are packed into one
``uint64`` key, ordered by score and then by index, so no two keys tie and the k largest
keys are the k best candidates, ties included. Scores are float32, as the full path's
``q @ c.T``; the blocks of one query range compute the same products as the full matmul.

    >>> s, i = topk(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), k=1)
    >>> i.tolist()
    [[0], [1]]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

#: Rows of queries and of candidates per block: a [1024, 1024] block is 4 MB of float32
#: scores and 8 MB of sort keys (about 40 MB with the temporaries), whatever the corpus size.
DEFAULT_CHUNK = 1024

_SIGN = np.uint32(0x80000000)
_LOW = np.uint64(0xFFFFFFFF)


def _order_keys(scores: np.ndarray, first: int) -> np.ndarray:
    """[Qc, Cc] uint64 keys, larger = better: the score's bits made monotone (sign bit set
    for positives, every bit flipped for negatives) in the high word, the complement of the
    candidate index (``first`` + column) in the low word, so equal scores rank the lower
    index first. ``-0.0`` is made ``+0.0`` first (they compare equal as floats)."""
    bits = (scores + np.float32(0.0)).view(np.uint32)  # [Qc, Cc]
    mono = np.where(bits & _SIGN, ~bits, bits | _SIGN).astype(np.uint64)  # [Qc, Cc]
    idx = np.arange(first, first + scores.shape[1], dtype=np.uint64)  # [Cc]
    return (mono << np.uint64(32)) | (_LOW - idx)  # [Qc, Cc]


def _decode(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float32 scores, int64 indices) of keys made by :func:`_order_keys`."""
    mono = (keys >> np.uint64(32)).astype(np.uint32)  # [Q, k]
    bits = np.where(mono & _SIGN, mono ^ _SIGN, ~mono)  # [Q, k]
    idx = (_LOW - (keys & _LOW)).astype(np.int64)  # [Q, k]
    return bits.view(np.float32), idx


def _blocks(n: int, chunk: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of at most ``chunk`` rows, of near-equal sizes: no tiny last
    block, since BLAS takes other kernels for tiny matrices (whose float32 sums can differ
    in the last bits from the full matmul's, which would move near-ties)."""
    n_blocks = max(1, -(-n // chunk))
    size = -(-n // n_blocks)
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _as_f32(x: np.ndarray) -> np.ndarray:
    """float32 [n, H] (float16 stores are widened here: scores are computed in float32)."""
    return np.ascontiguousarray(x, dtype=np.float32)


def topk(queries: np.ndarray, cands: np.ndarray, k: int, chunk: int = DEFAULT_CHUNK, *,
         valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``k`` best candidates by dot product, best first.

    ``queries`` [Q, H] and ``cands`` [C, H] (float32 or float16; L2-normalised rows give
    cosine). Returns (scores [Q, k'] float32, indices [Q, k'] int64) with ``k' = min(k, C)``,
    equal to ``stable argsort(-(queries @ cands.T))[:, :k]`` (ties: lower index first)
    without holding more than a ``[chunk, chunk]`` block of it. ``valid`` [C] bool: the
    candidates that may be ranked; the others score ``-inf`` (a failed embedding), as the
    full path masks them. NaN scores raise.
    """
    if k < 0 or chunk < 1:
        raise ValueError(f"k={k} must be >= 0 and chunk={chunk} >= 1")
    q, c = np.asarray(queries), np.asarray(cands)
    if q.ndim != 2 or c.ndim != 2 or q.shape[1] != c.shape[1]:
        raise ValueError(f"queries {q.shape} and cands {c.shape} must be [Q, H] and [C, H]")
    n_q, n_c = q.shape[0], c.shape[0]
    kk = min(k, n_c)
    if kk == 0 or n_q == 0:
        return np.zeros((n_q, kk), np.float32), np.zeros((n_q, kk), np.int64)
    mask = None if valid is None else ~np.asarray(valid, dtype=bool)  # [C] True = masked
    if mask is not None and mask.shape != (n_c,):
        raise ValueError(f"valid has shape {mask.shape}, expected ({n_c},)")
    out = np.empty((n_q, kk), np.uint64)  # [Q, k'] best keys, unordered until the end
    for q0, q1 in _blocks(n_q, chunk):
        qb = _as_f32(q[q0:q1])  # [Qc, H]
        best = None  # [Qc, <=k'] running best keys
        for c0, c1 in _blocks(n_c, chunk):
            s = qb @ _as_f32(c[c0:c1]).T  # [Qc, Cc]
            if np.isnan(s).any():
                raise ValueError("similarity scores contain NaN (a NaN embedding?)")
            if mask is not None:
                s[:, mask[c0:c1]] = -np.inf
            keys = _order_keys(s, c0)  # [Qc, Cc]
            pool = keys if best is None else np.concatenate([best, keys], axis=1)
            if pool.shape[1] > kk:
                pool = np.partition(pool, pool.shape[1] - kk, axis=1)[:, -kk:]  # [Qc, k']
            best = pool
        out[q0:q1] = best
    return _decode(np.ascontiguousarray(np.sort(out, axis=1)[:, ::-1]))  # [Q, k'] best first


def candidate_rows(queries: np.ndarray, cands: np.ndarray, labelled: Sequence[Iterable[int]],
                   k: int, chunk: int = DEFAULT_CHUNK, *, valid: np.ndarray | None = None
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query (corpus indices [n] ascending, their scores [n]): a short score row that
    every metric at cut-off ``k`` scores exactly as it scores the full row.

    The row holds the query's ``k + p`` best candidates (``p``: the most labelled items of
    any query) and its labelled items (``labelled[q]``, positives and graded items), those
    outside the best with score ``-inf``. Why that is exact: a metric at cut-off ``k``
    reads only the first ``k`` of the row's order and the labels' gains. In the stable
    order (score, then index) the first ``k`` of the full row are among its ``k`` best; in
    the pessimistic order (score, then lower gain, then index) a candidate is preceded by
    at most ``p`` more candidates than in the stable order, so its first ``k`` are among the
    ``k + p`` best. Keeping those with their scores and their index order keeps the first
    ``k`` of either order; a labelled item outside them ranks after all of them in both the
    full row and this one (with a real score below theirs, or a failed one at ``-inf``).
    """
    labelled = [sorted(set(int(i) for i in lab)) for lab in labelled]
    if len(labelled) != len(queries):
        raise ValueError(f"{len(labelled)} label lists for {len(queries)} queries")
    extra = max((len(lab) for lab in labelled), default=0)
    scores, idx = topk(queries, cands, k + extra, chunk, valid=valid)  # [Q, k'], [Q, k']
    out = []
    for q, lab in enumerate(labelled):
        outside = np.setdiff1d(np.asarray(lab, dtype=np.int64), idx[q])  # [m]
        keep = np.concatenate([idx[q], outside])  # [k' + m]
        val = np.concatenate([scores[q], np.full(outside.size, -np.inf, np.float32)])
        order = np.argsort(keep, kind="stable")  # index order: what stable ties read
        out.append((keep[order], val[order]))
    return out
