"""Markdown and plot reports for evaluation results.

Every score is printed with its metric name ("63.2 (hit@1)") because comparing hit@1 with
NDCG@5 is the most common reason people believe they cannot reproduce MMEB numbers.
Scores are held as fractions and shown x100, as published tables do.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmemb.eval.tasks import _SUITES

DASH = "—"
#: Beside the report: the accuracy-vs-latency plot's points, so the plot can be drawn later
#: (``python -m mmemb.eval.report OUT``) when the evaluation ran with ``plots: false``.
PLOT_POINTS = "accuracy_latency.json"


def _num(score: float) -> str:
    return f"{100 * score:.1f}"


def _fmt(score: float | None, metric: str) -> str:
    return DASH if score is None else f"{_num(score)} ({metric})"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _baseline_mean(tasks: list[str], baseline: Mapping[str, float]) -> tuple[float | None, str]:
    # A group mean over a subset of its tasks is not comparable, so show coverage instead.
    have = [t for t in tasks if t in baseline]
    if len(have) < len(tasks):
        return None, f"{DASH} ({len(have)}/{len(tasks)} tasks)"
    return math.fsum(baseline[t] for t in tasks) / len(tasks), ""


def _group_rows(
    groups: list[tuple[list[str], dict[str, Any]]], baseline: Mapping[str, float] | None
) -> list[list[Any]]:
    rows = []
    for label, g in groups:
        ours = (f"{DASH} (partial {g['partial']})" if g.get("partial")
                else _fmt(g["score"], g["metric"]))
        row = [*label, g["n_tasks"], ours]
        if baseline is not None:
            base, note = _baseline_mean(g["tasks"], baseline)
            row += [
                note or _fmt(base, g["metric"]),
                DASH if base is None or g["score"] is None
                else f"{100 * (g['score'] - base):+.1f}",
            ]
        rows.append(row)
    return rows


def partial_headline(agg: Mapping[str, Any]) -> str:
    """The first line of a partial MMEB-V2 report: ``**partial: N/78** — missing: ...``."""
    return f"**partial: {agg['partial']}** — missing: {', '.join(agg['missing'])}"


def markdown_report(
    aggregate_result: Mapping[str, Any],
    baseline: Mapping[str, float] | None = None,
    modes: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """Overall, per-modality, per-category and per-task tables (x100, metric beside each
    number), with ours / baseline / diff columns when a baseline is given, and the reasoning
    report when per-input `modes` rows are given (see `reasoning_report`)."""
    agg = aggregate_result
    cmp_cols = ["baseline", "diff"] if baseline is not None else []
    out = [f"# Evaluation report: {agg['suite']}", ""]
    if agg.get("partial"):
        out += [partial_headline(agg), ""]
    if agg.get("missing"):
        n_all = len(agg["missing"]) + len(agg["tasks"])
        note = (
            f"> **Partial run**: {len(agg['missing'])} of {n_all} tasks missing "
            f"({', '.join(agg['missing'])}); the overall score is not comparable with "
            "full-suite numbers."
        )
        out += [note, ""]
    sections = [
        ("Overall", [], [([], agg["overall"])]),
        ("Per modality", ["modality"], [([m], g) for m, g in agg["modalities"].items()]),
        (
            "Per category",
            ["modality", "category"],
            [(list(k), g) for k, g in agg["categories"].items()],
        ),
    ]
    for title, keys, groups in sections:
        out += [
            f"## {title}",
            "",
            markdown_table([*keys, "tasks", "ours", *cmp_cols], _group_rows(groups, baseline)),
            "",
        ]
    rows = []
    for name, t in agg["tasks"].items():
        row = [name, t["modality"], t["category"], _fmt(t["score"], t["metric"])]
        if baseline is not None:
            base = baseline.get(name)
            row += [
                _fmt(base, t["metric"]),
                DASH if base is None else f"{100 * (t['score'] - base):+.1f}",
            ]
        rows.append(row)
    out += [
        "## Per task",
        "",
        markdown_table(["task", "modality", "category", "ours", *cmp_cols], rows),
        "",
    ]
    if baseline is not None:
        extra = [t for t in baseline if t not in agg["tasks"]]
        if extra:
            out += [f"Baseline tasks without our result: {', '.join(extra)}", ""]
    if modes:
        out += [reasoning_report(modes, agg), ""]
    return "\n".join(out).rstrip() + "\n"


_ROW_KEYS = ("mode", "task", "reasoned", "tokens", "latency_ms")


def _where(row: Mapping[str, Any], agg: Mapping[str, Any] | None) -> tuple[str, str]:
    """(modality, category) of a row: its own fields, else the aggregate, else any suite."""
    if "modality" in row and "category" in row:
        return row["modality"], row["category"]
    if agg is not None and row["task"] in agg["tasks"]:
        t = agg["tasks"][row["task"]]
        return t["modality"], t["category"]
    for table in _SUITES.values():
        if row["task"] in table:
            return table[row["task"]].modality, table[row["task"]].category
    raise ValueError(f"task {row['task']!r}: unknown; give 'modality' and 'category' in the row")


def _stats(rows: list[Mapping[str, Any]]) -> dict[str, float]:
    lat = np.array([r["latency_ms"] for r in rows], dtype=np.float64)  # (n,)
    return {
        "n": len(rows),
        "reasoning_ratio": float(np.mean([bool(r["reasoned"]) for r in rows])),
        "mean_tokens": float(np.mean([r["tokens"] for r in rows])),
        "latency_mean_ms": float(lat.mean()),
        "latency_p50_ms": float(np.percentile(lat, 50)),
        "latency_p95_ms": float(np.percentile(lat, 95)),
    }


def mode_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per-mode stats from per-input rows {mode, task, reasoned, tokens, latency_ms}.

    Rows are per input, not pre-averaged, because p50/p95 cannot be recovered from means.
    """
    by_mode: dict[str, list[Mapping[str, Any]]] = {}
    for i, r in enumerate(rows):
        if missing := [k for k in _ROW_KEYS if k not in r]:
            raise ValueError(f"reasoning row {i}: missing {missing}")
        if not math.isfinite(float(r["latency_ms"])):
            raise ValueError(f"reasoning row {i}: latency_ms {r['latency_ms']!r} is not finite")
        by_mode.setdefault(r["mode"], []).append(r)
    return [{"mode": m, **_stats(rs)} for m, rs in by_mode.items()]


