"""The Prefect flows for real (test harness): payloads, MLflow nesting and links, the stage
cache across flow runs, --from/--only/--force, retries, launching."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from tests.flows.conftest import fast_config


def _client(run_dir):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{Path(run_dir).resolve()}/mlflow.db")


def _runs(run_dir, experiment="mmemb-test"):
    c = _client(run_dir)
    exp = c.get_experiment_by_name(experiment)
    return c, c.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_pipeline_payload_is_small_references(pipeline_run):
    out = pipeline_run["out"]
    p = out["stages"]["prepare"]
    assert p["status"] == "ran"
    assert set(p["outputs"]) == {"pairs", "eval"}
    # smoke size: 5 tasks x 24 pairs, 5 tasks x 12 eval rows
    assert p["outputs"]["pairs"]["rows"] == 120 and p["outputs"]["eval"]["rows"] == 60
    assert set(p["outputs"]["pairs"]) == {"uri", "contract", "schema_version", "rows",
                                          "digest"}
    assert p["metrics"]["pairs_rows"] == 120.0
    assert len(json.dumps(out, default=str)) < 20_000  # references, never data
    assert (pipeline_run["run_dir"] / "prepare" / "_stage.json").is_file()
    assert "prepare" in (pipeline_run["run_dir"] / "summary.txt").read_text()


def test_mlflow_parent_child_and_links_both_ways(pipeline_run):
    from prefect.client.orchestration import get_client

    run_dir, out = pipeline_run["run_dir"], pipeline_run["out"]
    c, runs = _runs(run_dir)
    parent = c.get_run(out["parent_run_id"])
    assert parent.data.tags["mmemb.kind"] == "pipeline" and parent.info.status == "FINISHED"
    assert parent.data.params["prepare.size"] == "smoke"
    assert parent.data.metrics["stages_ran"] == 1.0
    child = c.get_run(out["stages"]["prepare"]["mlflow_run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.info.run_name == "prepare · 120 pairs"  # the stage and its key figure
    assert child.data.metrics["pairs_rows"] == 120.0
    assert child.data.params["size"] == "smoke" and child.data.params["pretrain_steps"] == "0"
    names = {d.dataset.name for d in child.inputs.dataset_inputs}
    assert names == {"pairs:pairs", "eval_rows:eval"}
    assert {a.path for a in c.list_artifacts(child.info.run_id, "data")} == {"data/pairs",
                                                                             "data/eval"}
    assert child.data.tags["mmemb.model.base.uri"].startswith("models:/")
    # MLflow -> Prefect
    flow_run_id = child.data.tags["prefect.flow_run_id"]
    assert parent.data.tags["prefect.flow_run_id"] == flow_run_id
    assert child.data.tags["prefect.task_run_id"]
    # Prefect -> MLflow: labels on the flow run and a link artifact per stage
    with get_client(sync_client=True) as pc:
        fr = pc.read_flow_run(flow_run_id)
        assert fr.labels["mlflow.run_id"] == parent.info.run_id
        arts = pc.read_artifacts()
    links = {a.key: a.data for a in arts if a.key and a.key.startswith("mlflow-")}
    assert child.info.run_id in links["mlflow-prepare"]
    assert parent.info.run_id in links["mlflow-pipeline"]


def test_rerun_reuses_cache_then_force_only_from(pipeline_run):
    from flows.pipeline import pipeline

    run_dir, cfg = pipeline_run["run_dir"], pipeline_run["config"]
    first = pipeline_run["out"]["stages"]["prepare"]
    model = run_dir / "base_model" / "model.safetensors"
    mtime = model.stat().st_mtime_ns
    again = pipeline(cfg)["stages"]["prepare"]
    assert again["status"] == "cached" and again["key"] == first["key"]
    assert again["outputs"] == first["outputs"]
    assert model.stat().st_mtime_ns == mtime  # nothing recomputed
    c = _client(run_dir)
    cached_child = c.get_run(again["mlflow_run_id"])
    assert cached_child.data.tags["mmemb.cached"] == "true"
    assert cached_child.data.tags["mmemb.cached_from_run"] == first["mlflow_run_id"]
    forced = pipeline(cfg, force=["prepare"])["stages"]["prepare"]
    assert forced["status"] == "ran"
    assert model.stat().st_mtime_ns != mtime
    # deterministic: the recomputed artifacts have the same content digests
    assert {k: v["digest"] for k, v in forced["outputs"].items()} == \
        {k: v["digest"] for k, v in first["outputs"].items()}
    assert pipeline(cfg, only="prepare")["stages"]["prepare"]["status"] == "ran"
    assert pipeline(cfg, from_stage="prepare")["stages"]["prepare"]["status"] == "ran"


def test_changed_config_recomputes(pipeline_run, tmp_path):
    from flows.pipeline import pipeline, plan

    cfg = fast_config(tmp_path / "r")
    a = pipeline(cfg)["stages"]["prepare"]
    cfg2 = fast_config(tmp_path / "r", prepare={"size": "smoke", "pretrain_steps": 0,
                                                "seed": 1})
    b = pipeline(cfg2)["stages"]["prepare"]
    assert b["status"] == "ran" and b["key"] != a["key"]
    assert b["outputs"]["pairs"]["digest"] != a["outputs"]["pairs"]["digest"]
    assert plan(cfg2, from_stage="prepare") == [("prepare", True)]


def test_stage_flow_alone_nests_under_the_last_pipeline(pipeline_run):
    from flows.prepare import flow as prepare_flow

    run_dir, cfg = pipeline_run["run_dir"], pipeline_run["config"]
    last_parent = json.loads((run_dir / "_pipeline.json").read_text())["parent_run_id"]
    out = prepare_flow(config=cfg.prepare, run=cfg.run)
    assert out["status"] == "cached"
    child = _client(run_dir).get_run(out["mlflow_run_id"])
    assert child.data.tags["mlflow.parentRunId"] == last_parent


def test_bad_input_fails_once_without_retry(prefect_harness, tmp_path, monkeypatch):
    from data_contracts.io import ContractError
    from flows.pipeline import pipeline
    from tasks import stages

    calls = []
    real = stages.call_stage
    monkeypatch.setattr(stages, "call_stage", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = fast_config(tmp_path / "r", prepare={"source": "existing", "model": str(tmp_path),
                                               "pairs": str(tmp_path / "nope.parquet")},
                      launch={"prepare": {"retries": 3, "retry_delay_s": 0}})
    with pytest.raises(ContractError, match="nope.parquet"):
        pipeline(cfg)
    assert len(calls) == 1
    c, runs = _runs(tmp_path / "r")
    failed = [r for r in runs if r.info.run_name == "prepare"]
    assert failed[0].info.status == "FAILED"
    assert failed[0].data.tags["mmemb.transient"] == "False"


def test_transient_io_error_is_retried(prefect_harness, tmp_path, monkeypatch):
    from flows.pipeline import pipeline
    from tasks import stages

    calls = []
    real = stages.call_stage

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error (injected)")
        return real(*a, **k)

    monkeypatch.setattr(stages, "call_stage", flaky)
    cfg = fast_config(tmp_path / "r", launch={"prepare": {"retries": 2, "retry_delay_s": 0}})
    assert pipeline(cfg)["stages"]["prepare"]["status"] == "ran"
    assert len(calls) == 2


def test_is_transient_policy():
    from data_contracts.io import ContractError
    from mmemb.configs.base import ConfigError
    from tasks.launch import StageFailed, is_transient

    assert not is_transient(ContractError("f", "bad"))
    assert not is_transient(ConfigError("bad"))
    assert not is_transient(ValueError("bad"))
    assert not is_transient(FileNotFoundError(2, "missing"))
    assert not is_transient(OSError(errno.ENOSPC, "disk full"))
    assert is_transient(OSError(errno.EIO, "io"))
    assert is_transient(ConnectionResetError())
    assert is_transient(RuntimeError("Engine core initialization failed. See root cause"))
    assert not is_transient(RuntimeError("shape mismatch"))
    assert is_transient(StageFailed("x", transient=True))


def test_missing_input_names_the_stage_to_run_first(tmp_path):
    from tasks.stages import MissingInput, execute_stage

    cfg = fast_config(tmp_path / "r", stages=("prepare", "gate"))
    with pytest.raises(MissingInput) as e:
        execute_stage(cfg, "gate")
    assert "gate.model does not exist" in str(e.value)
    assert "run stage 'train' first" in str(e.value)


def test_subprocess_launcher_runs_the_stage_in_a_worker(tmp_path):
    from tasks.launch import build_command
    from tasks.stages import execute_stage
    from tasks.tracking import Tracker

    cfg = fast_config(tmp_path / "r", launch={"prepare": {"launcher": "subprocess"}})
    tr = Tracker.from_config(cfg.run.tracking, cfg.run_dir, quiet=True)
    out = execute_stage(cfg, "prepare", tracker=tr)
    assert out["status"] == "ran" and out["outputs"]["pairs"]["rows"] == 120
    assert (cfg.run_dir / "prepare" / "_launch_result.json").is_file()
    run = _client(cfg.run_dir).get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["eval_rows"] == 60.0
    cmd = build_command(cfg.launch_for("prepare"), "prepare", Path("c.yaml"), Path("r.json"))
    assert cmd[1:] == ["-m", "tasks.worker", "--stage", "prepare", "--config", "c.yaml",
                       "--result", "r.json"]


def test_cluster_launch_commands():
    from mmemb.configs.pipeline import LaunchConfig
    from tasks.launch import build_command

    tr = build_command(LaunchConfig(launcher="torchrun", nnodes=2, nproc_per_node=8,
                                    rdzv_endpoint="node0:29400", prefix=["srun", "--nodes=2"]),
                       "train", Path("c.yaml"), Path("r.json"), python="py")
    assert tr[:2] == ["srun", "--nodes=2"]
    assert tr[2:9] == ["py", "-m", "torch.distributed.run", "--nnodes=2",
                       "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29400"]
    assert tr[-6:] == ["--stage", "train", "--config", "c.yaml", "--result", "r.json"]
    ds = build_command(LaunchConfig(launcher="deepspeed", nnodes=2, nproc_per_node=8,
                                    hostfile="/etc/hosts.ds", master_addr="node0"),
                       "gate", Path("c.yaml"), Path("r.json"), python="py")
    assert ds[:6] == ["py", "-m", "deepspeed.launcher.runner", "--hostfile", "/etc/hosts.ds",
                      "--num_nodes=2"]
    assert "--master_addr=node0" in ds and ds[ds.index("--module") + 1] == "tasks.worker"
