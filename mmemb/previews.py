"""Small previews of a stage's outputs, made for the MLflow UI (no MLflow import here).

MLflow's artifact viewer cannot open Parquet ("Select a file to preview"), so a user would
have to download a stage's data to judge it. Each stage's run therefore also gets, under
``ui/``:

* ``README.md`` - every output's contract, row count, digest, schema and where the full
  file is (uploaded under ``data/<name>`` or kept by reference);
* ``<name>.table.json`` - the first rows of every output, in the split layout
  ``{"columns": [...], "data": [[...], ...]}`` that the viewer shows as a table once the
  file is listed in the run's ``mlflow.loggedArtifacts`` tag (done by
  :meth:`tasks.tracking.Tracker._log_tables`);
* the samples that answer "did this stage work?": rationales per teacher and status
  (generate), the pairs with the largest and smallest delta with their rationale (score),
  and the per-group metrics as one table (``metrics_by_group``) instead of dozens of
  one-point charts;
* any ``*.table.json`` file a stage wrote itself (select's decisions, evaluate's worst
  queries), logged as is.

Cells are cut short (the viewer clips long text and does not wrap) and tables stay small.
A preview is a convenience: any failure here is said and skipped, never raised.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmemb.tables import SUFFIX as TABLE_SUFFIX
from mmemb.tables import write_table

#: A file a stage wrote that is a table in MLflow's split layout.
#: Where the previews go in a run's artifacts.
UI_DIR = "ui"
HEAD_ROWS = 20
PER_GROUP = 3
EXTREMES = 10

#: ``<measure>/<kind>/<group>`` (also ``.`` or ``_`` separated): one value per task,
#: family or teacher; train's per-task hit rate is ``eval/hit_1/<task>``.
_BREAKDOWN = (re.compile(r"^(?P<measure>.+?)[/._](?P<kind>task|family|teacher)[/._]"
                         r"(?P<group>[^/]+)$"),
              re.compile(r"^(?P<measure>eval(?:_before)?/hit_1)/(?P<group>[^/]+)$"))


# --------------------------------------------------------------------------- tables

def _rows(uri: str, columns: list[str] | None = None, limit: int | None = None,
          pair_ids: set[str] | None = None):
    """Rows of a Parquet artifact (a folder of parts or one file), only ``columns`` (and
    only ``pair_ids``), read batch by batch: a large output is never loaded whole."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    d = ds.dataset(uri, format="parquet")
    cols = [c for c in columns if c in d.schema.names] if columns else None
    if limit:
        yield from d.head(limit, columns=cols).to_pylist()
        return
    flt = pc.field("pair_id").isin(sorted(pair_ids)) if pair_ids is not None else None
    for batch in d.to_batches(columns=cols, filter=flt):
        yield from batch.to_pylist()


# --------------------------------------------------------------------------- README

def _schema_lines(uri: str) -> list[str]:
    import pyarrow.dataset as ds

    sch = ds.dataset(uri, format="parquet").schema
    return ["| column | type |", "|---|---|"] + [f"| `{f.name}` | {f.type} |" for f in sch]


def readme(stage: str, outputs: dict[str, dict], tags: dict[str, str],
           tables: list[str]) -> str:
    """A stage's outputs as markdown: what each is, how big, its schema, where it lives."""
    lines = [f"# {stage}: outputs", ""]
    if tables:
        lines += ["Previews (open one, then *View as table*): "
                  + ", ".join(f"`{t}`" for t in tables), ""]
    for name, r in outputs.items():
        where = (f"kept by reference at `{tags.get(f'mmemb.output.{name}.uri', r['uri'])}`"
                 if f"mmemb.output.{name}.logged" in tags else f"uploaded as `data/{name}/`")
        lines += [f"## {name}", "",
                  f"- contract `{r.get('contract')}` v{r.get('schema_version')}, "
                  f"{r.get('rows')} rows, digest `{str(r.get('digest'))[:16]}`",
                  f"- full file: {where}", ""]
        try:
            lines += _schema_lines(r["uri"]) + [""]
        except Exception as e:  # noqa: BLE001
            lines += [f"(schema unreadable: {e})", ""]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- per stage

def _rationale_sample(outputs: dict[str, dict], cfg: Any) -> dict[str, list[dict]]:
    """generate: a few rationales per (teacher, status)."""
    del cfg
    cols = ["teacher_id", "status", "text", "error", "n_tokens", "finish_reason", "pair_id",
            "side", "cand_idx"]
    seen: dict[tuple, int] = {}
    out = []
    for r in _rows(outputs["rationales"]["uri"], cols):
        k = (r.get("teacher_id"), r.get("status"))
        if seen.get(k, 0) < PER_GROUP:
            seen[k] = seen.get(k, 0) + 1
            out.append(r)
    out.sort(key=lambda r: (str(r.get("teacher_id")), str(r.get("status"))))
    return {"rationales_by_teacher": out}


