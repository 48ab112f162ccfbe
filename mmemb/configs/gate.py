"""Stage 5 config: GRPO training of the reasoning gate.

Used by ``python -m mmemb.stages.gate --config configs/demo.yaml --section gate``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mmemb.configs.base import ImageResolution, StageConfig, report_field


class RewardConfig(StageConfig):
    """Reward = w_hit * hit@1 + w_margin * margin - lambda_cost * tokens / budget + format.

    ``margin`` is cos(positive) - max cos(negatives) of the rollout's embedding, in [-2, 2]:
    it keeps a gradient of preference when hit@1 ties inside a group. ``lambda_cost``
    prices reasoning: at 0.2 a full-budget rationale must buy at least a 0.2 gain in the
    retrieval reward to be worth it.
    """

    w_hit: float = Field(1.0, description="weight of hit@1 in the reward")
    w_margin: float = Field(1.0, description="weight of the cosine margin in the reward")
    lambda_cost: float = Field(0.2, ge=0, description="price of reasoning per budget's worth "
                               "of tokens")
    format_penalty: float = Field(0.5, ge=0, description="subtracted when a rationale "
                                  "never closes </think>")
    pool_size: int = Field(8, ge=2, description="positive + negatives from the same task")


class GateConfig(ImageResolution):
    """GRPO over the first assistant token (<think> or <emb>) and the rationale after it."""

    model: str = Field(..., description="stage-4 checkpoint (the policy's start)")
    data: str = Field(..., description="selections or pairs artifact (queries + positives)")
    image_root: str | None = Field(None, description="folder image paths are relative to")
    eval: str | None = report_field(None, description="eval rows, for the per-family gate "
                                   "report")
    out: str = report_field("runs/gate", description="stage folder: the policy, the gate "
                            "report")

    steps: int = Field(60, ge=1, description="GRPO steps (rollout batches)")
    queries_per_step: int = Field(16, ge=1, description="queries per rollout batch")
    group_size: int = Field(4, ge=2, description="G rollouts per query")
    num_iterations: int = Field(1, ge=1, description="policy updates per rollout batch")
    budget: int = Field(48, ge=1, description="max reasoning tokens per rollout")
    temperature: float = Field(0.7, gt=0, description="rationale sampling temperature (0.7: "
                               "on the demo, reward 0.57 -> 0.66 vs 0.43 -> 0.54 at 1.0)")
    lr: float = Field(5e-4, gt=0, description="tiny-model default; real 2-8B: ~1e-6")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up, then constant")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    beta: float = Field(0.1, ge=0, description="KL weight to the frozen reference")
    eps_low: float = Field(0.2, gt=0, description="PPO clip below: ratio >= 1 - eps_low")
    eps_high: float = Field(0.2, gt=0, description="PPO clip above: ratio <= 1 + eps_high")
    aggregation: Literal["sequence", "token"] = Field(
        "sequence", description="sequence: mean over a rollout's tokens, then rollouts "
        "(GRPO); token: mean over all tokens")
    scale_advantages: bool = Field(True, description="divide advantages by the group's std")
    reward: RewardConfig = Field(RewardConfig(), description="the rollout reward")
    # The anchor (PPO-ptx style): the policy gradient moves shared weights, and with tied
    # input/output embeddings even the gate rows are the <emb> token's input vector, so
    # GRPO alone drifts the embedding space that its own reward is measured in (measured
    # on the demo: hit@1 0.885 -> 0.61). Each step therefore also takes the stage-4
    # objective on the step's queries and their selected rationales.
    anchor_weight: float = Field(1.0, ge=0, description="weight of the stage-4 objective "
                                 "added to the GRPO loss; 0 = pure GRPO")
    anchor_alpha: float = Field(1.0, ge=0, description="anchor's direct-NCE weight (alpha)")
    anchor_lam: float = Field(1.0, ge=0, description="anchor's rationale-LM weight (lambda)")
    anchor_tau: float = Field(0.02, gt=0, description="anchor's InfoNCE temperature")

    rollout_backend: Literal["hf", "vllm"] = Field(
        "hf", description="rationale sampling: 'hf' (transformers generate) or 'vllm' (an "
        "engine started once, weights synced in place after every update)")
    vllm_engine_kwargs: dict = Field(default_factory=dict, description="extra vllm.LLM "
                                     "arguments for the rollout engine")
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="DeepSpeed ZeRO stage (0-2)")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 on a GPU, fp32 on CPU (as stage 4)")
    grad_clip: float = Field(1.0, description="global grad-norm clip")
    seed: int = Field(0, description="query order and sampling seed")
    threshold: float = Field(0.5, ge=0, le=1, description="adaptive inference: reason if "
                             "p(<think>) > threshold")

    @model_validator(mode="after")
    def _check(self) -> GateConfig:
        if "trust_remote_code" in self.vllm_engine_kwargs:
            raise ValueError("vllm_engine_kwargs.trust_remote_code is refused: the rollout "
                             "engine serves the project's own checkpoint, which needs no "
                             "remote code")
        if self.zero_stage == 3:
            raise ValueError(
                "zero_stage=3 partitions the weights that rollouts (transformers generate) "
                "read outside the engine's forward; use zero_stage 0-2 for stage 5 (the "
                "policy is the stage-4 model, which fits where stage 4 ran with ZeRO-2)")
        if self.reward.pool_size > 64:
            raise ValueError("reward.pool_size > 64 makes every rollout's reward cost a "
                             "large embedding pass; keep it <= 64")
        return self
