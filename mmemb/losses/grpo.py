"""GRPO: group-relative advantages and the clipped surrogate with a KL penalty.

For one query, G rollouts get rewards ``R``; each rollout's advantage is its reward
relative to its own group: ``A = (R - mean(R)) / (std(R) + eps)``. No value network is
needed, which matters here because the "value" of reasoning depends on the pair, not on a
state a critic could learn cheaply.

Per generated token t of a rollout (the gate token, then the rationale tokens)::

    ratio_t = exp(logp_t - logp_old_t)
    surr_t  = min(ratio_t * A, clip(ratio_t, 1 - eps_lo, 1 + eps_hi) * A)
    kl_t    = exp(logp_ref_t - logp_t) - (logp_ref_t - logp_t) - 1      # k3, >= 0
    loss    = -mean_over_tokens(surr_t - beta * kl_t)

Example::

    >>> import torch
    >>> r = torch.tensor([[1.0, 0.0, 0.0, 1.0]])                   # [Q=1, G=4]
    >>> group_advantages(r).round(decimals=4)
    tensor([[ 0.8659, -0.8659, -0.8659,  0.8659]])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4,
                     scale: bool = True) -> torch.Tensor:
    """``(R - group mean) / (group std + eps)`` per row: [Q, G] -> [Q, G].

    The std is the unbiased sample std (as in DeepSeekMath's GRPO). A group whose rewards
    are all equal gets zero advantages: it carries no signal about which action is better.
    """
    mean = rewards.mean(dim=1, keepdim=True)  # [Q, 1]
    centred = rewards - mean  # [Q, G]
    if not scale:
        return centred
    std = rewards.std(dim=1, keepdim=True, unbiased=True)  # [Q, 1]
    return centred / (std + eps)


@dataclass
class GRPOLossOutput:
    loss: torch.Tensor  # scalar
    kl: torch.Tensor  # scalar, mean k3 KL per token
    clip_fraction: torch.Tensor  # scalar, share of tokens whose ratio was clipped
    ratio_mean: torch.Tensor


def grpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor,
              advantages: torch.Tensor, mask: torch.Tensor, *, beta: float = 0.04,
              eps_low: float = 0.2, eps_high: float = 0.2,
              aggregation: Literal["sequence", "token"] = "sequence") -> GRPOLossOutput:
    """The clipped GRPO objective over generated tokens.

    Args:
        logp, logp_old, logp_ref: [N, T] log-probs of the sampled tokens under the current,
            the sampling-time and the reference policy (N rollouts, T tokens, padded).
        advantages: [N] one advantage per rollout, broadcast over its tokens.
        mask: [N, T] 1 for real generated tokens, 0 for padding.
        aggregation: ``sequence`` averages tokens within a rollout, then rollouts (GRPO's
            original form, every rollout weighs the same whatever its length); ``token``
            averages over all tokens (long rationales weigh more).
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - logp_old)  # [N, T]
    adv = advantages.unsqueeze(1)  # [N, 1]
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    surr = torch.minimum(ratio * adv, clipped * adv)  # [N, T]
    d = logp_ref - logp
    kl = torch.exp(d) - d - 1  # [N, T]
    per_tok = -(surr - beta * kl)  # [N, T]
    n_tok = mask.sum(dim=1).clamp(min=1)  # [N]
    if aggregation == "sequence":
        loss = ((per_tok * mask).sum(dim=1) / n_tok).mean()
    elif aggregation == "token":
        loss = (per_tok * mask).sum() / mask.sum().clamp(min=1)
    else:
        raise ValueError(f"aggregation={aggregation!r}: choose 'sequence' or 'token'")
    total = mask.sum().clamp(min=1)
    is_clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    return GRPOLossOutput(
        loss=loss,
        kl=(kl * mask).sum().detach() / total,
        clip_fraction=(is_clipped.to(mask.dtype) * mask).sum().detach() / total,
        ratio_mean=(ratio * mask).sum().detach() / total,
    )
