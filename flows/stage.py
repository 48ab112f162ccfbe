"""One flow per stage, built from the stage's own config class (a form in the Prefect UI).

``flows/<stage>.py`` are two-line modules around :func:`make_stage_flow`, so each stage
runs alone::

    python -m flows.generate --config configs/demo.yaml --run-dir runs/demo
    python -m flows.cli stage generate configs/demo.yaml

The config file may be a pipeline YAML (its wired ``<stage>`` section is used) or a YAML
holding only that stage's settings. A stage run alone nests its MLflow run under the run
directory's last pipeline run (or ``--parent-run-id`` / ``MMEMB_MLFLOW_PARENT_RUN_ID``), and
reuses the stage cache exactly like the pipeline.
"""

from __future__ import annotations

import argparse
from typing import Any

from prefect import flow

from mmemb.configs.pipeline import (
    STAGES,
    LaunchConfig,
    PipelineConfig,
    RunSection,
    config_class,
    load_stage,
)


def stage_pipeline_config(stage: str, config: Any, run: RunSection,
                          launch: LaunchConfig | None = None) -> PipelineConfig:
    """A PipelineConfig holding only this stage (other sections None)."""
    data = {"run": {**run.model_dump(mode="json"), "stages": [stage]},
            stage: config.model_dump(mode="json") if hasattr(config, "model_dump") else config}
    if launch is not None:
        data["launch"] = {stage: launch.model_dump(mode="json")}
    if stage != "prepare":
        data.setdefault("prepare", {})
    return PipelineConfig.model_validate(data)


def resolve_stage_inputs(stage: str, config: Any = None, config_path: str | None = None,
                         run_dir: str | None = None, run: RunSection | None = None,
                         launch: LaunchConfig | None = None,
                         overrides: list[str] | None = None):
    """(stage config, run section, launch) from a config object or a YAML path.

    A pipeline YAML gives all three (its ``run`` and ``launch.<stage>`` too); a stage-only
    YAML gives the stage config, with the default run section (:func:`load_stage`).
    """
    from mmemb.configs.base import ConfigError

    if config is None:
        if not config_path:
            raise ConfigError(f"stage {stage!r}: give a config (the form) or a config_path")
        loaded = load_stage(stage, config_path, overrides=overrides, run_dir=run_dir)
        config, run, launch = loaded.config, run or loaded.run, launch or loaded.launch
    if run is None:
        run = RunSection(run_dir=run_dir) if run_dir else RunSection()
    elif run_dir:
        run = run.model_copy(update={"run_dir": run_dir})
    return config, run, launch


def make_stage_flow(stage: str):
    """The Prefect flow of one stage; its ``config`` parameter is the stage's config class."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    cls = config_class(stage)

    def stage_flow(config=None, config_path: str | None = None, run_dir: str | None = None,
                   run: RunSection | None = None, launch: LaunchConfig | None = None,
                   force: bool = False, parent_run_id: str | None = None,
                   overrides: list[str] | None = None, verify: bool = False) -> dict:
        """Resolve the stage's config, open (or reuse) the parent run, run the one stage
        task; the flow's form is the stage's own config class."""
        from tasks.parent_run import open_parent, parent_for_stage
        from tasks.stages import stage_task_for
        from tasks.tracking import Tracker, install_log_redaction, link_in_prefect

        install_log_redaction()
        config, run, launch = resolve_stage_inputs(stage, config, config_path, run_dir, run,
                                                   launch, overrides)
        pc = stage_pipeline_config(stage, config, run, launch)
        pc.run_dir.mkdir(parents=True, exist_ok=True)
        tracker = Tracker.from_config(pc.run.tracking, pc.run_dir)
        tracker.replay()
        parent = parent_for_stage(pc, parent_run_id)
        if parent is None:
            parent = open_parent(pc, tracker, kind="stage-run", name=f"{pc.run.name}:{stage}")
            link_in_prefect(tracker, parent)
        out = stage_task_for(pc, stage)(pc, stage, force=force, parent_run_id=parent,
                                        verify=verify)
        print(f"[{stage}] {out['status']}: {out.get('summary', '')}", flush=True)
        return out

    stage_flow.__annotations__ = {
        "config": cls | None, "config_path": str | None, "run_dir": str | None,
        "run": RunSection | None, "launch": LaunchConfig | None, "force": bool,
        "parent_run_id": str | None, "overrides": list[str] | None, "verify": bool,
        "return": dict}
    stage_flow.__doc__ = (f"Stage {stage!r} alone: fill the config form, or give config_path "
                          "(a pipeline YAML or a stage YAML) and optionally run_dir.")
    stage_flow.__name__ = f"{stage}_flow"
    stage_flow.__qualname__ = stage_flow.__name__
    return flow(name=f"mmemb-{stage}", log_prints=True, persist_result=False)(stage_flow)


def run_stage_from_file(stage: str, config_path: str, run_dir: str | None = None,
                        force: bool = False, overrides: list[str] | None = None,
                        parent_run_id: str | None = None, flow_obj=None,
                        prefect_timeout: int | None = None, verify: bool = False) -> dict:
    """Load the stage's config from a pipeline or stage YAML and run its flow.

    ``prefect_timeout``: seconds to wait for Prefect's temporary API server (default: the
    run section's ``prefect_startup_timeout_s``, then the environment; flows/startup.py).
    ``verify``: hash every output part and model file before reusing the cached stage."""
    from flows.startup import prefect_startup
    from flows.startup import prefect_timeout as startup_wait

    # secrets are refused by the loader, before the values become the flow's parameters
    config, run, launch = resolve_stage_inputs(stage, None, config_path, run_dir, None, None,
                                               overrides)
    flow_obj = flow_obj or make_stage_flow(stage)
    with prefect_startup(*startup_wait(prefect_timeout, run.prefect_startup_timeout_s)):
        return flow_obj(config=config, run=run, launch=launch, force=force,
                        parent_run_id=parent_run_id, verify=verify)


def main(stage: str, argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog=f"python -m flows.{stage}",
                                 description=f"Run stage {stage!r} alone as a Prefect flow.")
    ap.add_argument("--config", required=True, help=f"pipeline YAML (its '{stage}' section "
                    "is used) or a YAML with only this stage's settings")
    ap.add_argument("--run-dir", help="run directory (default: the config's run.run_dir)")
    ap.add_argument("--force", action="store_true", help="recompute even if cached")
    ap.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help=f"override a config value, e.g. --set {stage}.seed=1 (in a stage-only "
                    "YAML also --set seed=1)")
    ap.add_argument("--parent-run-id", help="MLflow run to nest under")
    a = ap.parse_args(argv)
    return run_stage_from_file(stage, a.config, a.run_dir, a.force, a.set, a.parent_run_id)
