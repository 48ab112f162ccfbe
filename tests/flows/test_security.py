"""Security (issue 13, items 16 and 18): secrets never become flow parameters and are
redacted from everything written; trust_remote_code only as a documented top-level
option. (Item 17, the TCPStore on loopback: tests/training/test_loopback_store.py.)"""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

import pytest

from mmemb.configs.base import ConfigError
from mmemb.redact import find_secrets, redact, redact_obj, redact_text
from tests.flows.conftest import FAST_PREPARE, fast_config

# --------------------------------------------------------------------------- one per pattern

PATTERNS = {
    "url user:password": ("http://mlflow:hunter2@mlflow.example.org:5000/api",
                          "hunter2", "http://mlflow:***@mlflow.example.org:5000/api"),
    "password containing @": ("postgresql+psycopg2://mlflow:p@ss@w0rd@db:5432/mlflow",
                              "w0rd", "postgresql+psycopg2://mlflow:***@db:5432/mlflow"),
    "token as the URL's user": ("git clone https://ghx7Ktq2Zr9LmWp4Vn8Yc3@github.com/o/r.git",
                                "ghx7Ktq2Zr9LmWp4Vn8Yc3", "git clone https://***@github.com/o/r.git"),
    "known token shape as the URL's user": (
        "https://hf_AbCdEfGhIjKlMnOpQrStUvWx12@huggingface.co/m", "hf_AbCdEf",
        "https://***@huggingface.co/m"),
    "ADO/ODBC connection string": (
        "Server=db;Database=mlflow;User Id=sa;Password=Tr0ub4dor&3;Encrypt=yes",
        "Tr0ub4dor&3", "Server=db;Database=mlflow;User Id=sa;Password=***;Encrypt=yes"),
    "libpq connection string": ("host=db port=5432 user=mlflow password=s3cretpw dbname=m",
                                "s3cretpw", "host=db port=5432 user=mlflow password=*** dbname=m"),
    "URL query credential": ("https://acct.blob.core.windows.net/c?sv=2024&sig=Zm9vYmFy%3D&se=1",
                             "Zm9vYmFy", "https://acct.blob.core.windows.net/c?sv=2024&sig=***&se=1"),
    "Azure AccountKey": ("DefaultEndpointsProtocol=https;AccountName=a;AccountKey=q83+/z==;",
                         "q83+/z", "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=***;"),
    "*_KEY= value": ("export AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG && run",
                     "wJalrXUtnFEMI", "export AWS_SECRET_ACCESS_KEY=*** && run"),
    "*_KEY= short value": ("MY_KEY=1234 other", "1234", "MY_KEY=*** other"),
    "*_TOKEN= value": ("HF_TOKEN='abc def' next", "abc def", "HF_TOKEN=*** next"),
    "bare token shape": ("using ghp_0123456789abcdefghijABCDEFGHIJ now", "ghp_0123",
                         "using *** now"),
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_redaction_pattern(name):
    text, secret, want = PATTERNS[name]
    assert redact_text(text) == want
    assert secret not in redact_text(text)


@pytest.mark.parametrize("text", [
    "sqlite:////tmp/run/mlflow.db", "http://127.0.0.1:5000/#/experiments/1/runs/ab12",
    "https://bob@host/x", "max_tokens=96 n_gen_tokens=3", "s3://mlflow/artifacts",
    "runs/demo/score/scores", "Qwen/Qwen3-VL-4B-Instruct"])
def test_what_is_not_a_secret_is_left_alone(text):
    assert redact_text(text) == text


def test_key_names_hide_values_but_not_counts_or_references():
    assert redact("launch.train.env.HF_TOKEN", "abc") == "***"
    assert redact("launch.train.env.WANDB_API_KEY", "abc") == "***"
    assert redact("x.MY_KEY", "abc") == "***"
    assert redact("generate.teachers.0.sampling.max_tokens", "96") == "96"
    assert redact("embedding.think_token", "<think>") == "<think>"
    assert redact("launch.train.env.HF_TOKEN", "${HF_TOKEN}") == "${HF_TOKEN}"


# --------------------------------------------------------------------------- written files

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SECRET_PW = "pa@ssw0rd-xyz"


def _leaks(text: str) -> list[str]:
    return [s for s in ("ssw0rd-xyz", "hf_SECRETsecretSECRETsecret12", "wJalrXUtnFEMI",
                        "Tr0ub4dor") if s in text]


def test_spool_file_is_redacted(tmp_path):
    from tasks.tracking import StageRecord, Tracker

    tr = Tracker(f"http://mlflow:{SECRET_PW}@127.0.0.1:{_closed_port()}", "e", tmp_path,
                 quiet=True)
    rec = StageRecord("score", "score", params={
        "x.uri": f"postgresql://u:{SECRET_PW}@db/m",
        "env.HF_TOKEN": "hf_SECRETsecretSECRETsecret12",
        "note": "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI"},
        tags={"mmemb.error": "Server=db;Password=Tr0ub4dor;"})
    assert tr.log_record(rec) is None  # unreachable: spooled
    (spooled,) = (tmp_path / "_mlflow_spool").glob("*.json")
    text = spooled.read_text()
    assert _leaks(text) == []
    body = json.loads(text)
    assert body["uri"] == f"http://mlflow:***@127.0.0.1:{tr.uri.rsplit(':', 1)[1]}"
    assert body["record"]["params"]["env.HF_TOKEN"] == "***"
    assert tr.offline_reason is not None and _leaks(tr.offline_reason) == []


def test_redact_obj_walks_nested_structures():
    obj = {"a": [f"http://u:{SECRET_PW}@h/x", {"HF_TOKEN": "abc", "n": 3}]}
    assert redact_obj(obj) == {"a": ["http://u:***@h/x", {"HF_TOKEN": "***", "n": 3}]}


def test_prefect_run_loggers_redact(caplog):
    from tasks.tracking import install_log_redaction

    install_log_redaction()
    lg = logging.getLogger("prefect.flow_runs")
    with caplog.at_level(logging.INFO, logger="prefect.flow_runs"):
        lg.info("store %s is down", f"http://mlflow:{SECRET_PW}@h:5000")
    assert caplog.records[-1].getMessage() == "store http://mlflow:***@h:5000 is down"


# --------------------------------------------------------------------------- never parameters

def test_config_refuses_secret_values_and_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"launch\.train\.env\.HF_TOKEN: holds a secret"):
        fast_config(tmp_path, launch={"train": {"env": {"HF_TOKEN": "abc123"}}})
    with pytest.raises(ConfigError, match=r"run\.tracking\.uri: holds a secret"):
        fast_config(tmp_path, run={"run_dir": str(tmp_path), "stages": ["prepare"],
                                   "tracking": {"uri": f"http://u:{SECRET_PW}@h"}})
    cfg = fast_config(tmp_path, launch={"train": {"env": {"HF_TOKEN": "${HF_TOKEN}",
                                                           "OMP_NUM_THREADS": "2"}}})
    assert find_secrets(cfg.model_dump(mode="json")) == []


