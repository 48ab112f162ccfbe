"""The MLflow parent run that a pipeline (or a stage run alone) nests its stage runs under.

Orchestration glue, not library code: the pipeline flow opens one per run and records it
in ``<run_dir>/_pipeline.json``, so a stage rerun alone later nests under the same parent.
"""

from __future__ import annotations

import json
import os
import time

from data_contracts.files import atomic_write_json
from mmemb.configs.pipeline import STAGES, PipelineConfig
from tasks.tracking import (
    ENV_PARENT,
    StageRecord,
    Tracker,
    prefect_tags,
    redact_obj,
    redact_uri,
)

#: Where the run directory records its last pipeline's parent run.
PIPELINE_STATE = "_pipeline.json"


def open_parent(config: PipelineConfig, tracker: Tracker, kind: str = "pipeline",
                name: str | None = None) -> str | None:
    """The MLflow parent run (created now); a placeholder id when the store is unreachable."""
    tags = {"mmemb.kind": kind, "mmemb.run_dir": str(config.run_dir.resolve()),
            **prefect_tags()}
    run_id = tracker.start_run(name or config.run.name, None, tags)
    params = {}
    for sec in ("run", *STAGES):
        obj = getattr(config, sec)
        if obj is not None:
            params.update(obj.flat_params(prefix=sec))
    if run_id:
        tracker.log_params(run_id, params)
    elif tracker.enabled:
        placeholder = f"pending-{time.time_ns()}"
        tracker.spool(StageRecord(stage="pipeline", run_name=name or config.run.name,
                                  tags={**tags, "mmemb.placeholder_id": placeholder},
                                  params=params))
        run_id = placeholder
    atomic_write_json(config.run_dir / PIPELINE_STATE, redact_obj({
        "parent_run_id": run_id, "tracking_uri": redact_uri(tracker.uri),
        "experiment": tracker.experiment, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")}))
    return run_id


def parent_for_stage(config: PipelineConfig, explicit: str | None) -> str | None:
    """A stage run alone nests under: the given id, env, or the run dir's last pipeline."""
    if explicit:
        return explicit
    if os.environ.get(ENV_PARENT):
        return os.environ[ENV_PARENT]
    p = config.run_dir / PIPELINE_STATE
    if p.is_file():
        try:
            return json.loads(p.read_text()).get("parent_run_id")
        except (OSError, json.JSONDecodeError):
            return None
    return None
