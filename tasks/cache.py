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
import re
import time
import uuid
from pathlib import Path
from typing import Any

from data_contracts import io
from data_contracts.io import ArtifactRef, sha256_file
from mmemb.configs.base import StageConfig
from mmemb.configs.pipeline import OUTPUT_FIELDS, WIRING
from mmemb.stages.base import StageResult

STATE_FILE = "_stage.json"
#: Project packages whose source counts as the code of a stage.
PROJECT_PACKAGES = ("mmemb", "data_contracts")
#: Settings that do not change what a stage computes: excluded from the key. Output paths
#: stay in it: a result cached for another ``out`` lives elsewhere.
KEY_EXCLUDE = frozenset({"show_progress"})


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
        h.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


# --------------------------------------------------------------------------- input digests

class DigestMemo:
    """Remembers file digests by (path, size, mtime) so a 16 GB checkpoint is hashed once."""

    def __init__(self, path: Path | None):
        self.path = path
        self.data: dict[str, list] = {}
        if path is not None and path.is_file():
            try:
                self.data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                self.data = {}
        self.dirty = False

    def file(self, p: Path) -> str:
        st = p.stat()
        k = str(p.resolve())
        hit = self.data.get(k)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        d = sha256_file(p)
        self.data[k] = [st.st_size, st.st_mtime_ns, d]
        self.dirty = True
        return d

    def save(self) -> None:
        if self.path is not None and self.dirty:
            atomic_write_json(self.path, self.data)


#: The files of a checkpoint that decide what it computes. Anything else in the folder
#: (training logs, timing notes such as mmemb_pretrain.json, checkpoints of a resumable
#: trainer) is not part of its digest, so rewriting a log does not invalidate later stages.
_MODEL_SUFFIXES = (".safetensors", ".bin", ".model", ".tiktoken", ".jinja")
_MODEL_NAMES = re.compile(r"^(config|generation_config|preprocessor_config|processor_config|"
                          r"video_preprocessor_config|tokenizer(_config)?|special_tokens_map|"
                          r"added_tokens|vocab|merges|chat_template|mmemb_embedding|mmemb_gate|"
                          r"adapter_config|model\.safetensors\.index)\.(json|txt)$")


def model_file(name: str) -> bool:
    return name.endswith(_MODEL_SUFFIXES) or bool(_MODEL_NAMES.match(name))


def path_digest(path: str | Path, memo: DigestMemo | None = None) -> str | None:
    """Content digest of an input: artifact manifest digest, file hash or folder hash.

    A folder that is neither an artifact nor a model (an image root) is identified by its
    path only, which the config already holds: hashing a million images on every run would
    cost more than the stage. Returns None for a path that does not exist.
    """
    memo = memo or DigestMemo(None)
    p = Path(path)
    if not p.exists():
        return None
    if p.is_dir() and (p / io.MANIFEST).is_file():
        return "artifact:" + io.ref(p).digest
    if p.is_file():
        return "file:" + memo.file(p)
    top = [f for f in p.iterdir() if f.is_file()]
    if any(f.name == "config.json" or f.suffix == ".safetensors" for f in top):
        files = sorted(f for f in p.rglob("*") if f.is_file() and model_file(f.name))
        h = hashlib.sha256()
        for f in files:
            h.update(str(f.relative_to(p)).encode() + b"\0" + memo.file(f).encode())
        return "dir:" + h.hexdigest()
    return None


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
    conf = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in KEY_EXCLUDE}
    blob = json.dumps({"stage": stage, "config": conf, "inputs": inputs, "code": code},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# --------------------------------------------------------------------------- state file

def atomic_write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
                extra: dict | None = None) -> Path:
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
                             **(extra or {})})
    return path


def read_state(run_dir: str | Path, stage: str) -> dict | None:
    path = state_path(run_dir, stage)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a torn or foreign file is no cache hit; the stage reruns


def outputs_intact(res: StageResult, models: dict[str, str | None] | None = None,
                   memo: DigestMemo | None = None) -> tuple[bool, str]:
    """Do the recorded outputs still exist with their recorded digests?

    ``models``: the model digests the state file recorded (None: existence only, as for
    state files written before digests were recorded).
    """
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
    for name, p in {**res.models, **res.files}.items():
        if not Path(p).exists():
            return False, f"{name!r} ({p}) is missing"
    for name, want in (models or {}).items():
        if name in res.models and want is not None and \
                path_digest(res.models[name], memo) != want:
            return False, f"model {name!r} ({res.models[name]}) changed since it was written"
    return True, ""


def lookup(run_dir: str | Path, stage: str, key: str) -> tuple[StageResult | None, str]:
    """The cached result for ``key``, or None with the reason it cannot be reused."""
    st = read_state(run_dir, stage)
    if st is None:
        return None, "no previous result"
    if st.get("key") != key:
        return None, "inputs, config or code changed"
    try:
        res = result_from_state(st["result"])
    except (KeyError, TypeError, ValueError) as e:
        return None, f"unreadable state file ({e})"
    memo = digest_memo(run_dir)
    ok, why = outputs_intact(res, st.get("model_digests"), memo)
    memo.save()
    return (res, "") if ok else (None, why)
