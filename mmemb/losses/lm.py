"""Next-token cross-entropy on the rationale tokens only: LM(r* | q).

A reasoning-mode sequence is ``<prompt> <think> r_1 .. r_n </think> <emb>``. The targets are
``r_1 .. r_n`` and ``</think>`` (so the model learns to close its reasoning; a rationale
that never closes is what stage 5 penalises as malformed). The gate token ``<think>``
itself is not a target: when to reason is learnt by stage 5, not imitated here.

The LM head is applied only at the positions that predict a target (the hidden state at
j - 1 predicts token j): [N, H] -> [N, V] with N the number of rationale tokens, never
[B, T, V] over the whole padded sequence, which at Qwen's 151k vocabulary would dominate
the step's memory.

Example (V = 3, one rationale token and the closing tag, hand-computed)::

    >>> import torch
    >>> head = torch.nn.Linear(2, 3, bias=False).requires_grad_(False)
    >>> _ = head.weight.data.copy_(torch.tensor([[1., 0.], [0., 1.], [0., 0.]]))
    >>> ids = torch.tensor([[0, 1, 2, 0, 1]])        # think_id=1 at 1, end_think_id=0 at 3
    >>> hid = torch.zeros(1, 5, 2)
    >>> s, n = rationale_lm_loss(hid, ids, head, think_id=1, end_think_id=0)
    >>> n, round(s.item(), 4)                        # 2 targets, each -log(1/3)
    (2, 2.1972)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def rationale_target_mask(input_ids: torch.Tensor, think_id: int,
                          end_think_id: int) -> torch.Tensor:
    """[B, T] bool: True at tokens that are LM targets (after the last ``<think>`` before the
    last ``</think>``, up to and including that ``</think>``). Rows without both: all False."""
    B, T = input_ids.shape
    pos = torch.arange(T, device=input_ids.device).expand(B, T)  # [B, T]
    neg1 = torch.full_like(pos, -1)
    end = torch.where(input_ids == end_think_id, pos, neg1).max(dim=1).values  # [B]
    start = torch.where((input_ids == think_id) & (pos < end[:, None]), pos,
                        neg1).max(dim=1).values  # [B]
    ok = (start >= 0) & (end > start)  # [B]
    return ok[:, None] & (pos > start[:, None]) & (pos <= end[:, None])  # [B, T]


def rationale_lm_loss(hidden: torch.Tensor, input_ids: torch.Tensor,
                      lm_head: Callable[[torch.Tensor], torch.Tensor], think_id: int,
                      end_think_id: int) -> tuple[torch.Tensor, int]:
    """Summed CE over rationale targets and their count: (loss_sum [], N).

    Args:
        hidden: [B, T, H] last-layer hidden states (before the LM head).
        input_ids: [B, T].
        lm_head: maps [N, H] -> [N, V]; called once, on the N gathered positions.

    The sum (not the mean) is returned so a caller that processes a batch in chunks
    (gradient caching) can normalise by the batch's total token count exactly.
    """
    tgt = rationale_target_mask(input_ids, think_id, end_think_id)  # [B, T]
    src = torch.zeros_like(tgt)
    src[:, :-1] = tgt[:, 1:]  # [B, T] hidden at j - 1 predicts token j
    n = int(tgt.sum())
    # With N = 0 the head still runs (on [0, H]) and the sum is 0: every call uses the same
    # modules, which ZeRO-3 needs across ranks (see mmemb.training.module).
    h = hidden[src]  # [N, H]
    logits = lm_head(h).float()  # [N, V]
    return F.cross_entropy(logits, input_ids[tgt], reduction="sum"), n
