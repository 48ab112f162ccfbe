"""The stage cache: skip a stage whose inputs, config and code are unchanged.

Prefect's own task cache is keyed inside its API database and, by default, only within one
flow run; a pipeline that must be rerun after a crash, on another machine or with a
different Prefect server needs the decision to live beside the outputs. So each stage
writes ``<run_dir>/<stage>/_stage.json`` *after* its outputs are complete::

    {"key": sha256(stage, config, input digests, code version), "result": StageResult, ...}

A later run recomputes the key from the current config, the *content* digests of the
inputs (artifact manifests, hashed model files) and the code version (a hash of the stage
module's source and every project module it imports, transitively). Equal key and outputs
still present with their recorded digests: the stored result is returned, nothing runs.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from data_contracts import io
from data_contracts.files import DigestMemo, atomic_write_json, json_digest, sha256_file
from data_contracts.io import ArtifactRef, path_digest
from mmemb.configs.base import StageConfig
from mmemb.configs.pipeline import OUTPUT_FIELDS, WIRING
from mmemb.stages.base import StageResult

STATE_FILE = "_stage.json"
#: Project packages whose source counts as the code of a stage.
PROJECT_PACKAGES = ("mmemb", "data_contracts")


# --------------------------------------------------------------------------- code version

def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m.split(".")[0] in PROJECT_PACKAGES}


def code_files(module: str) -> dict[str, Path]:
    """The stage module and every project module it imports, transitively (static, by AST)."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        parents = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
        todo.extend((_imports(path, name) | parents) - set(seen))
    return seen


def code_version(module: str) -> str:
    """sha256 over the sources of :func:`code_files` (renames of unrelated modules ignored)."""
    h = hashlib.sha256()
    for name, path in sorted(code_files(module).items()):
        h.update(name.encode() + b"\0" + bytes.fromhex(sha256_file(path)))
    return h.hexdigest()


# --------------------------------------------------------------------------- input digests

def input_fields(stage: str, cfg: StageConfig) -> dict[str, str]:
    """The inputs of a stage config (dotted field -> path): its wired input fields, plus any
    other setting whose value is an existing path outside its own output folder (a
    teacher's ``model``, an eval ``baseline``...), so their content is part of the key too.
    """
    out = {}
    for k in WIRING.get(stage, {}):
        if k in OUTPUT_FIELDS or k not in type(cfg).model_fields:
            continue
        v = getattr(cfg, k)
        if isinstance(v, str) and v:
            out[k] = v
    outs = [Path(getattr(cfg, k)).resolve() for k in OUTPUT_FIELDS
            if isinstance(getattr(cfg, k, None), str)]

    def walk(obj, prefix):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{prefix}.{k}" if prefix else k)
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, f"{prefix}.{i}")
        elif (isinstance(obj, str) and obj and prefix not in out
              and prefix.split(".")[0] not in OUTPUT_FIELDS and len(obj) < 4096
              and ("/" in obj or obj.endswith(".parquet"))):
            try:
                p = Path(obj)
                if p.exists() and not any(p.resolve().is_relative_to(o) for o in outs):
                    out[prefix] = obj
            except (OSError, ValueError):
                pass

    walk(cfg.model_dump(mode="json"), "")
    return out


def input_digests(stage: str, cfg: StageConfig, memo: DigestMemo | None = None
                  ) -> dict[str, str | None]:
    return {k: path_digest(v, memo) for k, v in input_fields(stage, cfg).items()}


def cache_key(stage: str, cfg: StageConfig, inputs: dict[str, str | None], code: str) -> str:
    return json_digest({"stage": stage, "config": cfg.digest_view("cache"), "inputs": inputs,
                        "code": code})


# --------------------------------------------------------------------------- state file

def result_to_state(res: StageResult) -> dict:
    d = res.to_dict()
    d["step_metrics"] = [[s, m] for s, m in res.step_metrics]
    return d


def result_from_state(d: dict) -> StageResult:
    return StageResult(
        stage=d["stage"],
        outputs={k: ArtifactRef(**v) for k, v in (d.get("outputs") or {}).items()},
        metrics={k: float(v) for k, v in (d.get("metrics") or {}).items()},
        step_metrics=[(int(s), m) for s, m in (d.get("step_metrics") or [])],
        files={k: Path(v) for k, v in (d.get("files") or {}).items()},
        models={k: Path(v) for k, v in (d.get("models") or {}).items()},
        summary=d.get("summary") or "")


