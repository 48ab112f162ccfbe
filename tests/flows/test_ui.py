"""The MLflow UI over a run directory, opened by a real headless Chromium.

The UI is a JavaScript app, so the page is rendered by the browser (``--dump-dom`` after a
virtual-time budget) and the test looks for the experiment and run names in the rendered
DOM, not in the HTML the server sends. The REST call the UI itself makes lists the runs.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import urllib.request

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def render(url: str, user_dir, budget_ms: int = 15000) -> str:
    """Visible text of ``url`` after Chromium ran its scripts."""
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={user_dir}",
         f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
        capture_output=True, text=True, timeout=180, check=True)
    dom = re.sub(r"<script.*?</script>|<style.*?</style>|<svg.*?</svg>", "", out.stdout,
                 flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)))


@pytest.fixture(scope="module")
def ui(pipeline_run, tmp_path_factory, free_port):
    from tasks.mlflow_server import start_server, stop_server, wait_healthy

    port = free_port()
    log = tmp_path_factory.mktemp("ui") / "ui.log"
    proc = start_server(pipeline_run["run_dir"], port=port, log_file=log)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", timeout=120, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(proc)
        assert proc.poll() is not None


def test_ui_api_lists_parent_and_child_runs(ui, pipeline_run):
    out = pipeline_run["out"]
    body = json.dumps({"experiment_ids": [out["experiment_id"]], "max_results": 50}).encode()
    req = urllib.request.Request(f"{ui}/ajax-api/2.0/mlflow/runs/search", data=body,
                                 headers={"Content-Type": "application/json"})
    runs = json.loads(urllib.request.urlopen(req, timeout=30).read())["runs"]
    by_id = {r["info"]["run_id"]: r for r in runs}
    parent = by_id[out["parent_run_id"]]
    child = by_id[out["stages"]["prepare"]["mlflow_run_id"]]
    assert parent["info"]["run_name"] == "t" and child["info"]["run_name"] == "prepare"
    tags = {t["key"]: t["value"] for t in child["data"]["tags"]}
    assert tags["mlflow.parentRunId"] == out["parent_run_id"]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                    "(`make test` installs it with apt when it can)")
def test_browser_renders_experiment_and_runs(ui, pipeline_run, tmp_path):
    out = pipeline_run["out"]
    exp = out["experiment_id"]
    child = out["stages"]["prepare"]["mlflow_run_id"]
    text = render(f"{ui}/#/experiments/{exp}/runs/{child}", tmp_path / "chromium")
    assert "mmemb-test" in text  # the experiment (breadcrumb)
    assert re.search(r"\bprepare\b", text)  # the stage's run name in the header
    assert "pairs_rows" in text and "120" in text  # one of its metrics, rendered