def test_launch_env_references_are_expanded_at_launch(monkeypatch):
    from mmemb.configs.pipeline import LaunchConfig
    from tasks.launch import _env

    monkeypatch.setenv("HF_TOKEN", "hf_SECRETsecretSECRETsecret12")
    env = _env(LaunchConfig(env={"HF_TOKEN": "${HF_TOKEN}", "A": "1"}), None)
    assert env["HF_TOKEN"] == "hf_SECRETsecretSECRETsecret12" and env["A"] == "1"
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ConfigError, match=r"HF_TOKEN='\$\{HF_TOKEN\}' refers to an "
                       "environment variable that is not set"):
        _env(LaunchConfig(env={"HF_TOKEN": "${HF_TOKEN}"}), None)


def test_run_refuses_a_secret_before_prefect_stores_it(tmp_path, capsys):
    from flows.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"run": {"run_dir": str(tmp_path / "r"), "stages": ["prepare"]},
                               "prepare": FAST_PREPARE,
                               "launch": {"prepare": {"env": {"WANDB_API_KEY": "k-123"}}}}))
    assert main(["run", str(cfg), "--skip-preflight"]) == 2
    err = capsys.readouterr().err
    assert "launch.prepare.env.WANDB_API_KEY: holds a secret" in err and "k-123" not in err
    assert not (tmp_path / "r" / ".prefect").exists()  # no flow run was created


