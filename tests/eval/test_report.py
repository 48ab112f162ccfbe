import json

import pytest

from mmemb.eval.baseline import load_baseline
from mmemb.eval.metrics import aggregate
from mmemb.eval.report import (
    markdown_report,
    mode_summary,
    plot_accuracy_latency,
    reasoning_report,
)
from mmemb.eval.tasks import select_tasks


@pytest.fixture
def agg():
    value = {"image": 0.649, "video": 0.346, "visdoc": 0.692}
    return aggregate(
        {
            "task": s.name,
            "modality": s.modality,
            "category": s.category,
            "metric": s.metric,
            "score": value[s.modality],
            "suite": s.suite,
        }
        for s in select_tasks()
    )


def test_markdown_report_has_metric_beside_numbers(agg):
    md = markdown_report(agg)
    assert "| 78 | 59.2 (hit@1/ndcg@5) |" in md
    assert "| image | 36 | 64.9 (hit@1) |" in md
    assert "| visdoc | ViDoRe-v1 | 10 | 69.2 (ndcg@5) |" in md
    assert "| CIRR | image | RET | 64.9 (hit@1) |" in md
    assert "Partial run" not in md and "baseline" not in md


def test_markdown_report_with_baseline(agg):
    md = markdown_report(agg, baseline={"CIRR": 0.6, "MSR-VTT": 0.4, "Other": 0.1})
    assert "| task | modality | category | ours | baseline | diff |" in md
    assert "| CIRR | image | RET | 64.9 (hit@1) | 60.0 (hit@1) | +4.9 |" in md
    assert "| MSR-VTT | video | RET | 34.6 (hit@1) | 40.0 (hit@1) | -5.4 |" in md
    assert "| OK-VQA | image | QA | 64.9 (hit@1) | — | — |" in md
    assert "— (1/12 tasks)" in md  # image RET group mean is not comparable
    assert "Baseline tasks without our result: Other" in md


def test_group_baseline_when_complete():
    a = aggregate(
        [
            {"task": t, "modality": "image", "category": "GD", "metric": "hit@1", "score": 0.5}
            for t in ("MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing")
        ]
    )
    md = markdown_report(
        a,
        baseline={"MSCOCO": 0.2, "RefCOCO": 0.4, "RefCOCO-Matching": 0.6, "Visual7W-Pointing": 0.8},
    )
    assert "| image | GD | 4 | 50.0 (hit@1) | 50.0 (hit@1) | +0.0 |" in md
    assert "Partial run" in md


def test_load_baseline_csv_and_json(tmp_path):
    p = tmp_path / "b.csv"
    p.write_text("# paper table\ntask,score,metric\nCIRR,60.0,hit@1\n\nMSR-VTT,40,hit@1\n")
    assert load_baseline(p) == {"CIRR": 0.6, "MSR-VTT": 0.4}
    j = tmp_path / "b.json"
    j.write_text(json.dumps({"CIRR": 0.6, "MSR-VTT": 0.4}))
    assert load_baseline(j) == {"CIRR": 0.6, "MSR-VTT": 0.4}
    assert load_baseline(j, scale="percent") == {"CIRR": 0.006, "MSR-VTT": 0.004}


def test_load_baseline_errors_name_file_and_line(tmp_path):
    p = tmp_path / "b.csv"
    p.write_text("task,score\nCIRR,60\nNIGHTS,abc\n")
    with pytest.raises(ValueError, match=r"b\.csv:3: task 'NIGHTS': score 'abc' is not a num"):
        load_baseline(p)
    p.write_text("task,score\nCIRR,60\nCIRR,61\n")
    with pytest.raises(ValueError, match=r"b\.csv:3: duplicate task 'CIRR' \(first on line 2"):
        load_baseline(p)
    p.write_text("name,value\nCIRR,60\n")
    with pytest.raises(ValueError, match=r"b\.csv:1: header needs"):
        load_baseline(p)
    j = tmp_path / "b.json"
    j.write_text('{\n  "CIRR": 60,\n  "NIGHTS": "x"\n}\n')
    with pytest.raises(ValueError, match=r"b\.json:3: task 'NIGHTS'"):
        load_baseline(j)
    j.write_text('{\n  "CIRR": 60,\n}\n')
    with pytest.raises(ValueError, match=r"b\.json:3: invalid JSON"):
        load_baseline(j)
    j.write_text('{"CIRR": 160}')
    with pytest.raises(ValueError, match=r"b\.json:1: .* > 100"):
        load_baseline(j)


