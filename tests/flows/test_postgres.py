"""A team MLflow server for real: PostgreSQL backend store, proxied artifact store, and one
stage of the pipeline logging to it over HTTP (the deploy/mlflow setup, minus S3)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PG_BIN = next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)), None)


def _as_postgres(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run a PostgreSQL tool as the 'postgres' user when we are root (initdb refuses root)."""
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture(scope="module")
def postgres(free_port):
    if PG_BIN is None:
        pytest.skip("PostgreSQL is not installed (`make test-slow` installs Debian's "
                    "postgresql with apt when it can)")
    # not under pytest's tmp dir: that one is private to root and postgres cannot enter it
    base = Path(tempfile.mkdtemp(prefix="mmemb-pg-"))
    data = base / "data"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(data, "postgres")
    port = free_port()
    _as_postgres([f"{PG_BIN}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres"])
    _as_postgres([f"{PG_BIN}/pg_ctl", "-D", str(data), "-l", str(base / "pg.log"), "-w",
                  "-o", f"-p {port} -h 127.0.0.1 -k {base}", "start"])
    try:
        _as_postgres([f"{PG_BIN}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U",
                      "postgres", "mlflow"])
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        _as_postgres([f"{PG_BIN}/pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop"])
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory, free_port):
    from tasks.mlflow_server import stop_server, wait_healthy

    art = tmp_path_factory.mktemp("artifacts")
    port = free_port()
    log = open(art.parent / "mlflow-server.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres,
         "--artifacts-destination", art.as_uri(), "--serve-artifacts", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"], start_new_session=True, stdout=log,
        stderr=log)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", timeout=180, proc=proc)
        yield {"uri": f"http://127.0.0.1:{port}", "artifacts": art, "db": postgres}
    finally:
        stop_server(proc)
        log.close()


def test_stage_logs_to_mlflow_server_on_postgres(prefect_harness, mlflow_server, tmp_path,
                                                 monkeypatch):
    import sqlalchemy
    from mlflow import MlflowClient

    from flows.prepare import flow as prepare_flow
    from tests.flows.conftest import fast_config

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["uri"])
    t0 = time.perf_counter()
    cfg = fast_config(tmp_path / "run")
    out = prepare_flow(config=cfg.prepare, run=cfg.run)
    assert out["status"] == "ran"
    client = MlflowClient(mlflow_server["uri"])
    run = client.get_run(out["mlflow_run_id"])
    assert run.info.run_name == "prepare · 120 pairs" and run.info.status == "FINISHED"
    assert run.data.metrics["pairs_rows"] == 120.0
    assert run.data.tags["mlflow.parentRunId"]  # nested under a stage-run parent
    assert {a.path for a in client.list_artifacts(run.info.run_id, "data")} == {"data/pairs",
                                                                                "data/eval"}
    # the artifacts went through the server into its artifact store, not the run dir
    assert list(mlflow_server["artifacts"].rglob("_manifest.json"))
    assert not (tmp_path / "run" / "mlflow.db").exists()
    # and the run is a row of the PostgreSQL backend store
    eng = sqlalchemy.create_engine(mlflow_server["db"])
    with eng.connect() as conn:
        rows = conn.execute(sqlalchemy.text(
            "SELECT name, status FROM runs WHERE run_uuid = :r"), {"r": run.info.run_id}).all()
        n_metric = conn.execute(sqlalchemy.text(
            "SELECT count(*) FROM latest_metrics WHERE run_uuid = :r"),
            {"r": run.info.run_id}).scalar()
    assert rows == [("prepare", "FINISHED")]
    assert n_metric == len(run.data.metrics)
    print(f"stage against MLflow-on-PostgreSQL: {time.perf_counter() - t0:.1f}s")
