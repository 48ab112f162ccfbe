"""Stage 2 config: the reference embedder, the candidate pools, the temperature.

Used by ``python -m mmemb.stages.score --config configs/demo.yaml --section score``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mmemb.configs.base import ImageResolution, report_field, runtime_field
from mmemb.configs.distributed import DistributedSettings


class ScoreConfig(ImageResolution):
    """Counterfactual utility of each candidate: delta = s(q + r) - s(q) within a pool."""

    pairs: str = Field(..., description="training pairs artifact (contract 'pairs')")
    rationales: str = Field(..., description="stage-1 output (contract 'rationales')")
    model: str = Field(..., description="reference embedder checkpoint; the pipeline wires "
                       "the student's base model (prepare's model)")
    image_root: str | None = Field(None, description="folder image paths are relative to")
    out: str = report_field("runs/score", description="stage folder; scores go to <out>/scores")

    pool_size: int = Field(8, ge=2, description="positive + negatives per pair")
    hard_negatives: bool = Field(True, description="put the pair's mined hard negatives "
                                 "(neg_text) into its pool first")
    tau: float = Field(0.05, gt=0, description="softmax temperature of s(x)")
    seed: int = Field(0, description="which in-batch negatives each pool gets")
    batch_size: int = runtime_field(32, ge=1, description="inputs per embedding forward pass")
    shard_size: int = Field(256, ge=1, description="pairs per shard (a unit of resumption)")
    side: Literal["query"] = Field("query", description="rationales of this side are scored "
                                   "(the query side: METHOD.md stage 2)")
    device: str | None = runtime_field(None, description="cpu | cuda (default: cuda if available)")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="default: bfloat16 on cuda, float32 on cpu")
    resume: bool = runtime_field(True, description="continue from the finished shards of an "
                                 "earlier run with the same inputs and settings")
    torch_threads: int | None = runtime_field(
        None, ge=1, description="torch threads in this process (None: torch's default); 1 "
        "suits tiny models on shared CPU cores")
    progress: bool = runtime_field(True, description="progress lines on long embedding passes")

    distributed: DistributedSettings = runtime_field(
        default_factory=DistributedSettings, description="backend: ray runs the embedding "
        "passes as a Ray Data actor pool (mmemb.configs.distributed)")
    embed_engine: Literal["embedder", "vllm"] = Field(
        "embedder", description="what computes direct/reason embeddings: the transformers "
        "Embedder, or vLLM's pooling runner (LAST pooling at <emb>; equal to it within "
        "float error, faster on large passes). Affects every embedding of stage 2: "
        "targets and queries in direct mode, each query with each rationale in reasoning "
        "mode; vllm needs a prepared checkpoint (with <think>, </think>, <emb>)")

    @model_validator(mode="after")
    def _check(self) -> ScoreConfig:
        if self.tau > 10:
            raise ValueError(f"tau={self.tau}: cosines lie in [-1, 1], so tau > 10 makes every "
                             "s(x) ~ -log(pool_size) and delta ~ 0; use 0.01-0.1")
        return self