def test_stage_command_refuses_a_secret_too(tmp_path, capsys):
    from flows.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"run": {"run_dir": str(tmp_path / "r")},
                               "prepare": {**FAST_PREPARE, "out": "s3://u:hunter2@h/x"}}))
    assert main(["stage", "prepare", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "prepare.out: holds a secret" in err and "hunter2" not in err


def test_unfilled_deployment_template_is_refused(monkeypatch, tmp_path):
    from tasks.tracking import resolve_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "{{ $MLFLOW_TRACKING_URI }}")
    with pytest.raises(ConfigError, match="unfilled template"):
        resolve_uri(None, tmp_path)
    monkeypatch.setenv("MLFLOW_URI_X", "http://mlflow.test:5000")
    assert resolve_uri("${MLFLOW_URI_X}", tmp_path) == "http://mlflow.test:5000"


def test_pipeline_writes_no_secret_anywhere(prefect_harness, tmp_path, monkeypatch):
    """A tracking URI whose password holds '@', from the environment, with the store down:
    the spool, summary.txt, _pipeline.json, the flow run's parameters and its logs in
    Prefect's database hold no part of the password."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter

    from flows.pipeline import pipeline

    monkeypatch.setenv("MLFLOW_TRACKING_URI",
                       f"http://mlflow:{SECRET_PW}@127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETsecretSECRETsecret12")
    run = tmp_path / "run"
    cfg = fast_config(run, launch={"prepare": {"env": {"HF_TOKEN": "${HF_TOKEN}"}}})
    out = pipeline(cfg)
    assert out["stages"]["prepare"]["status"] == "ran"
    written = {p: p.read_text() for p in [run / "summary.txt", run / "_pipeline.json",
                                          *(run / "_mlflow_spool").glob("*.json")]}
    assert len(written) >= 3  # the parent's and the stage's records were spooled
    assert {str(p): _leaks(t) for p, t in written.items() if _leaks(t)} == {}
    assert "mlflow:***@127.0.0.1" in written[run / "_pipeline.json"]
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # logs are sent in batches, in the background
    with get_client(sync_client=True) as c:
        runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[_flow_run_id(run)])))
        params = json.dumps(runs[0].parameters, default=str)
        deadline = time.time() + 30
        while True:
            logs = "\n".join(lg.message for lg in c.read_logs(LogFilter(
                flow_run_id={"any_": [runs[0].id]})))
            if "unreachable" in logs or time.time() > deadline:
                break
            time.sleep(0.5)
    assert "${HF_TOKEN}" in params and _leaks(params) == []
    assert "unreachable" in logs and _leaks(logs) == []


def _flow_run_id(run: Path) -> str:
    for f in (run / "_mlflow_spool").glob("*.json"):
        tags = json.loads(f.read_text())["record"]["tags"]
        if tags.get("prefect.flow_run_id"):
            return tags["prefect.flow_run_id"]
    raise AssertionError("no spooled record carries the flow run id")


# --------------------------------------------------------------------------- item 18

def test_trust_remote_code_only_as_a_top_level_option():
    from mmemb.configs.gate import GateConfig
    from mmemb.configs.generate import TeacherConfig

    t = TeacherConfig(id="t", model="m", trust_remote_code=True)
    assert t.trust_remote_code is True and "trust_remote_code" in \
        TeacherConfig.model_fields["trust_remote_code"].description
    assert TeacherConfig(id="t", model="m").trust_remote_code is False
    with pytest.raises(ValueError, match="engine_kwargs.trust_remote_code is refused"):
        TeacherConfig(id="t", model="m", engine_kwargs={"trust_remote_code": True})
    with pytest.raises(ValueError, match="vllm_engine_kwargs.trust_remote_code is refused"):
        GateConfig(model="m", data="d", out="o",
                   vllm_engine_kwargs={"trust_remote_code": True})


def test_teacher_engine_gets_the_top_level_trust_remote_code(monkeypatch, tiny_model):
    import sys
    import types

    from mmemb.configs.generate import TeacherConfig
    from mmemb.teachers import vllm as tv

    seen = {}

    class FakeLLM:
        def __init__(self, **kw):
            seen.update(kw)

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM))
    monkeypatch.setattr(tv, "check_model", lambda *a, **k: None)
    monkeypatch.setattr(tv, "prepare_environment", lambda: None)
    m = str(tiny_model)
    tv.start_engine(TeacherConfig(id="t", model=m), seed=0, log=lambda *_: None)
    assert seen["trust_remote_code"] is False
    tv.start_engine(TeacherConfig(id="t", model=m, trust_remote_code=True), seed=0,
                    log=lambda *_: None)
    assert seen["trust_remote_code"] is True
