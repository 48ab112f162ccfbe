"""The one baseline loader: {task: score (fraction)} from whatever a comparison comes as.

A baseline is a published model's per-task numbers (a hand-written ``{task: score}`` JSON or
a ``task,score`` CSV, percent or fraction), the benchmark's own score report (VLM2Vec's
``all_scores/*.json``), or an earlier run's ``EVAL_RESULTS`` folder. Errors name the file
and line so a hand-edited baseline is quick to fix.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from data_contracts import io
from data_contracts.io import ContractError
from data_contracts.schemas import EVAL_RESULTS
from mmemb.eval.tasks import get_task

Entry = tuple[str, Any, int]  # (task, raw value, line)


def load_baseline(path: str | Path, mode: str | None = None, scale: str = "auto"
                  ) -> dict[str, float]:
    """{task: score (fraction)} from a JSON/CSV score file, the benchmark's score report or
    an earlier run's results folder (``mode``: which of its modes; default 'direct' when
    present, else its first).

    ``scale="auto"`` treats a score file as percentages when any value exceeds 1, which is
    how papers publish; pass "percent" or "fraction" if that is ambiguous.
    """
    path = Path(path)
    if scale not in ("auto", "percent", "fraction"):
        raise ValueError(f"scale must be auto, percent or fraction, got {scale!r}")
    if not path.exists():
        raise ContractError(path, "baseline file does not exist.",
                            fix="point evaluate.baseline at a .json/.csv of per-task scores or "
                            "an earlier run's results folder")
    suffix = path.suffix.lower()
    if suffix == ".json":
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
        if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
            meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
            return _benchmark_report_scores(data["metrics"], path,
                                            meta.get("report_generated_date"))
        return _to_fractions(_json_entries(data, text, path), path, scale)
    if suffix == ".csv":
        return _to_fractions(_csv_entries(path.read_text(encoding="utf-8"), path), path, scale)
    return _results_scores(path, mode)


def _json_entries(data: Any, text: str, path: Path) -> list[Entry]:
    if not isinstance(data, dict):
        raise ValueError(f"{path}:1: expected a JSON object {{task: score}}")
    entries = []
    for task, value in data.items():
        pos = text.find(json.dumps(task))
        entries.append((task, value, text.count("\n", 0, max(pos, 0)) + 1))
    return entries


def _csv_entries(text: str, path: Path) -> list[Entry]:
    """(task, score, line) of a CSV with a header naming ``task`` and ``score``; blank and
    ``#`` comment lines are skipped."""
    reader = csv.reader(text.splitlines())
    cols: dict[str, int] | None = None
    entries = []
    for row in reader:
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if cols is None:
            cols = {c.strip().lower(): i for i, c in enumerate(row)}
            if "task" not in cols or "score" not in cols:
                raise ValueError(f"{path}:{reader.line_num}: header needs 'task' and 'score' "
                                 f"columns, got {row}")
            continue
        if len(row) <= max(cols["task"], cols["score"]):
            raise ValueError(f"{path}:{reader.line_num}: too few columns in {row}")
        entries.append((row[cols["task"]].strip(), row[cols["score"]], reader.line_num))
    return entries


def _to_fractions(entries: list[Entry], path: Path, scale: str) -> dict[str, float]:
    """Checked {task: fraction}: numbers only, no duplicates, within 0..1 or 0..100."""
    out: dict[str, float] = {}
    lines: dict[str, int] = {}
    for task, value, line in entries:
        try:
            if isinstance(value, bool) or value is None:
                raise ValueError
            score = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            msg = f"{path}:{line}: task {task!r}: score {value!r} is not a number"
            raise ValueError(msg) from None
        if not task or not math.isfinite(score) or score < 0:
            raise ValueError(f"{path}:{line}: bad entry task={task!r} score={value!r}")
        if task in out:
            raise ValueError(f"{path}:{line}: duplicate task {task!r} (first on line "
                             f"{lines[task]})")
        out[task], lines[task] = score, line
    if not out:
        raise ValueError(f"{path}: no baseline scores found")
    percent = scale == "percent" or (scale == "auto" and max(out.values()) > 1.0)
    limit = 100.0 if percent else 1.0
    for task, score in out.items():
        if score > limit:
            raise ValueError(f"{path}:{lines[task]}: task {task!r}: score {score} > {limit:g}")
    return {t: s / 100.0 for t, s in out.items()} if percent else out


