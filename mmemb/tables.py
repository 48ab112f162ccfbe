"""Preview tables a stage writes beside its artifacts, for the tracking UI to show.

Why: a Parquet artifact cannot be read in the MLflow artifact viewer, and some of what a
user needs to judge a stage (which candidates were filtered and why, which queries a model
got most wrong and what it retrieved instead) exists only in the stage's memory while it
runs. So the stage itself writes a small sample as ``<name>.table.json`` in MLflow's split
layout ``{"columns": [...], "data": [[...], ...]}``; the tracking code logs every file of a
:class:`~mmemb.stages.base.StageResult` whose name ends with :data:`SUFFIX` as a table,
without knowing the stage. Cells are JSON scalars (str, int, float, bool, None): long text
is cut, lists and mappings are summarised as a short string, non-finite floats become None,
so the file is valid JSON and stays small. No MLflow import here: this is library code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from data_contracts.files import atomic_write_json

SUFFIX = ".table.json"
MAX_TEXT = 240  # characters of a text cell: enough to judge a rationale or a query
MAX_ITEMS = 5  # items of a list cell shown before "(+n more)"


def cut(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` on one line, at most ``limit`` characters (an ellipsis marks the cut)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def cell(value: Any) -> str | int | float | bool | None:
    """``value`` as a JSON scalar a table cell can hold (numpy scalars via ``item()``)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()  # numpy / torch scalar
        except (TypeError, ValueError):
            pass
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return cut(value)
    if isinstance(value, Mapping):
        return cut(json.dumps(value, default=str, sort_keys=True))
    if (isinstance(value, Sequence) and not isinstance(value, bytes)) or hasattr(value, "tolist"):
        items = list(value.tolist() if hasattr(value, "tolist") else value)
        shown = ", ".join(str(cell(v)) for v in items[:MAX_ITEMS])
        more = f" (+{len(items) - MAX_ITEMS} more)" if len(items) > MAX_ITEMS else ""
        return cut(f"[{shown}]{more}")
    return cut(str(value))


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> dict[str, list]:
    """The split layout of ``rows`` (a missing key is None), columns in the given order."""
    return {"columns": list(columns), "data": [[cell(r.get(c)) for c in columns] for r in rows]}


def write_table(path: str | Path, rows: Sequence[Mapping[str, Any]],
                columns: Sequence[str]) -> Path:
    """Write ``rows`` as a preview table at ``path`` (atomically; its name must end with
    :data:`SUFFIX` so the tracking code finds it) and return the path."""
    path = Path(path)
    if not path.name.endswith(SUFFIX):
        raise ValueError(f"{path}: a preview table's name ends with {SUFFIX!r}")
    atomic_write_json(path, table(rows, columns), indent=None)
    return path
