"""The MLflow UI over a run directory, opened by a real headless Chromium.

The UI is a JavaScript app, so the page is rendered by the browser (``--dump-dom`` after a
virtual-time budget) and the test looks for the run names and the previews in the rendered
DOM, not in the HTML the server sends. Each page is also saved as a screenshot (a test
artifact: under the test's tmp dir and copied to ``$MMEMB_TEST_ARTIFACTS/ui`` or
``runs/test-artifacts/ui``), which is what docs/ui.md shows.

The server listens on 127.0.0.2 when the machine allows it: MLflow opens its assistant
panel (a third of the screen) on first load only for ``localhost``/``127.0.0.1``.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REPO = Path(__file__).resolve().parents[2]
QUERY = "workflowType=machine_learning"
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (`make test` installs it "
    "with apt when it can)")


def ui_host() -> str:
    """127.0.0.2 where the loopback range answers on it (Linux), else 127.0.0.1."""
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
        return "127.0.0.2"
    except OSError:
        return "127.0.0.1"


def shots_dir() -> Path:
    """Where screenshots are kept after the test (tmp dirs are pruned)."""
    base = os.environ.get("MMEMB_TEST_ARTIFACTS")
    return Path(base) / "ui" if base else REPO / "runs" / "test-artifacts" / "ui"


def render(url: str, user_dir, budget_ms: int = 15000, shot: Path | None = None) -> str:
    """Visible text of ``url`` after Chromium ran its scripts; with ``shot``, the page is
    also saved there as a PNG (same browser run) and copied to :func:`shots_dir`."""
    extra = ["--window-size=1600,1000", f"--screenshot={shot}"] if shot else []
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
         f"--user-data-dir={user_dir}", f"--virtual-time-budget={budget_ms}", *extra,
         "--dump-dom", url],
        capture_output=True, text=True, timeout=180, check=True)
    if shot is not None and shot.is_file():
        keep = shots_dir()
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy2(shot, keep / shot.name)
    dom = re.sub(r"<script.*?</script>|<style.*?</style>|<svg.*?</svg>", "", out.stdout,
                 flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)))


def serve(run_dir, log, port: int):
    """Start the MLflow UI over ``run_dir``; returns (process, base URL)."""
    from tasks.mlflow_server import start_server, wait_healthy

    host = ui_host()
    url = f"http://{host}:{port}"
    proc = start_server(run_dir, host=host, port=port, log_file=log, trust_origin=url)
    wait_healthy(url, timeout=120, proc=proc)
    return proc, url


@pytest.fixture(scope="module")
def ui(pipeline_run, tmp_path_factory, free_port):
    from tasks.mlflow_server import stop_server

    proc, url = None, None
    try:
        proc, url = serve(pipeline_run["run_dir"], tmp_path_factory.mktemp("ui") / "ui.log",
                          free_port())
        yield url
    finally:
        if proc is not None:
            stop_server(proc)
            assert proc.poll() is not None


def search_runs(ui: str, experiment_id: str) -> dict[str, dict]:
    """The runs as the UI's own REST call lists them, by id."""
    body = json.dumps({"experiment_ids": [experiment_id], "max_results": 50}).encode()
    req = urllib.request.Request(f"{ui}/ajax-api/2.0/mlflow/runs/search", data=body,
                                 headers={"Content-Type": "application/json"})
    runs = json.loads(urllib.request.urlopen(req, timeout=30).read())["runs"]
    return {r["info"]["run_id"]: r for r in runs}


def test_ui_api_lists_parent_and_child_runs(ui, pipeline_run):
    out = pipeline_run["out"]
    by_id = search_runs(ui, out["experiment_id"])
    parent = by_id[out["parent_run_id"]]
    child = by_id[out["stages"]["prepare"]["mlflow_run_id"]]
    # the parent: config name, a digest of what it computes, the start time
    assert re.fullmatch(r"t · cfg [0-9a-f]{6} · \d\d-\d\d \d\d:\d\d", parent["info"]["run_name"])
    assert child["info"]["run_name"] == "prepare · 120 pairs"
    tags = {t["key"]: t["value"] for t in child["data"]["tags"]}
    assert tags["mlflow.parentRunId"] == out["parent_run_id"] and tags["mmemb.stage"] == "prepare"
    tables = {e["path"] for e in json.loads(tags["mlflow.loggedArtifacts"])}
    assert {"ui/pairs.table.json", "ui/eval.table.json"} <= tables
    ptags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
    assert ptags["mmemb.run_name"] == "t" and "prepare" in ptags["mlflow.note.content"]
    # the link `mmemb ui` prints: the experiment's runs, in Model-training mode
    from tasks.mlflow_server import experiment_page

    assert experiment_page(ui, pipeline_run["run_dir"]) == \
        f"{ui}/#/experiments/{out['experiment_id']}/runs?{QUERY}"


