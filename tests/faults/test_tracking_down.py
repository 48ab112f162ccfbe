"""The MLflow tracking server dies in the middle of a pipeline run.

Extends tests/flows/test_tracking.py::test_unreachable_store_spools_then_replays (one
Tracker against a closed port) to the real thing: a ``mlflow server`` that serves the
first stages and is SIGKILLed when the score stage starts. The run must finish with its
outputs, say the store is unreachable and how to send the records later; once the server
is back, ``mmemb sync`` records every stage under the pipeline's parent run, and the
parent gets its totals and final status.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from data_contracts import io
from data_contracts.schemas import SELECTIONS
from tests.faults.harness import audit, fault_env, run_cli_with, write_config

pytestmark = pytest.mark.faults
STAGES_0_3 = ("prepare", "generate", "score", "select")


def _server(store, port: int, log) -> subprocess.Popen:
    from tasks.mlflow_server import start_server, wait_healthy

    proc = start_server(store, port=port, backend_store_uri=f"sqlite:///{store}/mlflow.db",
                    log_file=log)
    wait_healthy(f"http://127.0.0.1:{port}", timeout=120, proc=proc)
    return proc


def test_store_killed_mid_run_then_sync_records_every_stage(fault_root, tmp_path, fault_log,
                                                           free_port):
    from mlflow import MlflowClient

    from tasks.mlflow_server import stop_server

    store = tmp_path / "store"
    store.mkdir()
    MlflowClient(f"sqlite:///{store}/mlflow.db").search_experiments()  # create the store
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cfg = write_config(tmp_path / "tracked.yaml",
                       generate={"shard_size": 16, "teachers": [
                           {"id": "oracle", "backend": "oracle", "k": 2}]},
                       merge_prepare={"pretrain_steps": 0},
                       merge_run={"stages": list(STAGES_0_3),
                                  "tracking": {"experiment": "mmemb-faults", "uri": uri,
                                               "log_models": "none"}})
    run = tmp_path / "run"
    server = _server(store, port, tmp_path / "server1.log")
    try:
        def kill_server():
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(30)

        r = run_cli_with([sys.executable, "-m", "flows.cli", "run", str(cfg), "--run-dir",
                          str(run)], "[score] running:", kill_server)
    finally:
        stop_server(server)
    text = r.stdout
    # the run finished, with every output, and said what happened and what to do
    assert r.returncode == 0, text[-6000:]
    for s in STAGES_0_3:
        assert f"  {s:<9} ran" in text, text[-3000:]
    assert "is unreachable" in text and f"mmemb sync --run-dir {run}" in text
    assert audit(run).broken == []
    assert io.read(run / "select" / "selections", SELECTIONS).num_rows == 120
    spooled = sorted(p.name for p in (run / "_mlflow_spool").glob("*.json"))
    assert any("-score-" in n for n in spooled) and any("-select-" in n for n in spooled)
    assert any("-pipeline-end-" in n for n in spooled), spooled
    # the store comes back (same database, same port): sync sends everything
    server = _server(store, port, tmp_path / "server2.log")
    try:
        sync = subprocess.run([sys.executable, "-m", "flows.cli", "sync", "--run-dir",
                               str(run), "--config", str(cfg)], env=fault_env(),
                              capture_output=True, text=True, timeout=300)
        assert sync.returncode == 0, sync.stdout + sync.stderr[-3000:]
        assert f"sent {len(spooled)} spooled record(s); 0 left" in sync.stdout
        assert not list((run / "_mlflow_spool").glob("*.json"))
        c = MlflowClient(uri)
        exp = c.get_experiment_by_name("mmemb-faults")
        runs = c.search_runs([exp.experiment_id])
        parent = next(x for x in runs if x.data.tags.get("mmemb.kind") == "pipeline")
        assert parent.info.status == "FINISHED"
        assert parent.data.metrics["stages_ran"] == 4.0
        children = {x.data.tags.get("mmemb.stage"): x for x in runs
                    if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        assert set(children) == set(STAGES_0_3)
        for s, x in children.items():
            assert x.info.status == "FINISHED" and x.data.metrics, s
        assert children["select"].data.metrics["pairs"] == 120
    finally:
        stop_server(server)
    fault_log.append({"kind": "mlflow-down", "where": "score", "recovered": True,
                      "rows_lost": 0, "detail": f"server SIGKILLed at score start; run "
                      f"finished, {len(spooled)} records spooled, all sent by mmemb sync"})
