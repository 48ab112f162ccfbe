"""Stage 3 config: filters, the margin delta, the report.

Used by ``python -m mmemb.stages.select --config configs/demo.yaml --section select``.
"""

from __future__ import annotations

from pydantic import Field

from mmemb.configs.base import StageConfig, report_field


class SelectConfig(StageConfig):
    """r* = argmax_k delta_ik over the candidates that pass the filters, if > margin."""

    pairs: str = Field(..., description="training pairs artifact (contract 'pairs')")
    rationales: str = Field(..., description="stage-1 output (contract 'rationales')")
    scores: str = Field(..., description="stage-2 output (contract 'scores')")
    out: str = report_field("runs/select", description="stage folder: <out>/selections, "
                     "<out>/summary.json and the plots")
    margin: float = Field(0.1, description="delta: a rationale is kept only if its utility "
                          "exceeds this (log-probability units of s); larger = fewer pairs "
                          "reason")
    max_rationale_tokens: int = Field(256, ge=1, description="over-long filter: candidates "
                                      "with more tokens are dropped")
    plots: bool = Field(True, description="also draw the selection plots into out/")
    seed: int = report_field(0, description="seed of the sample of decisions written to "
                             "out/decisions.table.json")
