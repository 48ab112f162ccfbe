"""The MLflow UI after `make demo`, in a real headless Chromium: every stage's page.

Opens the experiment (it must land on the runs), the parent run (it must list every child
by name) and each stage's child run: the preview of the stage's main artifact must be in
the rendered page, and the training stages' metrics page must open on their curves, not
on per-task bars. One screenshot per page (the ones docs/ui.md shows). Slow: it needs the
whole demo; set ``MMEMB_DEMO_RUN_DIR`` to a finished demo run directory to reuse one.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "flows"))
from test_ui import CHROMIUM, QUERY, render, search_runs, serve  # noqa: E402

STAGES = ("prepare", "generate", "score", "select", "train", "gate", "evaluate")
#: Per stage: the preview tables to try, in order (the first the run has is opened), and
#: the column names that must show in it. select and evaluate write their own tables;
#: older stage code has only the first rows of its outputs.
MAIN_PREVIEW = {
    "prepare": (["pairs"], ["pair_id", "qry_text"]),
    "generate": (["rationales_by_teacher"], ["teacher_id", "status", "text"]),
    "score": (["delta_extremes"], ["delta", "rationale"]),
    "select": (["decisions", "selections"], ["pair_id"]),
    "train": (["metrics_by_group"], ["kind", "group"]),
    "gate": (["metrics_by_group"], ["kind", "group"]),
    "evaluate": (["per_task", "results"], ["task"]),
}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A finished demo run directory: ``MMEMB_DEMO_RUN_DIR``, or `make demo` now."""
    given = os.environ.get("MMEMB_DEMO_RUN_DIR")
    if given:
        return Path(given)
    from test_demo import _mmemb

    base = tmp_path_factory.mktemp("uidemo")
    out, _ = _mmemb(["run", "configs/demo.yaml", "--run-dir", str(base / "run")],
                    base / "prefect", timeout=3600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return base / "run"


@pytest.fixture(scope="module")
def demo_ui(demo_run, tmp_path_factory, free_port):
    from tasks.mlflow_server import stop_server

    proc, url = serve(demo_run, tmp_path_factory.mktemp("uidemo-log") / "ui.log", free_port())
    try:
        yield url
    finally:
        stop_server(proc)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_every_stage_reads_in_the_ui(demo_run, demo_ui, tmp_path):
    from tasks.cache import read_state

    state = json.loads((demo_run / "_pipeline.json").read_text())
    parent = state["parent_run_id"]
    child = {s: read_state(demo_run, s)["mlflow_run_id"] for s in STAGES}
    exp = _experiment_id(demo_ui, state["experiment"])
    runs = search_runs(demo_ui, exp)
    names = {rid: r["info"]["run_name"] for rid, r in runs.items()}
    prof = tmp_path / "chromium"

    def page(slug: str, frag: str, budget_ms: int = 15000) -> str:
        return render(f"{demo_ui}/#/experiments/{exp}/{frag}?{QUERY}", prof, budget_ms,
                      shot=tmp_path / f"demo-{slug}.png")

    text = page("00-experiment", "runs")
    assert "Run Name" in text and names[parent] in text and "Detect Issues" not in text
    text = page("01-parent", f"runs/{parent}")
    for s in STAGES:
        assert names[child[s]].startswith(f"{s} · ") and names[child[s]] in text, s
    for i, s in enumerate(STAGES, start=2):
        tags = {t["key"]: t["value"] for t in runs[child[s]]["data"]["tags"]}
        tables = {e["path"] for e in json.loads(tags.get("mlflow.loggedArtifacts", "[]"))}
        names_tried, columns = MAIN_PREVIEW[s]
        main = next(f"ui/{n}.table.json" for n in names_tried
                    if f"ui/{n}.table.json" in tables)
        text = page(f"{i:02d}-{s}", f"runs/{child[s]}/artifacts/{main}")
        assert names[child[s]] in text and "View as table" in text, s
        for col in columns:
            assert col in text, (s, col)
    for s in ("train", "gate"):
        text = page(f"metrics-{s}", f"runs/{child[s]}/model-metrics", budget_ms=30000)
        # section titles ("curves (13)"); the tab bar also says "Model metrics"
        sections = re.findall(r"([\w./]+|Model metrics) \(\d+\)", text)
        assert sections and sections[0] == "curves", (s, sections)  # opens on the curves
        assert sections[-1] == "Model metrics" or "Model metrics" not in sections, s
        assert "p_think/task" not in text and "hit_1/" not in text, s


def _experiment_id(ui: str, name: str) -> str:
    import urllib.parse
    import urllib.request

    q = urllib.parse.urlencode({"experiment_name": name})
    with urllib.request.urlopen(f"{ui}/ajax-api/2.0/mlflow/experiments/get-by-name?{q}",
                                timeout=30) as r:
        return json.loads(r.read())["experiment"]["experiment_id"]
