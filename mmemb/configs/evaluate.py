"""Evaluation stage config: which model, which data, which modes, and the harness knobs.

Used by ``python -m mmemb.stages.evaluate --config configs/demo.yaml --section evaluate``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mmemb.configs.base import ImageResolution, report_field, runtime_field
from mmemb.configs.distributed import DistributedSettings

ModeName = Literal["direct", "reason", "adaptive"]


class EvaluateConfig(ImageResolution):
    """Score a checkpoint on MMEB-V2 (a local download) or on eval-rows artifacts."""

    model: str = Field(..., description="checkpoint folder (or hub id in the local cache)")
    eval: str = Field(..., description="eval_rows artifact / .parquet, or an MMEB-V2 download "
                      "root folder (layout in docs/evaluation.md)")
    corpus: str | None = Field(None, description="eval_corpus artifact for global tasks; "
                               "default: 'eval_corpus' beside the rows, or the MMEB loader's")
    image_root: str | None = Field(None, description="folder image/frame paths are relative "
                                   "to; default for an MMEB root: the root itself")
    out: str = report_field("runs/evaluate", description="stage folder: results, report, "
                            "embedding cache")

    modes: list[ModeName] = Field(default_factory=lambda: ["direct", "reason", "adaptive"],
                                  description="inference modes to score, side by side")
    tasks: list[str] | None = Field(None, description="task names (default: every task in "
                                    "the data / all 78 of MMEB-V2)")
    categories: list[str] | None = Field(None, description="MMEB-V2 task categories to "
                                         "keep (default: all)")
    modalities: list[Literal["image", "video", "visdoc"]] | None = Field(
        None, description="MMEB-V2 modalities to keep (default: all)")
    max_queries: int | None = Field(None, ge=1, description="first N queries per task (a "
                                    "quick subset; the corpus of global tasks stays whole)")
    skip_missing: bool = Field(False, description="MMEB root: skip tasks whose files are "
                               "absent (reported as missing) instead of failing")
    num_frames: int = Field(8, ge=1, description="frames sampled per video (MMEB-V2: 8)")
    protocol: Literal["official", "strict"] = Field(
        "official", description="MMEB-V2 scoring protocol: 'official' reproduces the official "
        "scorer's numbers (stable ties, full label lists, its graded-NDCG pairing, ...); "
        "'strict' pessimistic ties and a standard IR evaluator's NDCG (docs/evaluation.md)")

    baseline: str | None = Field(None, description=".json/.csv of per-task scores (e.g. a "
                                 "published model) or an earlier run's results folder")
    baseline_mode: ModeName | None = Field(None, description="which mode of a results-folder "
                                           "baseline (default: direct)")
    baseline_name: str = Field("baseline", description="the baseline's column name in "
                               "the report")

    reason_on_candidates: bool = Field(
        False, description="embed candidates in the query's mode instead of direct; the gate "
        "is a query-side decision, so the default indexes targets once, in direct mode")
    batch_size: int = Field(16, ge=1, description="inputs per forward pass (1 = true "
                            "per-query latency)")
    # None = the gate's: the budget and threshold the gate stage trained the model at travel
    # with it (mmemb_gate.json beside the policy), so adaptive numbers are measured at them;
    # a value set here wins and the report says so. No gate file: 64 and 0.5.
    budget: int | None = Field(None, ge=1, description="max reasoning tokens per query "
                               "(default: the gate's, from mmemb_gate.json beside the model, "
                               "else 64)")
    threshold: float | None = Field(None, ge=0, le=1, description="adaptive: reason if "
                                    "p(<think>) > threshold (default: the gate's, else 0.5)")
    temperature: float = Field(0.0, ge=0, description="rationale sampling; 0 = greedy")
    generation: Literal["hf", "vllm"] = Field(
        "hf", description="who writes the rationales: transformers generate, or a vLLM "
        "engine on the same checkpoint (the gate and the embedding pass stay in transformers)")
    top_p: float = Field(1.0, gt=0, le=1, description="rationale nucleus sampling; 1 = off")
    chunk_size: int = runtime_field(256, ge=1, description="inputs per cache chunk (resume unit)")
    cache_dir: str | None = Field(None, description="embedding cache; default <out>/cache")
    vector_dtype: Literal["float32", "float16"] = Field(
        "float32", description="how the embedding cache stores vectors (Arrow fixed-size "
        "lists): float16 halves it; scores are computed in float32 either way")
    plots: bool = report_field(True, description="draw the report's accuracy-vs-latency "
                               "plot (once, after every task is scored)")
    image_cache: str | None = Field(None, description="where visdoc page images are written; "
                                    "default <MMEB root>/visdoc-tasks/_images")
    device: str | None = runtime_field(None, description="default: cuda when available, else cpu")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="model dtype; auto: bfloat16 on cuda, float32 on cpu")
    seed: int = Field(0, description="seed of rationale sampling (and every RNG)")

    distributed: DistributedSettings = runtime_field(
        default_factory=DistributedSettings, description="backend: ray runs the embedding "
        "passes as a Ray Data actor pool (mmemb.configs.distributed)")
    embed_engine: Literal["embedder", "vllm"] = Field(
        "embedder", description="what computes direct/reason embeddings: the transformers "
        "Embedder, or vLLM's pooling runner (LAST pooling at <emb>; equal to it within "
        "float error, faster on large passes). Affects the embedding passes of every mode "
        "(direct prompts, and prompts with their rationale); adaptive's gate and its "
        "direct pass stay in transformers, rationales are written as `generation` says")

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        if not self.modes:
            raise ValueError("modes is empty: list at least one of direct, reason, adaptive")
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes {self.modes} repeats a mode; list each once")
        if self.baseline_mode is not None and self.baseline is None:
            raise ValueError("baseline_mode is set but baseline is not: set baseline to an "
                             "earlier run's results folder, or drop baseline_mode")
        if self.reason_on_candidates and set(self.modes) == {"direct"}:
            raise ValueError("reason_on_candidates=True has no effect with modes=[direct]; "
                             "add 'reason' or 'adaptive' to modes, or drop it")
        return self