def _stat_cells(s: Mapping[str, float]) -> list[str]:
    return [
        str(s["n"]),
        f"{100 * s['reasoning_ratio']:.1f}%",
        f"{s['mean_tokens']:.1f}",
        f"{s['latency_mean_ms']:.1f}",
        f"{s['latency_p50_ms']:.1f}",
        f"{s['latency_p95_ms']:.1f}",
    ]


_STAT_HEAD = [
    "inputs",
    "reasoning ratio",
    "mean tokens",
    "latency mean (ms)",
    "latency p50 (ms)",
    "latency p95 (ms)",
]


def reasoning_report(
    rows: Sequence[Mapping[str, Any]], aggregate_result: Mapping[str, Any] | None = None
) -> str:
    """Summary across modes, then per mode the reasoning ratio, tokens and latency by category
    and by task, so the cost of adaptive reasoning is visible where it is spent."""
    summary = mode_summary(rows)
    out = [
        "## Reasoning and latency",
        "",
        markdown_table(["mode", *_STAT_HEAD], [[s["mode"], *_stat_cells(s)] for s in summary]),
        "",
    ]
    for s in summary:
        mode_rows = [r for r in rows if r["mode"] == s["mode"]]
        cats: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
        tasks: dict[str, list[Mapping[str, Any]]] = {}
        for r in mode_rows:
            cats.setdefault(_where(r, aggregate_result), []).append(r)
            tasks.setdefault(r["task"], []).append(r)
        out += [
            f"### Mode: {s['mode']}",
            "",
            markdown_table(
                ["modality", "category", *_STAT_HEAD],
                [[*k, *_stat_cells(_stats(v))] for k, v in cats.items()],
            ),
            "",
            markdown_table(["task", *_STAT_HEAD],
                           [[t, *_stat_cells(_stats(v))] for t, v in tasks.items()]),
            "",
        ]
    return "\n".join(out).rstrip()


def plot_accuracy_latency(mode_rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """PNG of score (x100) against mean latency, one labelled point per mode.

    `mode_rows` are {mode, score (fraction), latency_mean_ms, optional metric}, e.g.
    `mode_summary` output with each mode's overall score added.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: eval runs on servers without a display
    import matplotlib.pyplot as plt

    if not mode_rows:
        raise ValueError("no mode rows to plot")
    metrics = sorted({r.get("metric", "score") for r in mode_rows})
    fig, ax = plt.subplots(figsize=(5, 4))
    for r in mode_rows:
        x, y = float(r["latency_mean_ms"]), 100 * float(r["score"])
        ax.scatter([x], [y])
        ax.annotate(str(r["mode"]), (x, y), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("mean latency per input (ms)")
    ax.set_ylabel(f"score x100 ({'/'.join(metrics)})")
    ax.set_title("Accuracy vs latency by inference mode")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def mode_table(metrics: Mapping[str, float], results: Sequence[Mapping[str, Any]]
               ) -> list[dict[str, Any]]:
    """Per mode the pipeline's summary line: tasks scored cleanly, overall score, metric,
    reasoning ratio and latency. The numbers are the evaluate stage's own metrics, i.e.
    :func:`mode_summary` over the per-input rows (exact percentiles) and each mode's
    aggregate; ``results`` (EVAL_RESULTS rows) only count the tasks and name the metric."""
    modes = [k[: -len(".overall")] for k in metrics if k.endswith(".overall")]
    ok = [r for r in results if r["status"] == "ok"]
    metric = "/".join(sorted({r["metric"] for r in ok if r["metric"]}))
    return [{"mode": md, "tasks": sum(r["mode"] == md for r in ok),
             "score": metrics.get(f"{md}.overall"), "metric": metric,
             "reasoning_ratio": metrics.get(f"{md}.reasoning_ratio"),
             "latency_mean_ms": metrics.get(f"{md}.latency_mean_ms"),
             "latency_p95_ms": metrics.get(f"{md}.latency_p95_ms")} for md in modes]



def plot_from_points(out: str | Path) -> Path:
    """Draw ``OUT/accuracy_latency.png`` from ``OUT/accuracy_latency.json`` (the points an
    evaluation writes whether it plots or not): plotting off the evaluation's path."""
    import json

    out = Path(out)
    points = json.loads((out / PLOT_POINTS).read_text())
    return plot_accuracy_latency(points, out / "accuracy_latency.png")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m mmemb.eval.report OUT``: draw an evaluation's plot after the fact."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        raise SystemExit("usage: python -m mmemb.eval.report EVALUATE_OUT_FOLDER")
    print(plot_from_points(args[0]))


if __name__ == "__main__":
    main()
