"""The MLflow parent run that a pipeline (or a stage run alone) nests its stage runs under.

Orchestration glue, not library code: the pipeline flow opens one per run and records it
in ``<run_dir>/_pipeline.json``, so a stage rerun alone later nests under the same parent.
"""

from __future__ import annotations

import json
import os
import time

from data_contracts.files import atomic_write_json, json_digest
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


def config_digest(config: PipelineConfig) -> str:
    """A short digest of what the planned stages compute (their cache views): two runs of
    one config file with different settings get different digests."""
    view = {}
    for s in config.run.stages:
        sec = getattr(config, s, None)
        if sec is not None:
            view[s] = sec.digest_view("cache")
    return json_digest(view)[:6]


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def parent_run_name(config: PipelineConfig, overrides: list[str] | None = None,
                    from_stage: str | None = None, only: str | None = None,
                    started: float | None = None) -> str:
    """``<config name> · <what changed> · <MM-DD HH:MM>``: the user's overrides (else a
    short config digest), plus ``from X`` / ``only X``, so the runs of one config are told
    apart in the runs table (which shows the start of the name)."""
    what = ", ".join(_cut(o, 24) for o in overrides or [])
    what = _cut(what, 40) if what else f"cfg {config_digest(config)}"
    extra = [f"from {from_stage}"] if from_stage else []
    extra += [f"only {only}"] if only else []
    when = time.strftime("%m-%d %H:%M", time.localtime(started))
    return " · ".join([config.run.name, what, *extra, when])


def _note(config: PipelineConfig, overrides: list[str] | None, steps: list[str] | None) -> str:
    """The parent run's description (markdown): overrides and planned stages in full."""
    lines = [f"**{config.run.name}** in `{config.run_dir}`, config digest "
             f"`{config_digest(config)}`", ""]
    lines += ["Overrides:", *[f"- `{o}`" for o in overrides]] if overrides else ["No overrides."]
    if steps:
        lines += ["", "Stages: " + " → ".join(steps)]
    return "\n".join(lines)


def open_parent(config: PipelineConfig, tracker: Tracker, kind: str = "pipeline",
                name: str | None = None, overrides: list[str] | None = None,
                steps: list[str] | None = None, from_stage: str | None = None,
                only: str | None = None) -> str | None:
    """The MLflow parent run (created now); a placeholder id when the store is unreachable.

    Named by :func:`parent_run_name` unless ``name`` is given; ``overrides`` (the user's
    ``--set``) and ``steps`` (the planned stages) go into its tags and description."""
    name = name or parent_run_name(config, overrides, from_stage, only)
    tags = {"mmemb.kind": kind, "mmemb.run_dir": str(config.run_dir.resolve()),
            "mmemb.run_name": config.run.name, "mmemb.config_digest": config_digest(config),
            "mmemb.overrides": json.dumps(list(overrides or [])),
            "mlflow.note.content": _note(config, overrides, steps), **prefect_tags()}
    run_id = tracker.start_run(name, None, tags)
    params = {}
    for sec in ("run", *STAGES):
        obj = getattr(config, sec)
        if obj is not None:
            params.update(obj.flat_params(prefix=sec))
    if run_id:
        tracker.log_params(run_id, params)
    elif tracker.enabled:
        placeholder = f"pending-{time.time_ns()}"
        tracker.spool(StageRecord(stage="pipeline", run_name=name,
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
