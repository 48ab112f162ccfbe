"""Tools of the fault suite: run the pipeline CLI in its own process group, SIGKILL it at a
random point inside a chosen stage, audit what a kill left on disk, and fingerprint a run
directory's artifacts so two runs can be compared.

Why a process group: the pipeline is several processes (the CLI, Prefect's temporary API
server, the launched generate/train/gate workers and vLLM's engine processes); a crash of
the machine or an OOM kill of the job takes all of them at once, which ``os.killpg`` with
SIGKILL reproduces. Nothing gets a chance to clean up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).with_name("pipeline.yaml")
#: Where the pipeline's code is run from: a copy of the repository's packages taken once
#: per session (:func:`snapshot`), so that edits made while the suite runs cannot change a
#: stage's code version, hence its cache key and outputs, between two runs being compared.
SRC = REPO
PACKAGES = ("mmemb", "data_contracts", "tasks", "flows", "configs")


def snapshot(dest: Path) -> Path:
    """Copy the project's packages to ``dest``; ``python -m flows.cli`` run there imports
    them (the current directory precedes the editable install's finder on sys.path), and
    launched stages and vLLM's processes get ``dest`` on PYTHONPATH from the code itself."""
    for name in PACKAGES:
        shutil.copytree(REPO / name, dest / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest
STAGES = ("prepare", "generate", "score", "select", "train", "gate", "evaluate")
#: The checkpoints the pipeline writes (folder relative to the run dir).
MODELS = ("base_model", "train/student", "gate/policy")
#: Columns that hold measured wall-clock times: they differ between any two runs, so
#: artifacts holding them are compared on every other column (see docs/reliability.md).
TIMING_COLUMNS = frozenset({"latency_ms", "latency_mean_ms", "latency_p50_ms",
                            "latency_p95_ms"})


def fault_env(**extra: str) -> dict[str, str]:
    """The CLI's environment: one torch thread (2 shared cores), unbuffered output, and no
    inherited Prefect/MLflow settings, so each run dir has its own Prefect home and store."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    for k in ("PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RANK", "LOCAL_RANK",
              "WORLD_SIZE", "MASTER_PORT", "MMEMB_MLFLOW_PARENT_RUN_ID"):
        if k not in extra:
            env.pop(k, None)
    return env


def write_config(path: Path, **sections) -> Path:
    """pipeline.yaml with some sections replaced (a dict) or merged (``merge_<section>``)."""
    data = yaml.safe_load(CONFIG.read_text())
    for k, v in sections.items():
        if k.startswith("merge_"):
            sec = k.removeprefix("merge_")
            data[sec] = {**(data.get(sec) or {}), **v}
        else:
            data[k] = v
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli_command(config: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "run", str(config), "--run-dir", str(run_dir),
            *extra]


def run_cli(args: list[str], timeout: float = 900, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """Run the CLI to completion (own process group; the whole group is killed on timeout)."""
    p = subprocess.Popen(args, cwd=SRC, env=env or fault_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(p.pid)
        out, _ = p.communicate()
        raise AssertionError(f"{' '.join(args)} ran past {timeout}s:\n{out[-6000:]}") from None
    return subprocess.CompletedProcess(args, p.returncode, out, "")


def run_cli_with(args: list[str], marker: str, action, timeout: float = 900,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the CLI to completion, calling ``action()`` once when a line contains ``marker``
    (to break something the run depends on, at that point of the run)."""
    p = subprocess.Popen(args, cwd=SRC, env=env or fault_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen, fired = [], False
    timer = threading.Timer(timeout, kill_group, args=(p.pid,))
    timer.start()
    try:
        for line in p.stdout:
            seen.append(line)
            if not fired and marker in line:
                fired = True
                action()
        p.wait()
    finally:
        timer.cancel()
    assert fired, f"{marker!r} never appeared:\n" + "".join(seen)[-6000:]
    return subprocess.CompletedProcess(args, p.returncode, "".join(seen), "")


# --------------------------------------------------------------------------- killing

def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return out


def kill_group(pgid: int, wait_s: float = 30.0) -> None:
    """SIGKILL every process of the group and wait until none is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.time() + wait_s
    while group_members(pgid) and time.time() < deadline:
        time.sleep(0.1)


@dataclass
class Kill:
    """One injected SIGKILL and what it hit."""

    stage: str
    planned_delay_s: float
    marker: str = ""  # the output line the delay was counted from
    delay_s: float = 0.0  # from the stage's start marker to the kill
    inside: bool = False  # the stage had not finished (its _stage.json was not written)
    survivors: int = 0  # processes of the group still alive after the kill (must be 0)
    attempt: int = 1
    output: str = field(default="", repr=False)


def kill_during(args: list[str], run_dir: Path, stage: str, delay_s: float,
                timeout: float = 900, env: dict | None = None, marker: str | None = None
                ) -> Kill:
    """Start the CLI, wait for ``marker`` (default: the stage's ``[stage] running:`` line),
    sleep ``delay_s``, SIGKILL the group.

    Returns what happened; raises if the run ended (or failed) before the marker appeared.
    """
    state = run_dir / stage / "_stage.json"
    before = state.stat().st_mtime_ns if state.exists() else None
    p = subprocess.Popen(args, cwd=SRC, env=env or fault_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()
    seen: list[str] = []

    def pump():
        for line in p.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    marker = marker or f"[{stage}] running:"
    deadline = time.time() + timeout
    started = None
    while started is None:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.time()))
        except queue.Empty:
            line = ""
        if line is None or time.time() > deadline:
            kill_group(p.pid)
            p.wait()
            raise AssertionError(f"{marker!r} never appeared (rc {p.poll()}):\n"
                                 + "".join(seen)[-6000:])
        seen.append(line)
        if marker in line:
            started = time.perf_counter()
    time.sleep(delay_s)
    kill_group(p.pid)
    waited = time.perf_counter() - started
    p.wait(timeout=60)
    survivors = len(group_members(p.pid))
    with contextlib.suppress(queue.Empty):
        while (line := lines.get(timeout=2)) is not None:
            seen.append(line)
    after = state.stat().st_mtime_ns if state.exists() else None
    return Kill(stage, delay_s, marker, waited, inside=after is None or after == before,
                survivors=survivors, output="".join(seen))


# --------------------------------------------------------------------------- auditing

@dataclass
class Audit:
    """What a crash left in a run directory."""

    artifacts: int = 0  # complete artifacts (manifest present), every part verified
    shards: int = 0  # finished shards of a resumable stage (each readable)
    temp_leftovers: list[str] = field(default_factory=list)  # .*.tmp / .*.old of dead writers
    broken: list[str] = field(default_factory=list)  # must stay empty


def _skip(p: Path, run_dir: Path) -> bool:
    rel = p.relative_to(run_dir).parts
    return bool(rel) and rel[0] in ("mlartifacts", ".prefect")


def audit(run_dir: Path) -> Audit:
    """Every artifact a reader could open is complete and matches its digests; every shard
    file is a whole Parquet file; partial writes exist only under hidden temp names, which
    no reader opens (``io.read`` needs a manifest, shards are globbed as ``*.parquet``)."""
    import pyarrow.parquet as pq

    from data_contracts import io
    from data_contracts.schemas import get_contract
    from tasks import cache

    a = Audit()
    for m in sorted(run_dir.rglob(io.MANIFEST)):
        if _skip(m, run_dir) or any(part.startswith(".") for part in
                                    m.relative_to(run_dir).parts[:-1]):
            continue
        try:
            contract = get_contract(json.loads(m.read_text())["contract"])
            io.read(m.parent, contract)
            a.artifacts += 1
        except Exception as e:  # noqa: BLE001 - reported, the test fails on it
            a.broken.append(f"{m.parent}: {type(e).__name__}: {e}")
    for s in sorted(run_dir.rglob("_shards/*.parquet")):
        try:
            pq.read_table(s)
            a.shards += 1
        except Exception as e:  # noqa: BLE001
            a.broken.append(f"{s}: {type(e).__name__}: {e}")
    for t in sorted(run_dir.rglob(".*")):
        if not _skip(t, run_dir) and t.name.endswith((".tmp", ".old")):
            a.temp_leftovers.append(str(t.relative_to(run_dir)))
    for stage in STAGES:  # a stage recorded as done has all its outputs, intact
        st = cache.read_state(run_dir, stage)
        if st is not None:
            ok, why = cache.outputs_intact(cache.result_from_state(st["result"]),
                                           st.get("model_digests"))
            if not ok:
                a.broken.append(f"{stage}/_stage.json: {why}")
    return a


# --------------------------------------------------------------------------- fingerprints

def table_digest(path: Path, drop: frozenset[str] = TIMING_COLUMNS) -> str:
    """sha256 of an artifact's rows without the ``drop`` columns (read and verified)."""
    from data_contracts import io
    from data_contracts.schemas import get_contract

    contract = get_contract(json.loads((path / io.MANIFEST).read_text())["contract"])
    t = io.read(path, contract)
    t = t.select([c for c in t.column_names if c not in drop])
    blob = json.dumps(t.to_pylist(), sort_keys=True, default=repr).encode()
    return hashlib.sha256(blob).hexdigest()


def fingerprint(run_dir: Path) -> dict[str, str]:
    """{artifact or model (relative path): digest} of a finished run.

    Artifacts: the manifest digest (sha256 of the Parquet parts' sha256s); for those with
    timing columns, a digest of the rows without them. Models: the stage cache's content
    digest (model files only; ``mmemb_pretrain.json``, a timing note, is not part of it).
    """
    from data_contracts import io
    from tasks import cache

    out: dict[str, str] = {}
    for m in sorted(run_dir.rglob(io.MANIFEST)):
        if _skip(m, run_dir):
            continue
        rel = str(m.parent.relative_to(run_dir))
        body = json.loads(m.read_text())
        from data_contracts.schemas import get_contract

        cols = set(get_contract(body["contract"]).columns)
        out[rel] = (("rows:" + table_digest(m.parent)) if cols & TIMING_COLUMNS
                    else body["digest"])
    for name in MODELS:
        if (run_dir / name).is_dir():
            out[name] = cache.path_digest(run_dir / name)
    return out


def stage_keys(run_dir: Path) -> dict[str, str]:
    """The cache key each stage recorded: equal keys = equal config, code and input digests."""
    from tasks import cache

    return {s: st["key"] for s in STAGES if (st := cache.read_state(run_dir, s))}


def max_abs_diff(a: Path, b: Path) -> float:
    """Largest absolute difference between two checkpoints' tensors (same names, shapes)."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max(float((wa[k].float() - wb[k].float()).abs().max()) if wa[k].numel() else 0.0
               for k in wa)


def park(run_dir: Path, dest: Path) -> Path:
    """Move a finished run out of the way so the next run can use the same path.

    Artifacts record absolute paths (a teacher's ``model`` column, the stage cache's input
    paths), so runs are only comparable byte for byte at the same run directory.
    """
    if dest.exists():
        shutil.rmtree(dest)
    shutil.move(str(run_dir), str(dest))
    return dest