def state_path(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / stage / STATE_FILE


def digest_memo(run_dir: str | Path) -> DigestMemo:
    """The run directory's file-digest memo (shared by input keys and output checks)."""
    return DigestMemo(Path(run_dir) / "_digests.json")


def model_digests(res: StageResult, memo: DigestMemo | None = None) -> dict[str, str | None]:
    """Content digests of a result's models (model files only, as for input keys)."""
    return {name: path_digest(p, memo) for name, p in res.models.items()}


def write_state(run_dir: str | Path, stage: str, key: str, res: StageResult, *,
                inputs: dict, code: str, config: dict, duration_s: float,
                extra: dict | None = None, attempt: str | None = None) -> Path:
    """Record a finished stage. Its models' content digests go in too: a model folder is
    written in place (``save_pretrained``), so a later forced rerun killed while saving
    would leave a torn checkpoint behind a state file whose key still matches; the digests
    let :func:`lookup` refuse it. The memo makes the next stage's input key reuse them."""
    path = state_path(run_dir, stage)
    memo = digest_memo(run_dir)
    outs = model_digests(res, memo)
    memo.save()
    atomic_write_json(path, {"stage": stage, "key": key, "inputs": inputs, "code_version": code,
                             "config": config, "duration_s": duration_s,
                             "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             "result": result_to_state(res), "model_digests": outs,
                             "attempt": attempt, **(extra or {})})
    mk = read_running(run_dir, stage)
    if mk is not None and mk.get("attempt") == attempt:
        running_path(run_dir, stage).unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------- running marker
#
# The record and the outputs change together: before a stage computes, a marker says it
# is running and its old record is removed, so a process killed after it replaced an
# output but before it wrote the new record leaves no record that describes the old
# outputs, only the marker ("interrupted"). The record of the finished attempt removes it.

RUNNING_FILE = "_stage.running.json"


def running_path(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / stage / RUNNING_FILE


def read_running(run_dir: str | Path, stage: str) -> dict | None:
    path = running_path(run_dir, stage)
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return {"attempt": None, "started_at": "?"}  # torn: still an unfinished attempt


def begin_run(run_dir: str | Path, stage: str, key: str) -> str:
    """Mark ``stage`` as running (marker first, then the old record goes); returns the
    attempt id that :func:`write_state` must be given to clear the marker."""
    attempt = uuid.uuid4().hex
    old = read_state(run_dir, stage)
    atomic_write_json(running_path(run_dir, stage), {
        "stage": stage, "key": key, "attempt": attempt, "pid": os.getpid(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "previous_key": (old or {}).get("key")})
    state_path(run_dir, stage).unlink(missing_ok=True)
    return attempt


def fail_run(run_dir: str | Path, stage: str, attempt: str, error: str) -> None:
    """Note on the marker why the attempt ended (the record stays absent)."""
    mk = read_running(run_dir, stage)
    if mk is not None and mk.get("attempt") == attempt:
        mk.update(error=error[:2000], failed_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        atomic_write_json(running_path(run_dir, stage), mk)


def unfinished(run_dir: str | Path, stage: str) -> str | None:
    """Why the stage has no valid record because an attempt did not finish, else None."""
    mk = read_running(run_dir, stage)
    if mk is None:
        return None
    st = _read_state_file(run_dir, stage)
    if st is not None and mk.get("attempt") is not None and st.get("attempt") == mk["attempt"]:
        return None
    if mk.get("error"):
        return f"the run started {mk.get('started_at')} failed ({mk['error'][:300]})"
    return (f"the run started {mk.get('started_at')} did not finish (killed?); its outputs "
            "may be partial")


def read_state(run_dir: str | Path, stage: str) -> dict | None:
    """The stage's record, or None (none, torn, or an attempt after it did not finish)."""
    st = _read_state_file(run_dir, stage)
    if st is not None and running_path(run_dir, stage).exists() and \
            unfinished(run_dir, stage) is not None:
        return None
    return st


def _read_state_file(run_dir: str | Path, stage: str) -> dict | None:
    path = state_path(run_dir, stage)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a torn or foreign file is no cache hit; the stage reruns


def artifact_intact(path: Path, verify: bool = False) -> str:
    """'' when every part the manifest lists exists with its recorded size (and, with
    ``verify``, its recorded sha256); else what is wrong. Cheap without ``verify``: one
    ``stat`` per part, so a deleted or truncated part is never reused as cached."""
    try:
        m = io._manifest(path)
    except ValueError as e:
        return str(e)
    return next((f"part {p['file']} {why}" for p in m["parts"]
                 if (why := io.part_problem(path, p, verify))), "")


def outputs_intact(res: StageResult, models: dict[str, str | None] | None = None,
                   memo: DigestMemo | None = None, verify: bool = False) -> tuple[bool, str]:
    """Do the recorded outputs still exist with their recorded digests?

    Every part of every output artifact must exist with its recorded size; ``verify`` also
    hashes each part and re-hashes model files instead of trusting the digest memo (size
    and mtime). ``models``: the model digests the state file recorded (None: existence
    only, as for state files written before digests were recorded).
    """
    if verify:
        memo = DigestMemo(None)
    for name, r in res.outputs.items():
        p = Path(r.uri)
        if not io.exists(p):
            return False, f"output {name!r} ({p}) is missing"
        if p.is_dir():
            try:
                if io.ref(p).digest != r.digest:
                    return False, f"output {name!r} ({p}) changed since it was written"
            except ValueError as e:
                return False, f"output {name!r}: {e}"
            if why := artifact_intact(p, verify):
                return False, f"output {name!r} ({p}): {why}"
    for name, p in {**res.models, **res.files}.items():
        if not Path(p).exists():
            return False, f"{name!r} ({p}) is missing"
    for name, want in (models or {}).items():
        if name in res.models and want is not None and \
                path_digest(res.models[name], memo) != want:
            return False, f"model {name!r} ({res.models[name]}) changed since it was written"
    return True, ""


def lookup(run_dir: str | Path, stage: str, key: str, verify: bool = False
           ) -> tuple[StageResult | None, str]:
    """The cached result for ``key``, or None with the reason it cannot be reused.

    ``verify``: hash every output part and model file (see :func:`outputs_intact`)."""
    st = read_state(run_dir, stage)
    if st is None:
        return None, unfinished(run_dir, stage) or "no previous result"
    if st.get("key") != key:
        return None, "inputs, config or code changed"
    try:
        res = result_from_state(st["result"])
    except (KeyError, TypeError, ValueError) as e:
        return None, f"unreadable state file ({e})"
    memo = digest_memo(run_dir)
    ok, why = outputs_intact(res, st.get("model_digests"), memo, verify)
    memo.save()
    return (res, "") if ok else (None, why)


# --------------------------------------------------------------------------- status

def _dotted(obj: Any, field: str) -> Any:
    for part in field.split("."):
        if isinstance(obj, dict):
            obj = obj.get(part)
        elif isinstance(obj, list) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
        else:
            return None
    return obj


def _resolved(p: str | Path) -> Path:
    try:
        return Path(p).resolve()
    except (OSError, RuntimeError):
        return Path(p)


def run_status(run_dir: str | Path, stages: list[str] | tuple[str, ...], verify: bool = False
               ) -> dict[str, tuple[str, str, dict | None]]:
    """Per stage, in order: (verdict, why, record). Verdicts: ``-`` (never ran), ``ok``,
    ``stale`` (an output is gone or changed, an input differs from the one it was built
    from, or the stage that produced an input is itself stale) and ``interrupted``.

    Inputs are re-digested from the paths the record's config holds (the digest memo
    makes that a ``stat`` for unchanged checkpoints), so ``--only select`` with a new
    margin shows train, gate and evaluate stale until they rerun."""
    run_dir = Path(run_dir)
    memo = digest_memo(run_dir)
    out: dict[str, tuple[str, str, dict | None]] = {}
    producers: dict[Path, str] = {}
    for stage in stages:
        producers.setdefault(_resolved(run_dir / stage), stage)
        st = read_state(run_dir, stage)
        if st is None:
            why = unfinished(run_dir, stage)
            out[stage] = ("interrupted", why, None) if why else ("-", "", None)
            continue
        try:
            res = result_from_state(st["result"])
        except (KeyError, TypeError, ValueError) as e:
            out[stage] = ("stale", f"unreadable state file ({e})", st)
            continue
        for p in [*(r.uri for r in res.outputs.values()), *res.models.values()]:
            producers[_resolved(p)] = stage
        ok, why = outputs_intact(res, st.get("model_digests"), memo, verify)
        if ok:
            why = _inputs_changed(st, memo, producers, out, stage)
        out[stage] = ("ok", "", st) if ok and not why else ("stale", why, st)
    memo.save()
    return out


def _inputs_changed(st: dict, memo: DigestMemo, producers: dict[Path, str],
                    done: dict[str, tuple[str, str, dict | None]], stage: str) -> str:
    """An input whose content differs from the recorded one, else one whose producing
    stage is stale or interrupted; '' when neither."""
    paths = [(f, p, d) for f, d in (st.get("inputs") or {}).items()
             if isinstance(p := _dotted(st.get("config") or {}, f), str) and p]
    for field, path, recorded in paths:
        now = path_digest(path, memo)
        if now != recorded:
            what = "is gone" if now is None else "changed since the stage ran"
            return f"input {field!r} ({path}) {what}"
    for field, path, _ in paths:
        rp = _resolved(path)
        up = next((s for p, s in producers.items() if s != stage
                   and (rp == p or rp.is_relative_to(p))), None)
        if up is not None and done.get(up, ("-",))[0] in ("stale", "interrupted"):
            return f"input {field!r} comes from stage {up!r}, which is {done[up][0]}"
    return ""
