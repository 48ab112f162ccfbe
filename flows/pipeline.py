"""The pipeline flow: prepare -> generate -> score -> select -> train -> gate -> evaluate.

Between tasks travel only small JSON payloads (artifact URI, digest, rows, schema version,
metrics); data and models stay on disk. Each stage is skipped when its inputs, config and
code are unchanged (``<run_dir>/<stage>/_stage.json``), so a rerun after a crash or an edit
recomputes only what changed. Run it::

    python -m flows.cli run configs/demo.yaml --run-dir runs/demo
    python -m flows.cli run configs/demo.yaml --from train       # retrain, regate, re-eval
    python -m flows.pipeline --config configs/demo.yaml           # same flow, no CLI extras

Without ``PREFECT_API_URL`` Prefect starts a temporary local API (nothing to start by hand);
with it set, the flow run appears on that server.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from prefect import flow

from data_contracts.files import atomic_write_text
from mmemb.configs.base import ConfigError
from mmemb.configs.pipeline import STAGES, PipelineConfig, StageName
from tasks.launch import disk_full_hint
from tasks.parent_run import open_parent
from tasks.stages import stage_task_for
from tasks.tracking import (
    StageRecord,
    Tracker,
    install_log_redaction,
    link_in_prefect,
    redact_text,
    redact_uri,
)


def plan(config: PipelineConfig, from_stage: str | None = None, only: str | None = None,
         force: list[str] | None = None) -> list[tuple[str, bool]]:
    """[(stage, forced)] in order. ``only`` runs one stage (forced); ``from_stage`` forces it
    and everything after it; ``force`` forces the named stages."""
    for name, val in (("--from", from_stage), ("--only", only), *(("--force", f)
                                                                  for f in force or [])):
        if val is not None and val not in STAGES:
            raise ConfigError(f"{name} {val!r}: not a stage; choose one of {', '.join(STAGES)}")
    if only is not None:
        return [(only, True)]
    stages = [s for s in STAGES if s in config.run.stages]
    if from_stage is not None and from_stage not in stages:
        raise ConfigError(f"--from {from_stage!r}: not in run.stages ({', '.join(stages)})")
    start = stages.index(from_stage) if from_stage else len(stages)
    forced = set(force or [])
    return [(s, i >= start or s in forced) for i, s in enumerate(stages)]


# --------------------------------------------------------------------------- summary

def mode_table(payloads: dict[str, dict]) -> list[dict[str, Any]]:
    """Per mode, the evaluate stage's overall score, reasoning ratio and latency
    (:func:`mmemb.eval.report.mode_table` over its metrics and results Parquet)."""
    ev = payloads.get("evaluate") or {}
    ref = next((r for r in (ev.get("outputs") or {}).values()
                if r.get("contract") == "eval_results"), None)
    if ref is None:
        return []
    from data_contracts import io
    from data_contracts.schemas import EVAL_RESULTS
    from mmemb.eval.report import mode_table as table

    return table(ev.get("metrics") or {}, io.read(ref["uri"], EVAL_RESULTS).to_pylist())


def _f(v, fmt=".3f") -> str:
    return "-" if v is None else format(v, fmt)


def format_summary(config: PipelineConfig, payloads: dict[str, dict], duration_s: float,
                   tracker: Tracker, parent_run_id: str | None) -> str:
    """The run's summary: one line per stage, the modes table, where to see it in MLflow
    and how to rerun."""
    lines = [f"== mmemb pipeline '{config.run.name}' in {config.run_dir} "
             f"({duration_s / 60:.1f} min) =="]
    for stage, p in payloads.items():
        st = p["status"]
        dur = p.get("duration_s")
        head = f"{stage:<9} {st:<11}" + (f" {dur:7.1f}s" if dur else " " * 9)
        text = p.get("summary") or p.get("reason") or ""
        lines.append(f"  {head}  {text}".rstrip())
    modes = mode_table(payloads)
    if modes:
        metric = modes[0]["metric"] or "score"
        lines += ["", f"  {'mode':<9} {metric + ' (%)':>12} {'reasoning':>10} "
                  f"{'latency mean':>13} {'p95 (ms)':>9}"]
        for m in modes:
            score = None if m["score"] is None else 100 * m["score"]
            rr = None if m["reasoning_ratio"] is None else 100 * m["reasoning_ratio"]
            lines.append(f"  {m['mode']:<9} {_f(score, '12.1f')} {_f(rr, '9.0f')}% "
                         f"{_f(m['latency_mean_ms'], '13.1f')} {_f(m['latency_p95_ms'], '9.1f')}")
    lines.append("")
    if tracker.enabled and tracker.offline_reason is None:
        if tracker.is_local:
            lines.append(f"  MLflow: {redact_uri(tracker.uri)}; UI: make ui RUN="
                         f"{config.run_dir}  (or mmemb ui --run-dir {config.run_dir}) -> "
                         f"{tracker.ui_url(parent_run_id)}")
        else:
            lines.append(f"  MLflow run: {tracker.ui_url(parent_run_id)}")
        lines.append(f"  all runs of the experiment: {tracker.ui_url()}")
    elif tracker.enabled:
        lines.append(f"  MLflow unreachable ({tracker.offline_reason}); records spooled, "
                     f"send them with: mmemb sync --run-dir {config.run_dir}")
    lines.append(f"  rerun: mmemb run CONFIG --run-dir {config.run_dir} [--from STAGE] "
                 "(unchanged stages are reused)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the flow

def _config_of(config: PipelineConfig | None, config_path: str | None, run_dir: str | None,
               overrides: list[str] | None) -> PipelineConfig:
    """The flow's config: the form as given, or loaded from ``config_path``."""
    if config is None:
        if not config_path:
            raise ConfigError("pipeline: give config (the form) or config_path (a YAML)")
        return PipelineConfig.load(config_path, run_dir=run_dir, overrides=overrides)
    if run_dir and run_dir != config.run.run_dir:
        raise ConfigError("pipeline: run_dir goes with config_path; a config object was "
                          "already wired to its run.run_dir")
    return config


