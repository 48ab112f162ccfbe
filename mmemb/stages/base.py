"""What every stage returns, so flows can track it without knowing the stage.

A stage is ``run(config, **inputs) -> StageResult``: plain Python, no Prefect, no MLflow.
The Prefect task around it logs ``params``, ``metrics``, ``step_metrics``, the ``outputs``
(artifact references) and ``files`` (plots, reports, models) to MLflow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from data_contracts.io import ArtifactRef

#: A step-wise metrics sink: ``log(step, {"loss": 0.3, ...})``. Rank 0 only.
StepLogger = Callable[[int, dict[str, float]], None]


def null_logger(step: int, metrics: dict[str, float]) -> None:  # noqa: ARG001
    """Default sink: drop step metrics (they are still kept in ``StageResult``)."""


@dataclass
class StageResult:
    """The outcome of one stage run."""

    stage: str
    outputs: dict[str, ArtifactRef] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    step_metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)  # name -> plot/report/model folder
    models: dict[str, Path] = field(default_factory=dict)  # name -> checkpoint folder
    summary: str = ""  # a few human lines for the console

    def to_dict(self) -> dict:
        return {"stage": self.stage, "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
                "metrics": self.metrics, "files": {k: str(v) for k, v in self.files.items()},
                "models": {k: str(v) for k, v in self.models.items()}, "summary": self.summary}


def stage_module(stage: str) -> str:
    """The module that holds stage ``stage``'s ``run`` (and its command line)."""
    return f"mmemb.stages.{stage}"


def run_stage(stage: str, cfg, log: StepLogger | None = None) -> StageResult:
    """Import the stage and call ``run(cfg, log=...)`` in this process (every stage's
    ``run`` takes its step logger as ``log``); what launch, worker and task all call."""
    import importlib

    run = importlib.import_module(stage_module(stage)).run
    res = run(cfg) if log is None else run(cfg, log=log)
    if not isinstance(res, StageResult):
        raise TypeError(f"{stage_module(stage)}.run returned {type(res).__name__}, expected "
                        "StageResult")
    return res