def test_parent_names_tell_runs_of_one_config_apart(tmp_path):
    from tasks.parent_run import parent_run_name
    from tests.flows.conftest import fast_config

    a = fast_config(tmp_path)
    b = fast_config(tmp_path, prepare={**a.prepare.model_dump(), "size": "demo"})
    t = 1_700_000_000.0
    assert parent_run_name(a, started=t) != parent_run_name(b, started=t)
    named = parent_run_name(a, ["prepare.size=demo"], only="prepare", started=t)
    assert named.startswith("t · prepare.size=demo · only prepare · ")


@needs_chromium
def test_browser_lands_on_runs_and_shows_names_and_previews(ui, pipeline_run, tmp_path):
    """The printed links open on the runs (not the GenAI overview); the parent lists its
    child by name; the child's main artifact reads as a table, its README as text."""
    out = pipeline_run["out"]
    exp, parent = out["experiment_id"], out["parent_run_id"]
    child = out["stages"]["prepare"]["mlflow_run_id"]
    names = {i["info"]["run_id"]: i["info"]["run_name"]
             for i in search_runs(ui, exp).values()}
    prof = tmp_path / "chromium"

    def page(n: int, slug: str, frag: str) -> str:
        return render(f"{ui}/#/experiments/{exp}/{frag}?{QUERY}", prof,
                      shot=tmp_path / f"{n:02d}-prepare-{slug}.png")

    text = page(1, "experiment", "runs")
    assert "Run Name" in text and names[parent] in text and "Detect Issues" not in text
    text = page(2, "parent", f"runs/{parent}")
    assert names[parent] in text and "prepare · 120 pairs" in text  # its child run
    text = page(3, "child", f"runs/{child}")
    assert "prepare · 120 pairs" in text and "pairs_rows" in text
    text = page(4, "pairs-preview", f"runs/{child}/artifacts/ui/pairs.table.json")
    assert "View as table" in text and "pair_id" in text and "qry_text" in text
    text = page(5, "readme", f"runs/{child}/artifacts/ui/README.md")
    assert "prepare: outputs" in text and "pair_id" in text and "uploaded as" in text
    # a fresh browser on the bare experiment link (no query, as MLflow's own home page
    # links it) lands on the runs too: `mmemb ui` serves tasks/ui_app.py
    bare = render(f"{ui}/#/experiments/{exp}", tmp_path / "fresh-chromium",
                  shot=tmp_path / "06-prepare-bare-experiment.png")
    assert "Run Name" in bare and names[parent] in bare and "Detect Issues" not in bare
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "01-prepare-experiment.png", "02-prepare-parent.png", "03-prepare-child.png",
        "04-prepare-pairs-preview.png", "05-prepare-readme.png",
        "06-prepare-bare-experiment.png"]


def test_ui_app_sets_the_mode_only_in_the_page():
    """The wrapper adds its one script to the HTML page and nothing else; the setting is
    only written when the browser has none (a user's own choice is kept)."""
    import asyncio

    from tasks.ui_app import SETTING_SCRIPT, DefaultToRunsApp

    async def inner(scope, receive, send):
        kind = b"text/html" if scope["path"] == "/" else b"application/json"
        body = b"<html><head><title>x</title></head></html>" if kind == b"text/html" else b"{}"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", kind), (b"content-length",
                                                          str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def get(path):
        sent = []

        async def send(m):
            sent.append(m)

        asyncio.run(DefaultToRunsApp(inner)({"type": "http", "path": path}, None, send))
        return dict(sent[0]["headers"]), sent[1]["body"]

    headers, body = get("/")
    assert body.startswith(b"<html><head>" + SETTING_SCRIPT + b"<title>")
    assert headers[b"content-length"] == str(len(body)).encode()
    assert b"if(!localStorage.getItem(k))" in SETTING_SCRIPT
    assert get("/ajax-api/2.0/mlflow/runs/search") == ({b"content-type": b"application/json",
                                                       b"content-length": b"2"}, b"{}")
