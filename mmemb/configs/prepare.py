"""Stage 0 config: where the base model and the data come from.

Two sources:

* ``tiny`` (the embedded default): build the 2-layer Qwen-VL of :mod:`mmemb.model.tiny` and
  the synthetic world of :mod:`mmemb.data.synth` under the run directory. Nothing is
  downloaded; the same seed gives byte-identical files.
* ``existing`` (a workstation or cluster): point at a real checkpoint and real data folders.
  The stage checks that they exist, reads their manifests (or hashes plain Parquet files
  once) and hands the references on. With ``prepare_base`` (default) it also makes the
  *student base* once, in ``model_out``: the checkpoint with the method's tokens added on
  free padding rows, in its own dtype (:mod:`mmemb.model.loading`); a rerun whose source
  has not changed reuses it.

Used by ``python -m mmemb.stages.prepare --config configs/demo.yaml --section prepare``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mmemb.configs.base import StageConfig, report_field


class PrepareConfig(StageConfig):
    """Base model and data for the rest of the pipeline."""

    source: Literal["tiny", "existing"] = Field(
        "tiny", description="'tiny': build the embedded default; 'existing': use the paths below")
    # --- tiny
    arch: Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl"] = Field(
        "qwen2_vl", description="tiny: which Qwen-VL family the tiny model is built as")
    size: Literal["smoke", "demo"] = Field("demo", description="synthetic dataset size")
    seed: int = Field(0, description="tiny: seed of the synthetic data and the tiny model")
    out: str = report_field("runs/demo/data",
                            description="tiny: folder for pairs, eval rows, images")
    model_out: str = report_field("runs/demo/base_model", description="tiny: folder of the model; "
                           "existing with prepare_base: folder of the prepared student base")
    pretrain_steps: int | None = Field(None, ge=0, description="tiny: steps of the simulated "
                                       "pretraining (mmemb.model.pretrain); None: its "
                                       "DEFAULT_STEPS; 0 keeps random weights")
    # --- existing
    model: str | None = Field(None, description="existing: checkpoint folder or hub id")
    pairs: str | None = Field(None, description="existing: training pairs (contract 'pairs')")
    eval: str | None = Field(None, description="existing: eval rows (contract 'eval_rows')")
    image_root: str | None = Field(None, description="existing: folder image paths are "
                                   "relative to")
    prepare_base: bool = Field(True, description="existing: write the student base (the "
                               "checkpoint plus <think>/</think>/<emb>) to model_out once; "
                               "False hands the checkpoint on as it is, which must then hold "
                               "the tokens already (a prepared base, a trained student): the "
                               "preflight refuses one that does not")
    new_token_init: Literal["mean", "keep"] = Field(
        "mean", description="initial value of the new token rows: 'mean' of the trained "
        "rows (neutral logit, p(<think>) = 1/2 at the gate where both tokens are new; "
        "docs/real-models.md), 'keep' the padding row as it is")

    @model_validator(mode="after")
    def _check(self) -> PrepareConfig:
        if self.source == "existing":
            missing = [k for k in ("model", "pairs") if not getattr(self, k)]
            if missing:
                raise ValueError(
                    f"source='existing' needs {missing}: set prepare.model to a checkpoint "
                    "folder and prepare.pairs to a training-pairs Parquet (folder or file); "
                    "or use source='tiny' for the embedded default")
        return self

    @property
    def model_path(self) -> str:
        """The student base every later stage loads."""
        if self.source == "existing" and not self.prepare_base:
            return self.model
        return self.model_out

    @property
    def pairs_path(self) -> str:
        return self.pairs if self.source == "existing" else f"{self.out}/pairs"

    @property
    def eval_path(self) -> str | None:
        return self.eval if self.source == "existing" else f"{self.out}/eval"

    @property
    def image_root_path(self) -> str | None:
        return self.image_root if self.source == "existing" else self.out
