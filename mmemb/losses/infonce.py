"""InfoNCE with temperature over global in-batch negatives, plus per-query hard negatives.

For local query i (of B on this rank) the candidates are every rank's positives
(``W * B`` columns, gathered with :func:`~mmemb.training.distributed.gather_with_grad`)
followed by its own K hard negatives (extra columns)::

    logits[i] = [ q_i . t_j / tau  for j in 0..W*B-1 ]  ++  [ q_i . n_ik / tau for k < K ]
    loss      = mean_i  CE(logits[i], label_i),   label_i = rank * B + i

Candidates equal to the positive (same ``keys``: the same target text/image in another row,
common when a task has few distinct answers) are masked out, so a duplicate of the
positive is never pushed away as a negative. Embeddings are expected L2-normalised
(cosine similarity); ``tau`` defaults to 0.02 (METHOD.md).

Example (hand-checkable: two orthogonal pairs, tau = 1)::

    >>> import torch
    >>> q = torch.eye(2); t = torch.eye(2)
    >>> out = info_nce(q, t, tau=1.0)
    >>> round(float(out.loss), 4)    # -log(e / (e + 1))
    0.3133
    >>> float(out.accuracy)
    1.0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmemb.training.distributed import gather_nograd, gather_with_grad, rank


@dataclass
class InfoNCEOutput:
    loss: torch.Tensor  # [] mean over local queries
    accuracy: torch.Tensor  # [] share of local queries whose positive scores highest
    logits: torch.Tensor  # [B, W*B + K] (masked entries = -inf)
    labels: torch.Tensor  # [B] column of each query's positive
    n_candidates: int  # W*B + K: how many targets each query is contrasted against


def info_nce(q: torch.Tensor, t: torch.Tensor, *, tau: float = 0.02,
             hard_neg: torch.Tensor | None = None, hard_neg_mask: torch.Tensor | None = None,
             keys: torch.Tensor | None = None, neg_keys: torch.Tensor | None = None,
             gather: bool = True) -> InfoNCEOutput:
    """InfoNCE of local queries against global positives and own hard negatives.

    Args:
        q: [B, H] local query embeddings.
        t: [B, H] local positive embeddings (row i is query i's positive).
        hard_neg: [B, K, H] per-query hard negatives (optional).
        hard_neg_mask: [B, K] bool, True where a hard negative exists (rows may have fewer).
        keys: [B] int64 content ids of the positives; equal keys = the same target, masked
            as negatives.
        neg_keys: [B, K] int64 content ids of the hard negatives (masked if equal to the
            query's positive key).
        gather: gather positives over ranks (global in-batch negatives).
    """
    if q.shape != t.shape or q.dim() != 2:
        raise ValueError(f"q {tuple(q.shape)} and t {tuple(t.shape)} must both be [B, H]")
    B = q.shape[0]
    t_all = gather_with_grad(t) if gather else t  # [W*B, H]
    offset = rank() * B if gather else 0
    labels = torch.arange(B, device=q.device) + offset  # [B]
    logits = (q @ t_all.T) / tau  # [B, W*B]
    mask = torch.zeros_like(logits, dtype=torch.bool)  # [B, W*B] True = not a candidate
    if keys is not None:
        k_all = gather_nograd(keys) if gather else keys  # [W*B]
        mask = k_all[None, :] == keys[:, None]  # [B, W*B] same target as the positive
        mask[torch.arange(B, device=q.device), labels] = False
    n_cand = t_all.shape[0]
    if hard_neg is not None and hard_neg.shape[1] > 0:
        n_logits = torch.einsum("bh,bkh->bk", q, hard_neg) / tau  # [B, K]
        n_mask = torch.zeros_like(n_logits, dtype=torch.bool)  # [B, K]
        if hard_neg_mask is not None:
            n_mask |= ~hard_neg_mask.bool()
        if neg_keys is not None and keys is not None:
            n_mask |= neg_keys == keys[:, None]
        logits = torch.cat([logits, n_logits], dim=1)  # [B, W*B + K]
        mask = torch.cat([mask, n_mask], dim=1)
        n_cand += hard_neg.shape[1]
    logits = logits.masked_fill(mask, float("-inf"))
    loss = F.cross_entropy(logits.float(), labels)
    with torch.no_grad():
        pos = logits.gather(1, labels[:, None])  # [B, 1]
        # Pessimistic: a tie with a negative counts as a miss (as the eval metrics do).
        others = logits.clone()
        others[torch.arange(B, device=q.device), labels] = float("-inf")
        acc = (pos.squeeze(1) > others.max(dim=1).values).float().mean()
    return InfoNCEOutput(loss, acc, logits, labels, n_cand)