def _results_scores(path: Path, mode: str | None) -> dict[str, float]:
    table = io.read(path, EVAL_RESULTS)
    rows = [r for r in table.to_pylist() if r["score"] is not None]
    modes_ = list(dict.fromkeys(r["mode"] for r in rows))
    pick = mode or ("direct" if "direct" in modes_ else (modes_[0] if modes_ else None))
    if pick not in modes_:
        raise ContractError(path, f"no results for mode {pick!r}; it has {modes_}.")
    return {r["task"]: float(r["score"]) for r in rows if r["mode"] == pick}


#: Keys of the current official model-level report (``experiments/report_score_v2.py``
#: renames the two visdoc page tasks after the 2025-11-03 data fix) -> our task names.
FIXED_KEYS = {"ViDoSeek-page-fixed": "ViDoSeek-page", "MMLongBench-page-fixed": "MMLongBench-page"}
#: The date of that fix: a plain page key in a report generated before it holds old numbers.
PAGE_FIX_DATE = "2025-11-03"
#: Markers the official report writer puts where a task's score file is absent or unreadable.
OFFICIAL_MARKERS = ("FILE_N/A", "DIR_N/A", "JSON_ERROR", "READ_ERROR")


def _benchmark_report_scores(metrics_: dict, path: Path, generated: str | None = None,
                             log=print) -> dict[str, float]:
    """The benchmark's own score report (VLM2Vec ``all_scores/*.json``: ``{"metrics":
    {modality: {task: {"hit@1": .., "ndcg_linear@5": .., ...}}}}``): per task, the number
    under the task's registered metric (ndcg@k is the linear-gain NDCG).

    ``*-fixed`` keys (:data:`FIXED_KEYS`) are read as their task and win over a plain key;
    a plain page key from a report generated before :data:`PAGE_FIX_DATE` is flagged as not
    comparable; keys no registered task has and the official "N/A" markers are named in
    one line each."""
    out: dict[str, float] = {}
    fixed: set[str] = set()
    unknown, absent = [], []
    for modality, tasks in metrics_.items():
        if not isinstance(tasks, dict):
            raise ContractError(path, f"metrics.{modality} is not an object of tasks.")
        for key_name, vals in tasks.items():
            task = FIXED_KEYS.get(key_name, key_name)
            if isinstance(vals, str) and vals in OFFICIAL_MARKERS:
                absent.append(f"{key_name} ({vals})")
                continue
            try:
                metric = get_task(task).metric
            except ValueError:
                metric = "ndcg@5" if modality == "visdoc" else "hit@1"
                unknown.append(key_name)
            key = metric.replace("ndcg@", "ndcg_linear@")
            if not isinstance(vals, dict) or key not in vals:
                raise ContractError(path, f"metrics.{modality}.{key_name} has no {key!r} value.",
                                    fix="use the benchmark's score report or a {task: score} "
                                    "file")
            if task in fixed:
                continue  # the -fixed value already read wins over the plain key
            if key_name != task:
                fixed.add(task)
            out[task] = float(vals[key])
    old = [t for t in FIXED_KEYS.values() if t in out and t not in fixed]
    _report_keys(path, old, unknown, absent, generated, log)
    if not out:
        raise ContractError(path, "no task scores under 'metrics'.")
    return out


def _report_keys(path: Path, old: list[str], unknown: list[str], absent: list[str],
                 generated: str | None, log) -> None:
    """One line per kind of key that is not a plain, current task score (``old``: plain page
    keys, whose numbers predate the fix when the report does)."""
    if old and generated and generated[:10] < PAGE_FIX_DATE:
        log(f"[baseline] {path}: generated {generated[:10]}, before the {PAGE_FIX_DATE} fix of "
            f"{', '.join(old)}: those baseline numbers are not comparable")
    if unknown:
        log(f"[baseline] {path}: keys of no registered task, kept but unused: "
            f"{', '.join(unknown)}")
    if absent:
        log(f"[baseline] {path}: no score in the report for {', '.join(absent)}")
