"""Atomic DeepSpeed checkpoints and resume.

A checkpoint is ``<out>/checkpoints/step-00000040/`` holding DeepSpeed's files (model,
ZeRO-partitioned optimizer states, LR scheduler, our client state) and ``meta.json``. It
is written under ``.tmp-step-…`` by every rank and renamed into place by rank 0 only after
all ranks finished and ``meta.json`` was written, so a run killed at any moment leaves
either a complete checkpoint or a temp folder that resume ignores (and the next save
removes). ``meta.json`` also records what fixes the data order (seed, global batch, rows);
resuming with different values would silently train on other batches, so it is refused.

Multi-node runs need ``out`` on a filesystem every node sees (as DeepSpeed does itself).

Example::

    >>> latest_checkpoint("/nonexistent") is None
    True
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from data_contracts.files import atomic_write_json, fsync_path
from mmemb.training.distributed import barrier, is_main

_STEP_DIR = re.compile(r"^step-(\d{8})$")
META = "meta.json"
TAG = "state"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (``meta.json`` present), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / META).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(root: str | Path) -> tuple[int, Path] | None:
    cks = list_checkpoints(root)
    return cks[-1] if cks else None


def save_checkpoint(engine, root: str | Path, step: int, meta: dict,
                    client_state: dict | None = None, keep: int = 2) -> Path:
    """Collective: every rank calls it. Returns the final folder."""
    root = Path(root)
    # One name every rank derives alike (they all write into it); stale ones are removed.
    tmp = root / f".tmp-step-{step:08d}"
    final = root / f"step-{step:08d}"
    if is_main():
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    engine.save_checkpoint(str(tmp), tag=TAG, client_state=dict(client_state or {}),
                           save_latest=False)
    barrier()
    if is_main():
        atomic_write_json(tmp / META, {**meta, "step": step, "time": time.time()})
        fsync_path(tmp)
        if final.exists():  # a step re-done after a resume: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(root)
        for _, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def meta_diff(path: Path, expect: dict) -> dict:
    """``{key: (checkpoint's, now)}`` for every value of ``expect`` the checkpoint differs in."""
    meta = json.loads((path / META).read_text())
    return {k: (meta.get(k), v) for k, v in expect.items() if meta.get(k) != v}


def load_checkpoint(engine, path: str | Path) -> dict:
    """Collective: restore weights, optimizer, scheduler; return the client state."""
    _, client = engine.load_checkpoint(str(path), tag=TAG, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if client is None:
        raise RuntimeError(f"{path}: DeepSpeed could not load the checkpoint")
    return client
