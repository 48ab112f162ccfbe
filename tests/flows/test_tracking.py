"""MLflow tracking: records land in the store, secrets do not, an outage loses nothing."""

from __future__ import annotations

import socket

import pytest

from data_contracts import io
from data_contracts.schemas import EVAL_ROWS
from tasks.tracking import (
    REDACTED,
    StageRecord,
    Tracker,
    artifact_entries,
    dataset_entries,
    is_rank0,
    redact,
)


def test_redact_keys_urls_and_tokens():
    assert redact("teacher.api_key", "abc") == REDACTED
    assert redact("hf_token", "x") == REDACTED
    assert redact("hf_token", "None") == "None"  # unset stays visibly unset
    assert redact("uri", "postgresql://mlflow:s3cret@db:5432/mlflow") == \
        f"postgresql://mlflow:{REDACTED}@db:5432/mlflow"
    assert redact("note", "use hf_" + "a" * 30 + " here") == f"use {REDACTED} here"
    assert redact("model", "Qwen/Qwen3-VL-4B") == "Qwen/Qwen3-VL-4B"


def test_only_rank0_logs(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")
    assert not is_rank0()
    tr = Tracker(f"sqlite:///{tmp_path}/m.db", "x", tmp_path)
    assert tr.start_run("a") is None and tr.log_record(StageRecord("s", "s")) is None
    assert not (tmp_path / "m.db").exists()
    monkeypatch.setenv("RANK", "0")
    assert is_rank0()


def _eval_ref(path):
    return io.write([{"row_id": "0", "task": "t", "suite": "s", "tgt_id": ["a"],
                      "tgt_text": ["x"], "tgt_img_path": [""], "tgt_rel": [1.0]}],
                    path, EVAL_ROWS)


def _record(tmp_path, parent):
    ref = _eval_ref(tmp_path / "ev")
    plot = tmp_path / "curve.png"
    plot.write_bytes(b"\x89PNG fake")
    arts, tags = artifact_entries({"eval": ref.to_dict()}, {"curve": str(plot)}, 50)
    rec = StageRecord("train", "train", parent_run_id=parent, tags={"mmemb.stage": "train",
                                                                     **tags},
                      params={"lr": "0.001", "hub_token": "secret-value",
                              "db": "postgresql://u:pw@h/db"},
                      metrics={"final_loss": 0.5, "bad": float("nan")},
                      step_metrics=[[1, {"loss": 2.0}], [2, {"loss": 1.0}], [3, {"loss": 0.5}]],
                      datasets=dataset_entries([("eval", ref.to_dict())], "output"),
                      artifacts=arts)
    return rec, ref


def test_record_roundtrip_through_mlflow_client(tmp_path):
    from mlflow import MlflowClient

    tr = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "exp", tmp_path, quiet=True)
    parent = tr.start_run("pipe", tags={"mmemb.kind": "pipeline"})
    rec, ref = _record(tmp_path, parent)
    rec.tags["mmemb.error"] = "cannot reach postgresql://u:pw@h/db"
    run_id = tr.log_record(rec)
    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = c.get_run(run_id)
    assert run.data.tags["mmemb.error"] == f"cannot reach postgresql://u:{REDACTED}@h/db"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.001"
    assert run.data.params["hub_token"] == REDACTED
    assert run.data.params["db"] == f"postgresql://u:{REDACTED}@h/db"
    assert run.data.metrics["final_loss"] == 0.5 and "bad" not in run.data.metrics
    hist = c.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == \
        [(1, 2.0), (2, 1.0), (3, 0.5)]
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.name == "eval_rows:eval" and ds.dataset.digest == ref.digest[:32]
    assert {t.key: t.value for t in ds.tags}["mmemb.digest"] == ref.digest
    assert '"num_rows": 1' in ds.dataset.profile
    paths = {a.path for a in c.list_artifacts(run_id, "data/eval")}
    assert "data/eval/_manifest.json" in paths
    assert [a.path for a in c.list_artifacts(run_id, "files")] == ["files/curve.png"]
    # artifacts live under the run dir
    assert (tmp_path / "mlartifacts").is_dir()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_store_spools_then_replays(tmp_path, capsys):
    from mlflow import MlflowClient

    down = Tracker(f"http://127.0.0.1:{_closed_port()}", "exp", tmp_path)
    assert down.start_run("pipe") is None
    rec, _ = _record(tmp_path, None)
    assert down.log_record(rec) is None
    out = capsys.readouterr().out
    assert "unreachable" in out and "mmemb sync" in out
    spooled = list((tmp_path / "_mlflow_spool").glob("*.json"))
    assert len(spooled) == 1
    # the store comes back (here: the local SQLite store of the run dir)
    up = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "exp", tmp_path, quiet=True)
    assert up.replay() == (1, 0)
    assert not list((tmp_path / "_mlflow_spool").glob("*.json"))
    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = c.search_runs([up.experiment_id])
    assert run.data.params["hub_token"] == REDACTED
    assert len(c.get_metric_history(run.info.run_id, "loss")) == 3


@pytest.mark.parametrize("steps_live", [0, 2])
def test_live_steps_are_not_logged_twice(tmp_path, steps_live):
    from mlflow import MlflowClient

    tr = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "exp", tmp_path, quiet=True)
    run_id = tr.start_run("train")
    rec = StageRecord("train", "train", run_id=run_id,
                      step_metrics=[[1, {"loss": 2.0}], [2, {"loss": 1.0}]])
    log = tr.step_logger(run_id, rec)
    for s, m in rec.step_metrics[:steps_live]:
        log(s, m)
    assert rec.steps_logged == steps_live
    tr.log_record(rec)
    hist = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(run_id, "loss")
    assert sorted(m.step for m in hist) == [1, 2]


def test_tracking_uri_resolution(monkeypatch, tmp_path):
    from mmemb.configs.pipeline import TrackingConfig
    from tasks.tracking import default_tracking_uri, resolve_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert default_tracking_uri(tmp_path) == resolve_uri(None, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.team:5000")
    assert Tracker.from_config(TrackingConfig(), tmp_path).uri == "http://mlflow.team:5000"
    assert not Tracker.from_config(TrackingConfig(), tmp_path).is_local
    assert Tracker.from_config(TrackingConfig(uri="sqlite:///x.db"), tmp_path).uri == \
        "sqlite:///x.db"  # the config wins over the environment
