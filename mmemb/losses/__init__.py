"""Losses: InfoNCE (global in-batch + hard negatives), rationale LM, the stage-4 objective,
gradient caching, and GRPO (stage 5). One file each."""

from mmemb.losses.gradcache import Chunk, gradcache_step, plain_step
from mmemb.losses.infonce import InfoNCEOutput, info_nce
from mmemb.losses.lm import rationale_lm_loss, rationale_target_mask
from mmemb.losses.objective import ObjectiveOutput, Stage4Objective

__all__ = ["Chunk", "InfoNCEOutput", "ObjectiveOutput", "Stage4Objective", "gradcache_step",
           "info_nce", "plain_step", "rationale_lm_loss", "rationale_target_mask"]
