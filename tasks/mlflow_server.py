"""The MLflow tracking server over a run directory: start it, wait until it answers, stop it.

Tracking infrastructure, not a flow: ``mmemb ui`` and the tests that drive the UI or a team
server use it. The server runs in its own session (Ctrl-C in the terminal reaches the CLI,
which then stops the server and the job runner it started: :func:`mmemb.procs.stop_tree`).
Nothing here imports MLflow (the server is a subprocess), so ``mmemb ui`` starts fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from mmemb.procs import stop_tree

#: The wait for ``/health`` (the MLflow server needed 106 s on a loaded 2-core machine).
DEFAULT_UI_TIMEOUT_S = 600


def start_server(run_dir: str | Path, host: str = "127.0.0.1", port: int = 5000,
                 backend_store_uri: str | None = None, workers: int = 1,
                 log_file: str | Path | None = None,
                 trust_origin: str | None = None) -> subprocess.Popen:
    """Start ``mlflow server`` over the run directory's store in its own session.

    ``trust_origin`` (e.g. ``http://127.0.0.2:5000``): a URL the UI is opened at besides
    MLflow's defaults (localhost and private hosts; localhost origins): accepted as a Host
    header and as the origin of the UI's own API calls, which are refused otherwise."""
    from tasks.tracking import artifact_root, default_tracking_uri

    run_dir = Path(run_dir)
    uri = backend_store_uri or default_tracking_uri(run_dir)
    if uri.startswith("sqlite:") and not (run_dir / "mlflow.db").is_file():
        raise FileNotFoundError(f"{run_dir / 'mlflow.db'}: no MLflow store here yet; run the "
                                f"pipeline first (make demo RUN={run_dir})")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
           "--default-artifact-root", artifact_root(run_dir), "--host", host,
           "--port", str(port), "--workers", str(workers)]
    if _app_installed():
        cmd += ["--app-name", UI_APP]  # opens in "Model training" mode (tasks/ui_app.py)
    if trust_origin:
        netloc = urllib.parse.urlsplit(trust_origin).netloc
        cmd += ["--allowed-hosts", f"{netloc},{netloc.split(':')[0]}",
                "--cors-allowed-origins", trust_origin.rstrip("/")]
    out = open(log_file, "ab") if log_file else None  # noqa: SIM115 - owned by the process
    return subprocess.Popen(cmd, start_new_session=True, stdout=out, stderr=out)


#: The ``mlflow.app`` entry point of :mod:`tasks.ui_app` (pyproject.toml).
UI_APP = "mmemb"


def _app_installed() -> bool:
    """True when this install registers :data:`UI_APP` (a checkout not reinstalled since
    the entry point was added serves the plain MLflow app instead)."""
    from importlib.metadata import entry_points

    return any(e.name == UI_APP for e in entry_points(group="mlflow.app"))


def stop_server(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop the server and every process it started (the job runner, its workers)."""
    stop_tree(proc, timeout)


def timeout_message(url: str, timeout: float, log_hint: str = "") -> str:
    """What to do when the server did not answer in time (it was stopped)."""
    return (f"the MLflow server at {url} did not answer {url.rstrip('/')}/health within "
            f"{timeout:.0f}s, so it was stopped. On a busy machine it can need minutes (106 s "
            f"was measured on a loaded 2-core machine): rerun with a longer wait, e.g. "
            f"mmemb ui --timeout {max(2 * int(timeout), 1200)}{log_hint}")


def wait_healthy(url: str, timeout: float | None = None,
                 proc: subprocess.Popen | None = None) -> float:
    """Wait until ``url``/health answers 200; returns the seconds it took.

    ``timeout`` (default :data:`DEFAULT_UI_TIMEOUT_S`, generous). Raises
    :class:`TimeoutError` whose message says how to wait longer, or :class:`RuntimeError`
    when ``proc`` exits first."""
    timeout = DEFAULT_UI_TIMEOUT_S if timeout is None else timeout
    t0 = time.time()
    deadline = t0 + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the MLflow server exited with status {proc.returncode} "
                               "before it answered (port in use? its output is above)")
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=2) as r:  # noqa: S310
                if r.status == 200:
                    return time.time() - t0
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(timeout_message(url, timeout))


def experiment_page(url: str, run_dir: str | Path) -> str | None:
    """The served UI's page of the run directory's experiment, on its runs in "Model
    training" mode (MLflow 3 otherwise opens the GenAI overview); None when unknown."""
    from tasks.tracking import UI_QUERY

    try:
        name = json.loads((Path(run_dir) / "_pipeline.json").read_text())["experiment"]
        q = urllib.parse.urlencode({"experiment_name": name})
        api = f"{url.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?{q}"
        with urllib.request.urlopen(api, timeout=10) as r:  # noqa: S310 - our own server
            eid = json.loads(r.read())["experiment"]["experiment_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return f"{url.rstrip('/')}/#/experiments/{eid}/runs?{UI_QUERY}"