def _delta_extremes(outputs: dict[str, dict], cfg: Any) -> dict[str, list[dict]]:
    """score: the pairs with the largest and the smallest delta, with the rationale."""
    cols = ["delta", "pair_id", "teacher_id", "cand_idx", "s_with", "s_without",
            "rank_with", "rank_without", "status"]
    ok = [r for r in _rows(outputs["scores"]["uri"], cols)
          if r.get("status") == "ok" and r.get("delta") is not None]
    ok.sort(key=lambda r: r["delta"], reverse=True)
    picked = ([{"which": "largest", **r} for r in ok[:EXTREMES]]
              + [{"which": "smallest", **r} for r in ok[-EXTREMES:][::-1]
                 if len(ok) > EXTREMES])
    texts = {}
    src = getattr(cfg, "rationales", None)
    if src and Path(src).exists():
        want = {(r["pair_id"], r["teacher_id"], r["cand_idx"]) for r in picked}
        for r in _rows(src, ["pair_id", "teacher_id", "cand_idx", "text"],
                       pair_ids={p for p, _, _ in want}):
            k = (r["pair_id"], r["teacher_id"], r["cand_idx"])
            if k in want:
                texts[k] = r["text"]
    # the columns to read first: which end, the delta, the rationale that caused it
    rows = [{"which": r["which"], "delta": r["delta"],
             "rationale": texts.get((r["pair_id"], r["teacher_id"], r["cand_idx"])), **r}
            for r in picked]
    return {"delta_extremes": rows}


#: Stage -> the sample tables that answer "did it work?" (beyond the first rows).
SAMPLES: dict[str, Callable[[dict, Any], dict[str, list[dict]]]] = {
    "generate": _rationale_sample, "score": _delta_extremes}


# --------------------------------------------------------------------------- metrics

def split_breakdown(metrics: dict[str, float]) -> tuple[dict[str, float], list[dict]]:
    """(headline metrics, per-group rows): values per task/family/teacher leave the
    metrics (each would be a one-point chart) for one table with a row per group and a
    column per measure."""
    summary: dict[str, float] = {}
    rows: dict[tuple[str, str], dict] = {}
    for k, v in metrics.items():
        m = next((p.match(k) for p in _BREAKDOWN if p.match(k)), None)
        if m is None:
            summary[k] = v
            continue
        kind = m.groupdict().get("kind") or "task"
        row = rows.setdefault((kind, m["group"]), {"kind": kind, "group": m["group"]})
        row[m["measure"]] = v
    return summary, [rows[k] for k in sorted(rows)]


# --------------------------------------------------------------------------- all of a stage

def stage_previews(stage: str, outputs: dict[str, dict], files: dict[str, str], cfg: Any,
                   groups: list[dict], tags: dict[str, str], folder: Path
                   ) -> tuple[list[list[str]], list[list[str]]]:
    """Write a stage's previews into ``folder``; returns (tables, other artifacts) as
    ``[local path, artifact path]`` for :class:`tasks.tracking.StageRecord`."""
    made: dict[str, Path] = {}

    def attempt(what: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a preview never fails a stage
            print(f"[{stage}] no UI preview of {what}: {type(e).__name__}: {e}", flush=True)

    def table(name: str, rows: list[dict], columns: list[str] | None = None) -> Path:
        """One preview table (columns: the first row's unless given)."""
        made[name] = write_table(folder / f"{name}{TABLE_SUFFIX}", rows,
                                 columns or (list(rows[0]) if rows else []))
        return made[name]

    for name, r in outputs.items():
        attempt(name, lambda n=name, r=r: table(n, list(_rows(r["uri"], limit=HEAD_ROWS))))
    if stage in SAMPLES and outputs:
        def samples() -> None:
            for n, rows in SAMPLES[stage](outputs, cfg).items():
                table(n, rows)
        attempt("samples", samples)
    if groups:
        cols = ["kind", "group"] + sorted({k for g in groups for k in g} - {"kind", "group"})
        table("metrics_by_group", groups, cols)
    tables = [[str(p), f"{UI_DIR}/{p.name}"] for p in made.values()]
    tables += [[str(p), f"{UI_DIR}/{Path(p).name}"] for p in files.values()
               if str(p).endswith(TABLE_SUFFIX) and Path(p).is_file()]
    others = []
    if outputs:
        md = folder / "README.md"
        attempt("README", lambda: md.write_text(readme(
            stage, outputs, tags, sorted(Path(a).name for _, a in tables))))
        if md.is_file():
            others.append([str(md), UI_DIR])
    return tables, others


# --------------------------------------------------------------------------- run names

def _share(v: float) -> str:
    return f"{v:.0%}"


#: Per stage, its run's key figure from its metrics (a missing metric: no figure).
KEY_FIGURE: dict[str, Callable[[dict[str, float]], str]] = {
    "prepare": lambda m: f"{m['pairs_rows']:.0f} pairs",
    "generate": lambda m: f"{_share(m['share_ok'])} ok of {m['rows']:.0f}",
    "score": lambda m: f"Δ {m['mean_delta']:+.3f}",
    "select": lambda m: f"{_share(m['selected_share'])} of {m['pairs']:.0f} with rationale",
    "train": lambda m: f"loss {m['loss_last']:.3f}" + (
        f" · hit@1 {m['eval/mean']:.2f}" if "eval/mean" in m else ""),
    "gate": lambda m: f"reward {m['reward_first_quarter']:+.2f}→"
                      f"{m['reward_last_quarter']:+.2f}",
    "evaluate": lambda m: f"adaptive {m['adaptive.overall']:.2f}" + (
        f" ({_share(m['adaptive.reasoning_ratio'])} think)"
        if "adaptive.reasoning_ratio" in m else ""),
}


def child_run_name(stage: str, metrics: dict[str, float], cached: bool = False) -> str:
    """``stage · key figure`` (the plain stage when the figure is missing), `` · cached``
    for a reused result: runs of the same stage are told apart in the runs table."""
    try:
        name = f"{stage} · {KEY_FIGURE[stage](metrics)}"
    except (KeyError, TypeError, ValueError):
        name = stage
    return name + (" · cached" if cached else "")
