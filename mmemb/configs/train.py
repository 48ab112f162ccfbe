"""Stage 4 config: contrastive training with DeepSpeed (``TrainConfig``).

Used by ``python -m mmemb.stages.train --config configs/demo.yaml --section train``.

Defaults are set for the embedded default (the tiny Qwen-VL on the synthetic world, CPU),
so a pipeline YAML whose ``train:`` section is empty still learns something in a few
hundred steps. For a real 4B backbone change at least ``lr`` (2e-5 full, 1e-4 LoRA),
``batch_size``/``chunk_size`` and ``gradient_checkpointing`` (see docs/training.md and
``configs/train_qwen3vl4b.yaml``).

Loss weights (METHOD.md, stage 4, reconstructed; each a config value):

* ``alpha = 1.0`` on the direct-mode NCE. Adaptive inference embeds every input the gate
  does not reason on (about a quarter in the paper's summaries) in direct mode, so the
  direct embedding must stay as good as the reasoning one: equal weight. For rows without a
  rationale both NCE terms see the same embedding, so they get weight 1 + alpha, which is
  harmless (a uniform scale on those rows).
* ``lam = 0.5`` on the rationale LM loss. It must be large enough that the student learns
  to *write* the selected rationales (stage 5 samples them) but it starts near ln|V| (~12
  for Qwen's vocabulary, ~6 for the tiny one) while an NCE at tau 0.02 starts near ln(batch),
  so a full weight would let the LM term dominate the first steps; 0.5 keeps the two
  gradients of the same order from the start.
* ``tau = 0.02`` (METHOD.md).
* ``lm_warmup_steps = 0``: no rationale SFT before the joint objective. The demo uses 400
  with ``lam = 4`` and ``alpha = 0``, because on the tiny model the contrastive loss
  otherwise leaves the rationale writer untrained and the direct mode learns the inference
  family by heart (measured numbers: docs/training.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mmemb.configs.base import ImageResolution, StageConfig, report_field, runtime_field

LM_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraSettings(StageConfig):
    """peft LoRA on the language model's linear layers (the vision tower is not adapted).

    The final ``student`` is saved with the adapter merged (a plain checkpoint every later
    stage loads the same way); the unmerged adapter is kept beside it in ``out/adapter``
    (with the trained token rows, when ``train_token_rows``: they are part of the adapter).
    """

    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="0 keeps the forward deterministic, "
                           "which gradient caching needs (no RNG replay)")
    target_modules: list[str] = Field(default_factory=lambda: list(LM_LINEAR),
                                      description="names of the adapted linear layers")
    train_token_rows: bool = Field(
        True, description="also train the embedding rows of <think>, </think> and <emb> (and "
        "their LM-head rows; shared when the head is tied) through peft's "
        "trainable_token_indices. LoRA freezes everything else, and these rows are new "
        "(<emb> in every family, <think>/</think> outside Qwen3-VL: only mean-initialised) or "
        "get a new role (Qwen3-VL's <think>): frozen, <emb>'s input row and the LM-head rows "
        "the stage-5 gate reads (<think> vs <emb>) could never learn. Every other row stays "
        "exactly the base's; false reproduces adapters-only LoRA")


class TrainConfig(ImageResolution):
    """Stage 4: NCE(e(q ⊕ r*), e(t+)) + alpha NCE(e(q), e(t+)) + lam LM(r* | q)."""

    # --- inputs / outputs
    model: str = Field(..., description="base checkpoint (tiny or real Qwen-VL)")
    data: str | None = Field(None, description="stage-3 selections (or a pairs artifact: "
                             "the contract is read from its manifest)")
    pairs: str | None = Field(None, description="plain training pairs, used when 'data' is "
                              "not given: a direct-only baseline (no rationales)")
    image_root: str | None = Field(None, description="folder image paths are relative to")
    eval: str | None = report_field(None, description="eval rows (synthetic suite) for the "
                             "before/after hit@1 report; None skips it")
    out: str = report_field("runs/train", description="stage folder: checkpoints, the "
                            "student, metrics")

    # --- schedule
    steps: int = Field(300, ge=1, description="optimizer steps (ignored when epochs is set)")
    epochs: float | None = Field(None, gt=0, description="train this many passes instead "
                                 "(steps = ceil(epochs * steps_per_epoch))")
    batch_size: int = Field(16, ge=1, description="per-device contrastive batch: queries per "
                            "rank per micro-batch; the global in-batch negatives are "
                            "batch_size x world_size")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step; does NOT "
                            "add negatives (each micro-batch is its own contrastive batch)")
    hard_negatives: int = Field(1, ge=0, description="K hard negatives per query from the "
                                "rows' neg_text/neg_img_path (extra target columns)")
    lr: float = Field(1e-3, gt=0, description="peak LR (tiny default; real 4B: 2e-5 full, "
                      "1e-4 LoRA)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final LR / peak LR")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="decay after the warm-up, down to min_lr_ratio x lr")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up; capped at steps - 1 for "
                              "short runs")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    grad_clip: float = Field(1.0, ge=0, description="global grad-norm clip; 0 disables")
    seed: int = Field(0, description="data order and initialisation seed")

    # --- objective
    tau: float = Field(0.02, gt=0, description="InfoNCE temperature")
    alpha: float = Field(1.0, ge=0, description="weight of the direct-mode NCE on rows that "
                         "have a rationale (rows without one always train in direct mode); 0 "
                         "= each row trains only in the mode stage 3 chose for it")
    lam: float = Field(0.5, ge=0, description="weight of the rationale LM loss")
    lm_warmup_steps: int = Field(0, ge=0, description="rationale SFT first: optimizer steps "
                                 "of LM(r*|q) alone on rows with a rationale, before the "
                                 "'steps' of the joint objective (see docs/training.md)")

    # --- memory / parallelism
    gradcache: bool = Field(True, description="GradCache: the contrastive batch is embedded "
                            "in chunks, so it can exceed what one forward with a graph fits")
    chunk_size: int = Field(8, ge=1, description="inputs per forward under gradcache")
    gradcache_embed_chunks: int = runtime_field(
        4, ge=1, description="chunks merged into one forward of gradcache's no-graph pass "
        "(1: one forward per chunk). Without a graph a forward holds one layer's "
        "activations, with one every layer's, so 4 x chunk_size rows without a graph need "
        "less memory than chunk_size with a graph for any model of 8+ layers; fewer, larger "
        "forwards cost less per row")
    zero_stage: Literal[0, 1, 2, 3] = Field(
        1, description="DeepSpeed ZeRO stage; when not set: 1 with gradcache (whole "
        "gradients, one reduce per optimizer step, optimizer states partitioned), 2 without "
        "(see mmemb/training/reduction.py for what each costs in memory)")
    gradcache_reduce: Literal["step", "backward"] = runtime_field(
        "step", description="with gradcache under ZeRO-2/3: 'step' holds the step's whole "
        "gradients and reduces them once per optimizer step (DeepSpeed's "
        "coalesce_grad_reduction; ZeRO-1's gradient memory), 'backward' keeps ZeRO-2's "
        "partitioned gradients and pays one reduce per chunk backward. ZeRO-0/1 always "
        "reduce once per step")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 on a GPU, fp32 on CPU")
    gradient_checkpointing: bool = Field(False, description="HF gradient checkpointing; "
                                         "gradcache already bounds activations by chunk_size, "
                                         "turn it on when one chunk does not fit")
    vision: Literal["frozen", "merger", "train"] = Field(
        "merger", description="frozen: the whole vision tower; merger: tower frozen, its "
        "projector (merger) trained; train: all of it")
    lora: LoraSettings | None = Field(None, description="LoRA instead of full fine-tuning "
                                      "(None: full)")

    # --- checkpoints / logging / eval
    save_every: int = report_field(100, ge=1, description="checkpoint every N optimizer steps")
    keep_checkpoints: int = report_field(2, ge=1, description="newest checkpoints kept")
    resume: bool = runtime_field(True, description="continue from the newest checkpoint in out/")
    log_every: int = runtime_field(10, ge=1, description="console line every N steps (the step "
                           "logger gets every step)")
    eval_before: bool = report_field(True, description="also evaluate the untrained model")
    eval_batch_size: int = report_field(64, ge=1, description="inputs per forward pass "
                                        "of the evaluation")
    max_text_tokens: int = Field(2048, ge=8, description="longer texts are truncated to "
                                 "this many tokens")

    @model_validator(mode="before")
    @classmethod
    def _default_zero_stage(cls, data):
        """An unset ``zero_stage`` follows ``gradcache``: ZeRO-1 keeps whole gradients, so
        the chunk backwards of a step accumulate locally and are reduced once (ZeRO-2 would
        reduce-scatter on every chunk); without gradcache ZeRO-2's partitioned gradients
        cost nothing extra. Set ``zero_stage`` to override."""
        if isinstance(data, dict) and data.get("zero_stage") is None:
            data = {**data, "zero_stage": 1 if data.get("gradcache", True) else 2}
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if not self.data and not self.pairs:
            raise ValueError("no training data: set 'data' to the stage-3 selections (or any "
                             "pairs artifact) or 'pairs' to plain pairs for a direct-only "
                             "baseline")
        if self.lora is not None and self.lora.dropout > 0 and self.gradcache:
            raise ValueError("lora.dropout > 0 with gradcache: the cached embeddings and the "
                             "re-forward would see different dropout masks, so the gradient "
                             "would be wrong; set lora.dropout: 0 or gradcache: false")
        if self.precision == "bf16" and self.zero_stage == 0 and self.grad_accum > 1:
            raise ValueError("bf16 with zero_stage 0 and grad_accum > 1 accumulates gradients "
                             "in bf16; use zero_stage >= 1 (fp32 accumulation) or grad_accum 1")
        return self