def _run_stages(config: PipelineConfig, steps: list[tuple[str, bool]], parent: str | None,
                verify: bool, payloads: dict[str, dict]) -> None:
    """Each planned stage as a Prefect task, in order, filling ``payloads``; the upstream
    payloads draw Prefect's dependency edges."""
    for stage, forced in steps:
        upstream = {s: {"key": p.get("key"), "outputs": p.get("outputs")}
                    for s, p in payloads.items() if p.get("key")}
        payloads[stage] = stage_task_for(config, stage)(
            config, stage, force=forced, parent_run_id=parent, upstream=upstream,
            verify=verify)


def _report_failure(e: BaseException, steps: list[tuple[str, bool]], payloads: dict,
                    run_dir, tracker: Tracker, parent: str | None) -> str:
    """Say which stage failed and how to resume (kept stages are reused); tag the parent
    run with it. Returns the parent run's final status."""
    failed = next((s for s, _ in steps if s not in payloads), "?")
    hint = disk_full_hint(e)
    hint = f"\n[pipeline] {hint}" if hint and hint not in str(e) else ""
    print(redact_text(f"[pipeline] stage {failed!r} failed: {type(e).__name__}: {e}{hint}\n"
                      f"[pipeline] finished stages are kept; resume with: mmemb run "
                      f"CONFIG --run-dir {run_dir} (cached stages are skipped) or --from "
                      f"{failed}"), flush=True)
    if parent and not parent.startswith("pending-"):
        tracker.set_tags(parent, {"mmemb.failed_stage": failed,
                                  "mmemb.error": f"{type(e).__name__}: {e}"[:8000]})
    return "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"


