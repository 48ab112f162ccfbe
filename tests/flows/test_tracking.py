"""MLflow tracking: records land in the store, secrets do not, an outage loses nothing."""

from __future__ import annotations

import json
import socket
from pathlib import Path

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
    assert "loss" not in run.data.metrics  # step curves live under curves/ only
    hist = c.get_metric_history(run_id, "curves/loss")
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
    assert len(c.get_metric_history(run.info.run_id, "curves/loss")) == 3


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
    hist = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(run_id, "curves/loss")
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


def test_gate_like_record_opens_on_curves_with_groups_as_one_table(tmp_path):
    """Per-group values leave the metrics for one table; every step metric is a curve
    under ``curves/``; summaries carry no ``/`` (one "Model metrics" section, last);
    the child is renamed by its key figure; the previews are registered as tables, once
    even when the record is sent again (a replay)."""
    import json

    from mlflow import MlflowClient

    from mmemb.previews import _BREAKDOWN, child_run_name, split_breakdown, stage_previews

    metrics = {"reward_first_quarter": -0.1, "reward_last_quarter": 0.2,
               "after/reason_ratio/all": 0.4, "after/p_think/task/t0": 0.9,
               "after/p_think/task/t1": 0.1, "before/p_think/family/easy": 0.5}
    summary, groups = split_breakdown(metrics)
    assert set(summary) == {"reward_first_quarter", "reward_last_quarter",
                            "after/reason_ratio/all"}
    assert {(g["kind"], g["group"]) for g in groups} == {("task", "t0"), ("task", "t1"),
                                                         ("family", "easy")}
    tables, others = stage_previews("gate", {}, {}, None, groups, {}, tmp_path / "ui")
    tr = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "exp", tmp_path, quiet=True)
    run_id = tr.start_run("gate")
    name = child_run_name("gate", metrics)
    assert name == "gate · reward -0.10→+0.20"
    rec = StageRecord("gate", name, run_id=run_id, metrics=summary, tables=tables,
                      step_metrics=[[1, {"reward": 0.1, "reward/cost": 0.0}],
                                    [2, {"reward": 0.2, "reward/cost": 0.1}]])
    tr.log_record(rec)
    rec.steps_logged = 2
    tr._send(rec)  # sent again, as a replay would
    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = c.get_run(run_id)
    assert run.info.run_name == name and run.info.status == "FINISHED"
    keys = set(run.data.metrics)
    assert not [k for k in keys if any(p.match(k) for p in _BREAKDOWN)]
    assert {"curves/reward", "curves/reward/cost"} <= keys
    for k in keys:
        hist = c.get_metric_history(run_id, k)
        assert k.startswith("curves/") == any(m.step >= 1 for m in hist), k
        assert k.startswith("curves/") or "/" not in k, k
    logged = json.loads(run.data.tags["mlflow.loggedArtifacts"])
    assert logged == [{"path": "ui/metrics_by_group.table.json", "type": "table"}]
    table = json.loads(open(c.download_artifacts(run_id, "ui/metrics_by_group.table.json")
                            ).read())
    assert table["columns"][:2] == ["kind", "group"] and len(table["data"]) == 3
    assert others == []


def test_logged_model_has_a_signature_and_takes_the_mode_param(tmp_path, caplog,
                                                               monkeypatch):
    """No "Failed to infer model signature"; the output is one float32 vector of the
    model's width; ``params={"mode": ...}`` reaches ``predict`` (a params schema; without
    one MLflow drops params with "Ignoring provided params")."""
    import logging

    import mlflow
    import numpy as np
    import pandas as pd

    import mmemb.inference
    import mmemb.model.embedder
    import mmemb.model.gate_settings

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "qwen2_vl", '
                                      '"text_config": {"hidden_size": 8}}')
    tr = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "exp", tmp_path, quiet=True)
    run_id = tr.start_run("train")
    with caplog.at_level(logging.INFO, logger="mlflow"):
        tr.log_record(StageRecord("train", "train", run_id=run_id,
                                  models=[{"name": "student", "path": str(ckpt)}]))
    assert not [r for r in caplog.records if "signature" in r.getMessage().lower()]
    uri = tr.client.get_run(run_id).data.tags["mmemb.model.student.uri"]

    class Out:
        def __init__(self, n, value):
            self.embeddings = np.full((n, 8), value, dtype=np.float32)

    class FakeEmbedder:
        def encode(self, inputs, mode):
            return Out(len(inputs), 0.0)

    class FakeAdaptive:
        def __init__(self, embedder, budget, threshold):
            pass

        def encode(self, inputs, mode):
            return Out(len(inputs), 1.0 if mode == "reason" else 2.0)

    class FakeGate:
        budget, threshold = 1, 0.5

        def override(self, budget, threshold):
            return self

    monkeypatch.setattr(mmemb.model.embedder.Embedder, "from_pretrained",
                        classmethod(lambda cls, path: FakeEmbedder()))
    monkeypatch.setattr(mmemb.model.gate_settings.GateSettings, "load",
                        classmethod(lambda cls, path: FakeGate()))
    monkeypatch.setattr(mmemb.inference, "AdaptiveEncoder", FakeAdaptive)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        sig = mlflow.models.get_model_info(uri).signature
        model = mlflow.pyfunc.load_model(uri)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mlflow"):
            df = pd.DataFrame({"text": ["a", "b"]})
            direct = np.asarray(model.predict(df))
            reason = np.asarray(model.predict(df, params={"mode": "reason"}))
    finally:
        mlflow.set_tracking_uri(None)
    assert sig.outputs.to_dict() == [{"type": "tensor", "tensor-spec":
                                      {"dtype": "float32", "shape": (-1, 8)}}]
    assert [c.name for c in sig.inputs.inputs] == ["text", "instruction", "image"]
    assert direct.shape == (2, 8) and (direct == 0).all()
    assert (reason == 1).all()  # mode reached predict
    assert not [r for r in caplog.records if "Ignoring" in r.getMessage()]


def test_stage_previews_register_stage_tables_and_describe_outputs(tmp_path):
    """Every output gets its first rows as a table and a README line (schema, rows, where
    the full file is); a ``*.table.json`` file a stage wrote is registered as is."""
    from mmemb.previews import stage_previews

    ref = _eval_ref(tmp_path / "ev")
    own = tmp_path / "decisions.table.json"
    own.write_text('{"columns": ["pair_id", "verdict"], "data": [["p0", "selected"]]}')
    plot = tmp_path / "hist.png"
    plot.write_bytes(b"\x89PNG fake")
    tags = {"mmemb.output.eval.logged": "by reference", "mmemb.output.eval.uri": "/big/ev"}
    tables, others = stage_previews("select", {"eval": ref.to_dict()},
                                    {"decisions": str(own), "hist": str(plot)}, None, [],
                                    tags, tmp_path / "ui")
    assert sorted(a for _, a in tables) == ["ui/decisions.table.json", "ui/eval.table.json"]
    head = json.loads(Path(dict((a, p) for p, a in tables)["ui/eval.table.json"]).read_text())
    assert head["columns"][:3] == ["row_id", "task", "suite"] and len(head["data"]) == 1
    assert head["data"][0][head["columns"].index("tgt_id")] == "[a]"  # a list (mmemb.tables.cell)
    (md, dest), = others
    text = Path(md).read_text()
    assert dest == "ui" and "kept by reference at `/big/ev`" in text and "| `row_id` |" in text