def _rows():
    rows = []
    for i, lat in enumerate([10.0, 20.0, 30.0, 40.0]):
        rows.append(
            {
                "mode": "adaptive",
                "task": "CIRR" if i < 2 else "MSR-VTT",
                "reasoned": i % 2 == 0,
                "tokens": 8 * (i % 2 == 0),
                "latency_ms": lat,
            }
        )
    rows.append(
        {"mode": "direct", "task": "CIRR", "reasoned": False, "tokens": 0, "latency_ms": 5.0}
    )
    return rows


def test_mode_summary_percentiles():
    s = {r["mode"]: r for r in mode_summary(_rows())}
    a = s["adaptive"]
    # latencies 10,20,30,40: mean 25, p50 25, p95 = 10 + 0.95*3*10 = 38.5 (linear interpolation)
    assert (a["n"], a["reasoning_ratio"], a["mean_tokens"]) == (4, 0.5, 4.0)
    assert (a["latency_mean_ms"], a["latency_p50_ms"], a["latency_p95_ms"]) == pytest.approx(
        (25.0, 25.0, 38.5)
    )
    assert s["direct"]["reasoning_ratio"] == 0.0
    with pytest.raises(ValueError, match=r"row 0: missing \['latency_ms'\]"):
        mode_summary([{"mode": "a", "task": "CIRR", "reasoned": True, "tokens": 1}])


def test_reasoning_report_tables(agg):
    md = reasoning_report(_rows())
    assert "| adaptive | 4 | 50.0% | 4.0 | 25.0 | 25.0 | 38.5 |" in md
    assert "### Mode: adaptive" in md and "### Mode: direct" in md
    assert "| image | RET | 2 | 50.0% | 4.0 | 15.0 | 15.0 | 19.5 |" in md
    assert "| MSR-VTT | 2 |" in md
    assert "## Reasoning and latency" in markdown_report(agg, modes=_rows())
    with pytest.raises(ValueError, match="unknown"):
        reasoning_report([dict(_rows()[0], task="nope")])


def test_plot_accuracy_latency(tmp_path):
    pytest.importorskip("matplotlib")
    out = plot_accuracy_latency(
        [
            {"mode": "direct", "score": 0.55, "latency_mean_ms": 5.0, "metric": "hit@1"},
            {"mode": "adaptive", "score": 0.6, "latency_mean_ms": 25.0, "metric": "hit@1"},
        ],
        tmp_path / "plots" / "acc_lat.png",
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mode_table_takes_the_stage_metrics_and_counts_clean_tasks():
    from mmemb.eval.report import mode_table

    s = {r["mode"]: r for r in mode_summary(_rows())}
    metrics = {"direct.overall": 0.5, "adaptive.overall": 0.75, "direct.task.CIRR": 0.5}
    for m in ("direct", "adaptive"):
        metrics |= {f"{m}.reasoning_ratio": s[m]["reasoning_ratio"],
                    f"{m}.latency_mean_ms": s[m]["latency_mean_ms"],
                    f"{m}.latency_p95_ms": s[m]["latency_p95_ms"]}
    results = [{"mode": "direct", "metric": "hit@1", "status": "ok"},
               {"mode": "adaptive", "metric": "hit@1", "status": "ok"},
               {"mode": "adaptive", "metric": "ndcg@5", "status": "error"}]
    got = {r["mode"]: r for r in mode_table(metrics, results)}
    assert list(got) == ["direct", "adaptive"]
    assert got["adaptive"] == {"mode": "adaptive", "tasks": 1, "score": 0.75, "metric": "hit@1",
                               "reasoning_ratio": s["adaptive"]["reasoning_ratio"],
                               "latency_mean_ms": s["adaptive"]["latency_mean_ms"],
                               "latency_p95_ms": s["adaptive"]["latency_p95_ms"]}