def _close_parent(config: PipelineConfig, tracker: Tracker, parent: str | None,
                  payloads: dict[str, dict], duration: float, status: str) -> None:
    """The parent run's totals and final status (spooled when the store went away)."""
    if not parent or parent.startswith("pending-"):
        return
    m = {"pipeline_duration_s": duration,
         **{f"{s}_duration_s": p["duration_s"] for s, p in payloads.items()
            if p.get("duration_s") is not None},
         "stages_ran": sum(p["status"] == "ran" for p in payloads.values()),
         "stages_cached": sum(p["status"] == "cached" for p in payloads.values())}
    tracker.log_metrics(parent, m)
    tracker.end_run(parent, status)
    if tracker.enabled and tracker.offline_reason is not None:
        # The store went away during the run: spool the parent's metrics and final status
        # like the stages' records, so `mmemb sync` closes it (else it would stay RUNNING,
        # without its totals, once the store is back).
        tracker.spool(StageRecord(stage="pipeline-end", run_name=config.run.name,
                                  run_id=parent, metrics=m, status=status))


def _publish_summary(config: PipelineConfig, payloads: dict[str, dict], duration: float,
                     tracker: Tracker, parent: str | None) -> str:
    """The summary text, written to the run directory and the Prefect UI (the command line
    prints it itself, plain, on stdout: not twice to the console)."""
    text = redact_text(format_summary(config, payloads, duration, tracker, parent))
    print(f"[pipeline] finished in {duration:.0f}s: "
          + ", ".join(f"{s} {p['status']}" for s, p in payloads.items())
          + f"; summary in {config.run_dir / 'summary.txt'}", flush=True)
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact("```\n" + text + "\n```", key="pipeline-summary",
                                 description="stage results and the three-mode table")
    except Exception:  # noqa: BLE001 - a summary artifact is a convenience
        pass
    atomic_write_text(config.run_dir / "summary.txt", text + "\n")
    return text


@flow(name="mmemb-pipeline", log_prints=True, persist_result=False)
def pipeline(config: PipelineConfig | None = None, from_stage: StageName | None = None,
             only: StageName | None = None, force: list[StageName] | None = None,
             config_path: str | None = None, run_dir: str | None = None,
             overrides: list[str] | None = None, verify: bool = False) -> dict:
    """The whole method on one run directory; returns stage payloads and a summary.

    Give ``config`` (the form), or ``config_path`` (a pipeline YAML, as deployments do) with
    optional ``run_dir`` and ``overrides`` (``["train.lr=1e-4"]``); with a config object,
    ``overrides`` are the ones it was loaded with, shown in the parent run's name.
    ``verify``: hash every output part and model file before reusing a cached stage.
    """
    t0 = time.perf_counter()
    install_log_redaction()
    config = _config_of(config, config_path, run_dir, overrides)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    steps = plan(config, from_stage, only, force)
    tracker = Tracker.from_config(config.run.tracking, config.run_dir)
    tracker.replay()
    parent = open_parent(config, tracker, overrides=overrides, steps=[s for s, _ in steps],
                         from_stage=from_stage, only=only)
    link_in_prefect(tracker, parent)
    print(f"[pipeline] {config.run.name}: {' -> '.join(s for s, _ in steps)} in "
          f"{config.run_dir}" + (f"; MLflow parent run {parent}" if parent else ""), flush=True)
    payloads: dict[str, dict] = {}
    status = "FINISHED"
    try:
        _run_stages(config, steps, parent, verify, payloads)
    except BaseException as e:
        status = _report_failure(e, steps, payloads, config.run_dir, tracker, parent)
        raise
    finally:
        duration = time.perf_counter() - t0
        _close_parent(config, tracker, parent, payloads, duration, status)
    text = _publish_summary(config, payloads, duration, tracker, parent)
    return {"run_dir": str(config.run_dir), "parent_run_id": parent, "duration_s": duration,
            "stages": payloads, "modes": mode_table(payloads), "summary": text,
            "tracking_uri": redact_uri(tracker.uri), "experiment_id": tracker.experiment_id}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Run the mmemb pipeline flow (see flows.cli for "
                                 "the full command line).")
    ap.add_argument("--config", required=True)
    ap.add_argument("--run-dir")
    a = ap.parse_args(argv)
    cfg = PipelineConfig.load(a.config, run_dir=a.run_dir)
    from flows.startup import prefect_startup, prefect_timeout

    with prefect_startup(*prefect_timeout(None, cfg.run.prefect_startup_timeout_s)):
        pipeline(cfg)


if __name__ == "__main__":
    main()


__all__ = ["pipeline", "plan"]
