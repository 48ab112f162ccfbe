"""The stage-4 objective of METHOD.md, with each part kept for logging::

    L = NCE(e(q ⊕ r*), e(t+)) + alpha * NCE(e(q), e(t+)) + lam * LM(r* | q)

``e(q ⊕ r*)`` is the reasoning-mode embedding (``<think> r* </think><emb>``) for rows whose
stage-3 selection kept a rationale; rows with ``r* = ∅`` train in direct mode, so for them
the first term uses ``e(q)`` itself. ``alpha`` keeps the direct embedding good for every
row (adaptive inference embeds the inputs it does not reason on directly); ``lam`` teaches
the model to write the rationales that were selected as helpful. Each NCE is
:func:`~mmemb.losses.infonce.info_nce` over global in-batch negatives plus hard negatives;
the LM part is :func:`~mmemb.losses.lm.rationale_lm_loss` normalised by the batch's
rationale-token count (0 when no row has a rationale).

The contrastive parts depend on the embeddings only, and the LM part on the rationale
forward only; that split is what lets gradient caching (:mod:`mmemb.losses.gradcache`)
compute the NCE gradients on cached embeddings and add the LM gradient in its chunk pass.

Example (no rationales: both NCE terms see the same direct embeddings)::

    >>> import torch
    >>> obj = Stage4Objective(alpha=0.5, lam=1.0, tau=1.0)
    >>> q = torch.eye(2); t = torch.eye(2)
    >>> out = obj.contrastive(q, None, torch.tensor([False, False]), t)
    >>> round(float(out.nce_reason), 4), round(float(out.loss), 4)   # 0.31326 * 1.5
    (0.3133, 0.4699)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmemb.losses.infonce import info_nce


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # [] nce_reason + alpha * nce_direct (+ lam * lm once added)
    nce_reason: torch.Tensor  # [] NCE(e(q ⊕ r*), e(t+)); direct rows use e(q)
    nce_direct: torch.Tensor  # [] NCE(e(q), e(t+))
    acc_reason: torch.Tensor  # [] in-batch top-1 accuracy of the mixed-mode queries
    acc_direct: torch.Tensor  # [] in-batch top-1 accuracy of the direct queries
    n_candidates: int  # targets each query is contrasted against (global batch + K)
    lm: torch.Tensor | None = None  # [] mean rationale-token CE (0 without rationales)
    lm_tokens: int = 0

    def parts(self) -> dict[str, float]:
        f = lambda x: float(x.detach())  # noqa: E731
        out = {"loss": f(self.loss), "loss/nce_reason": f(self.nce_reason),
               "loss/nce_direct": f(self.nce_direct),
               "loss/lm": f(self.lm) if self.lm is not None else 0.0,
               "acc/in_batch_reason": f(self.acc_reason),
               "acc/in_batch_direct": f(self.acc_direct),
               "n_candidates": float(self.n_candidates), "lm_tokens": float(self.lm_tokens)}
        return out


class Stage4Objective:
    """The weighted sum; ``alpha``/``lam``/``tau`` come from :class:`TrainConfig`."""

    def __init__(self, alpha: float = 1.0, lam: float = 0.5, tau: float = 0.02,
                 gather: bool = True):
        self.alpha, self.lam, self.tau, self.gather = alpha, lam, tau, gather

    def contrastive(self, q_direct: torch.Tensor, q_reason: torch.Tensor | None,
                    has_r: torch.Tensor, t: torch.Tensor, *, hard_neg: torch.Tensor | None = None,
                    hard_neg_mask: torch.Tensor | None = None, keys: torch.Tensor | None = None,
                    neg_keys: torch.Tensor | None = None) -> ObjectiveOutput:
        """The two NCE terms.

        Args:
            q_direct: [B, H] direct-mode query embeddings (every row).
            q_reason: [R, H] reasoning-mode embeddings of the R rows where ``has_r``.
            has_r: [B] bool, rows whose selection kept a rationale.
            t: [B, H] positives; hard_neg [B, K, H]; keys/neg_keys as in ``info_nce``.
        """
        has_r = has_r.to(q_direct.device).bool()
        n_r = int(has_r.sum())
        if (q_reason is None and n_r) or (q_reason is not None and q_reason.shape[0] != n_r):
            raise ValueError(f"q_reason has {0 if q_reason is None else q_reason.shape[0]} "
                             f"rows but has_r marks {n_r}")
        q_mixed = q_direct  # [B, H]
        if n_r:
            idx = has_r.nonzero().squeeze(1)  # [R]
            q_mixed = q_direct.index_copy(0, idx, q_reason.to(q_direct.dtype))  # [B, H]
        kw = dict(tau=self.tau, hard_neg=hard_neg, hard_neg_mask=hard_neg_mask, keys=keys,
                  neg_keys=neg_keys, gather=self.gather)
        r = info_nce(q_mixed, t, **kw)
        # Computed even without rationales (then equal to r): every rank must make the same
        # collective calls whatever its rows are.
        d = info_nce(q_direct, t, **kw)
        return ObjectiveOutput(r.loss + self.alpha * d.loss, r.loss, d.loss, r.accuracy,
                               d.accuracy, r.n_candidates)

    def lm_weight(self, lm_tokens: int) -> float:
        """Factor on a summed rationale CE so the chunks add up to ``lam * mean CE``."""
        return self.lam / lm_tokens if lm_tokens else 0.0

    def add_lm(self, out: ObjectiveOutput, lm_sum: torch.Tensor, lm_tokens: int
               ) -> ObjectiveOutput:
        """Add ``lam * LM`` given the summed CE over ``lm_tokens`` rationale tokens."""
        lm = lm_sum / lm_tokens if lm_tokens else lm_sum * 0.0
        out.loss = out.loss + self.lam * lm
        out.lm, out.lm_tokens = lm, lm_tokens
        return out
