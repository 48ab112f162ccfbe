"""Thin Prefect tasks around the stages: cache check, launch, MLflow record, small result.

A stage is plain library code (``mmemb.stages.<name>.run(config, log=...)``); this module
adds what the library must not know about: the run directory's stage cache
(:mod:`tasks.cache`), launching (:mod:`tasks.launch`), tracking (:mod:`tasks.tracking`) and
the Prefect task with its retry policy. What a task returns to the flow is a small JSON
payload (artifact references, metrics, paths), never data or models.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from data_contracts import io
from data_contracts.files import atomic_write_json
from data_contracts.io import ContractError
from mmemb.configs.base import StageConfig
from mmemb.configs.pipeline import STAGES, WIRING, PipelineConfig, load_stage_config
from mmemb.previews import child_run_name, split_breakdown, stage_previews
from mmemb.stages.base import StageResult, stage_module
from mmemb.stages.base import run_stage as call_stage
from tasks import cache
from tasks.launch import StageFailed, is_transient, launch
from tasks.tracking import (
    ENV_RUN,
    StageRecord,
    Tracker,
    artifact_entries,
    dataset_entries,
    link_in_prefect,
    prefect_tags,
    redact_text,
)

#: Stages whose models are registered in the MLflow model registry (with aliases).
REGISTER_STAGES = {"train", "gate"}
#: Training stages: their step metrics are the curves the UI plots.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class MissingInput(ContractError):
    """An input a stage needs is not there (its upstream stage has not run)."""


# --------------------------------------------------------------------------- stage modules

# --------------------------------------------------------------------------- inputs

def upstream_of(stage: str, path: str, run_dir: Path) -> str | None:
    """The stage whose wired output folder holds ``path`` (for 'run X first' messages)."""
    try:
        rel = Path(path).resolve().relative_to(run_dir.resolve())
    except ValueError:
        return None
    first = rel.parts[0] if rel.parts else ""
    if first in STAGES and first != stage:
        return first
    prep_out = {Path(WIRING["prepare"][k].format(run_dir=".")).parts[-1]
                for k in ("out", "model_out")}
    return "prepare" if first in prep_out else None


def check_inputs(stage: str, cfg: StageConfig, run_dir: Path) -> None:
    """Raise :class:`MissingInput` naming the stage to run first, before anything starts."""
    for field, path in cache.input_fields(stage, cfg).items():
        if Path(path).exists():
            continue
        if field == "model" and _HUB_ID.match(path) and not path.startswith(("runs/", "./")):
            continue  # a hub id, resolved from the local cache by transformers
        up = upstream_of(stage, path, run_dir)
        hint = (f"run stage {up!r} first (`mmemb run CONFIG --only {up}`), or set "
                f"{stage}.{field} in the config") if up else f"set {stage}.{field} in the config"
        raise MissingInput(path, f"{stage}.{field} does not exist.", fix=hint + ".")


def _input_datasets(stage: str, cfg: StageConfig, digests: dict[str, str | None]) -> list[dict]:
    refs = []
    for field, path in cache.input_fields(stage, cfg).items():
        d = digests.get(field) or ""
        if d.startswith("artifact:"):
            try:
                refs.append((field, io.ref(path).to_dict()))
            except ValueError:
                continue
        elif d.startswith("file:") and path.endswith(".parquet"):
            refs.append((field, {"uri": path, "contract": field, "digest": d[5:],
                                 "rows": None, "schema_version": None}))
    return dataset_entries(refs, "input")


# --------------------------------------------------------------------------- one stage

def _payload(stage: str, status: str, res: StageResult | None = None, **kw) -> dict:
    out: dict[str, Any] = {"stage": stage, "status": status}
    if res is not None:
        out.update(outputs={k: v.to_dict() for k, v in res.outputs.items()},
                   metrics=dict(res.metrics), summary=res.summary,
                   files={k: str(v) for k, v in res.files.items()},
                   models={k: str(v) for k, v in res.models.items()})
    out.update(kw)
    return out


def _alias(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", s).strip("-") or "run"


def build_record(pcfg: PipelineConfig, stage: str, cfg: StageConfig, res: StageResult,
                 digests: dict, *, parent_run_id: str | None, tags: dict[str, str],
                 cached_from: dict | None = None) -> StageRecord:
    """The MLflow record of a stage result: params, launch settings, metrics, datasets;
    for a run (not a cache hit, ``cached_from``) also step curves, artifacts and models."""
    tr = pcfg.run.tracking
    name = child_run_name(stage, res.metrics, cached=cached_from is not None)
    rec = StageRecord(stage=stage, run_name=name, parent_run_id=parent_run_id,
                      tags={"mmemb.stage": stage, "mmemb.kind": "stage",
                            "mmemb.run_name": pcfg.run.name, **tags})
    rec.params = cfg.flat_params()
    launch_cfg = pcfg.launch_for(stage)
    rec.params.update({f"launch.{k}": v for k, v in launch_cfg.flat_params().items()})
    # Only what MLflow shows changes: per-group values go to one table, not one chart each.
    rec.metrics, groups = split_breakdown(res.metrics)
    outs = {k: v.to_dict() for k, v in res.outputs.items()}
    rec.datasets = _input_datasets(stage, cfg, digests) + dataset_entries(outs.items(), "output")
    if cached_from is not None:
        orig = str(cached_from.get("mlflow_run_id"))
        rec.tags.update({"mmemb.cached": "true", "mmemb.cached_from_run": orig,
                         "mmemb.cached_at": str(cached_from.get("finished_at")),
                         "mlflow.note.content": f"Cached: this result was computed by run "
                                                f"`{orig}`; its previews (`ui/`) are there."})
        return rec
    rec.step_metrics = [[s, m] for s, m in res.step_metrics]
    files = {k: str(v) for k, v in res.files.items()}
    arts, out_tags = artifact_entries(outs, files, tr.upload_max_mb)
    rec.artifacts = arts
    rec.tags.update(out_tags)
    rec.tables, readme = stage_previews(stage, outs, files, cfg, groups, out_tags,
                                        pcfg.run_dir / "_ui" / stage)
    rec.artifacts += readme
    for name, path in res.models.items():
        reg = None
        if tr.register_models and stage in REGISTER_STAGES:
            reg = {"name": f"{tr.model_name}-{stage}-{name}",
                   "aliases": sorted({"current", _alias(pcfg.run.name)})}
        rec.models.append({"name": name, "path": str(path), "stage": stage, "register_as": reg})
    return rec


def _stage_key(stage: str, cfg: StageConfig, run_dir: Path) -> tuple[dict, str, str]:
    """(input digests, code version, cache key) of a stage as configured now; its inputs
    must exist (:func:`check_inputs`)."""
    check_inputs(stage, cfg, run_dir)
    memo = cache.digest_memo(run_dir)
    digests = cache.input_digests(stage, cfg, memo)
    memo.save()
    code = cache.code_version(stage_module(stage))
    return digests, code, cache.cache_key(stage, cfg, digests, code)


def _reuse_cached(pcfg: PipelineConfig, stage: str, cfg: StageConfig, digests: dict, key: str,
                  tracker: Tracker, parent_run_id: str | None, tags: dict[str, str],
                  verify: bool) -> dict | None:
    """The payload of the stage's cached result (recorded in MLflow as a cached run), or
    None, having said why it must run."""
    res, reason = cache.lookup(pcfg.run_dir, stage, key, verify=verify)
    if res is None:
        print(f"[{stage}] running: {reason}", flush=True)
        return None
    st = cache.read_state(pcfg.run_dir, stage) or {}
    print(f"[{stage}] cached: inputs, config and code unchanged (key {key[:12]}); "
          f"{res.summary}", flush=True)
    rec = build_record(pcfg, stage, cfg, res, digests, parent_run_id=parent_run_id, tags=tags,
                       cached_from=st)
    run_id = tracker.log_record(rec)
    return _payload(stage, "cached", res, key=key, mlflow_run_id=run_id, duration_s=0.0,
                    original_duration_s=st.get("duration_s"))


def _compute(pcfg: PipelineConfig, stage: str, cfg: StageConfig, key: str, tracker: Tracker,
             run_id: str | None) -> tuple[StageResult, int, str]:
    """Run the stage in this process or in launched ones; returns (result, steps logged
    live, attempt id). A failure is noted on the running marker and the MLflow run."""
    run_dir, launch_cfg = pcfg.run_dir, pcfg.launch_for(stage)
    # From here until write_state the stage has no record: one that described the outputs
    # it is about to replace would outlive them if the process died in between.
    attempt = cache.begin_run(run_dir, stage, key)
    try:
        if launch_cfg.launcher == "inprocess":
            record_steps = StageRecord(stage, stage)
            res = call_stage(stage, cfg, tracker.step_logger(run_id, record_steps))
            return res, record_steps.steps_logged, attempt
        env = {ENV_RUN: run_id, "MLFLOW_TRACKING_URI": tracker.uri} if run_id else {}
        res, steps_live = launch(launch_cfg, stage, cfg, run_dir / stage, env)
        return res, steps_live, attempt
    except BaseException as e:
        cache.fail_run(run_dir, stage, attempt, redact_text(f"{type(e).__name__}: {e}"))
        tracker.set_tags(run_id, {"mmemb.error": f"{type(e).__name__}: {e}"[:8000],
                                  "mmemb.transient": str(is_transient(e))})
        tracker.end_run(run_id, "FAILED")
        raise


def _record(pcfg: PipelineConfig, stage: str, cfg: StageConfig, res: StageResult,
            digests: dict, rec_tags: dict[str, str], tracker: Tracker, run_id: str | None,
            parent_run_id: str | None, steps_live: int, duration: float) -> str | None:
    """Send the finished stage's MLflow record (after its state file: outputs first);
    returns the MLflow run id it ended up under (a new one if the store came back)."""
    rec = build_record(pcfg, stage, cfg, res, digests, parent_run_id=parent_run_id,
                       tags=rec_tags)
    rec.run_id = run_id
    rec.steps_logged = steps_live if run_id else 0
    rec.metrics["stage_duration_s"] = duration
    logged = tracker.log_record(rec)
    if logged and logged != run_id:
        st = cache.read_state(pcfg.run_dir, stage)
        if st is not None:
            st["mlflow_run_id"] = logged
            atomic_write_json(cache.state_path(pcfg.run_dir, stage), st)
    return logged


def execute_stage(pcfg: PipelineConfig, stage: str, *, force: bool = False,
                  parent_run_id: str | None = None, tracker: Tracker | None = None,
                  tags: dict[str, str] | None = None, verify: bool = False) -> dict:
    """Run one stage (or reuse its cached result); returns the small JSON payload.

    ``verify``: reuse a cached result only after hashing every output part and model file
    (without it: every part must exist with its recorded size)."""
    cfg = pcfg.section(stage)
    run_dir = pcfg.run_dir
    digests, code, key = _stage_key(stage, cfg, run_dir)
    tracker = tracker or Tracker.from_config(pcfg.run.tracking, run_dir)
    tags = dict(tags or {})
    if force:
        print(f"[{stage}] running: forced", flush=True)
    elif (hit := _reuse_cached(pcfg, stage, cfg, digests, key, tracker, parent_run_id, tags,
                               verify)) is not None:
        return hit
    rec_tags = {"mmemb.stage": stage, "mmemb.kind": "stage", "mmemb.cache_key": key,
                "mmemb.code_version": code[:12], **tags}
    run_id = tracker.start_run(stage, parent_run_id, rec_tags)
    t0 = time.perf_counter()
    res, steps_live, attempt = _compute(pcfg, stage, cfg, key, tracker, run_id)
    duration = time.perf_counter() - t0
    cache.write_state(run_dir, stage, key, res, inputs=digests, code=code,
                      config=cfg.model_dump(mode="json"), duration_s=duration,
                      extra={"mlflow_run_id": run_id}, attempt=attempt)
    logged = _record(pcfg, stage, cfg, res, digests, rec_tags, tracker, run_id,
                     parent_run_id, steps_live, duration)
    print(f"[{stage}] done in {duration:.1f}s: {res.summary}", flush=True)
    return _payload(stage, "ran", res, key=key, mlflow_run_id=logged or run_id,
                    duration_s=duration)


# --------------------------------------------------------------------------- Prefect task

def retry_condition(task, task_run, state) -> bool:  # noqa: ARG001 - Prefect's signature
    """Retry only transient failures (engine start-up, I/O), never bad input."""
    try:
        state.result(raise_on_failure=True)
    except BaseException as e:  # noqa: BLE001
        transient = is_transient(e)
        verdict = ("transient, retrying" if transient
                   else "not transient (bad input, config or code), not retrying")
        print(f"[retry] {type(e).__name__}: {verdict}", flush=True)
        return transient
    return False


@task(name="stage", task_run_name="{stage}", cache_policy=NO_CACHE, persist_result=False,
      retry_condition_fn=retry_condition, log_prints=True)
def stage_task(config: PipelineConfig, stage: str, force: bool = False,
               parent_run_id: str | None = None, upstream: dict | None = None,
               verify: bool = False) -> dict:
    """One stage as a Prefect task; ``upstream`` (payloads) draws the dependency edges."""
    del upstream
    tracker = Tracker.from_config(config.run.tracking, config.run_dir)
    out = execute_stage(config, stage, force=force, parent_run_id=parent_run_id,
                        tracker=tracker, tags=prefect_tags(), verify=verify)
    link_in_prefect(tracker, out.get("mlflow_run_id"), stage)
    return out


def stage_task_for(config: PipelineConfig, stage: str):
    """``stage_task`` with the stage's retry settings (transient failures only)."""
    lc = config.launch_for(stage)
    return stage_task.with_options(retries=lc.retries, retry_delay_seconds=lc.retry_delay_s,
                                   timeout_seconds=lc.timeout_s)


__all__ = ["MissingInput", "StageFailed", "call_stage", "execute_stage", "load_stage_config",
           "stage_task", "stage_task_for"]
