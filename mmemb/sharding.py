"""Resumable sharded runs: long stages survive a crash and restart where they stopped.

A stage that turns many inputs into rows (generation, scoring, embedding for evaluation)
cuts its input into named shards and hands each to a ``process`` function. Every finished
shard is written atomically to ``<out>/_shards/<name>.parquet``; a rerun finds it there and
skips it. When all shards exist, they are concatenated in shard order and written as the
final artifact with :func:`data_contracts.io.write` (which validates it and replaces the
folder, ``_shards`` included, in one rename). So after a kill at any instant:

* a shard file is either complete or absent (temp file + rename), never half-written;
* the final artifact is either complete (manifest present) or absent;
* a rerun with the same inputs and config produces the same rows as an uninterrupted run,
  provided ``process`` is deterministic per shard (the stages seed per request or shard).

A fingerprint (config + input digests) is stored beside the shards and beside the final
artifact (``_run.json``). Shards written under another fingerprint are discarded, not
mixed in; a complete artifact with the same fingerprint is returned without recomputing.

Several GPUs or nodes: pass ``distributed`` with ``backend: ray`` and the unfinished shards
run as a Ray Data pipeline over a pool of actors (:mod:`mmemb.distributed.ray_data`), one
engine or embedder per actor; this process writes each shard as it arrives, so resumption
is the same as above. ``process`` must then be picklable: a callable object holding its
config, building its heavy state lazily on the first call and dropping it when pickled.

Low level, without Ray: ``replica=i, replicas=N`` makes a process handle shards ``i, i+N,
...``; only replica 0 assembles once every shard exists (the stages use Ray instead).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts import io
from data_contracts.files import atomic_write_json, json_digest
from data_contracts.io import ArtifactRef, ContractError
from data_contracts.schemas import Contract
from mmemb.configs.distributed import DistributedSettings

T = TypeVar("T")
SHARDS = "_shards"
RUN_FILE = "_run.json"
FINGERPRINT_FILE = "_fingerprint.json"


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run a block with ``n`` torch intra-op threads (None: leave torch's setting).

    Why: small models on a few shared CPU cores run *slower* with more threads; measured
    here, 20 warm-up steps of the tiny model took 3.6 s with 1 thread and 66 s with 2 while
    other processes used the cores (OpenMP threads spin-wait on each other).
    """
    if not n:
        yield
        return
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def fingerprint(*parts: Any) -> str:
    """A stable digest of JSON-able parts (configs, input digests)."""
    return json_digest(list(parts))


def input_digest(path: str | Path) -> str:
    """The digest of an input artifact (its manifest's) or plain Parquet file (hashed)."""
    return io.content_digest(path)


@dataclass
class ShardRun:
    """What a sharded run did."""

    ref: ArtifactRef | None  # None: other replicas still have shards to write
    n_shards: int
    processed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # left to other replicas
    reused: bool = False  # the complete artifact was already there
    seconds: float = 0.0


class ShardedWriter:
    """The shard folder of one artifact: which shards exist, write one, assemble all."""

    def __init__(self, out: str | Path, contract: Contract, fp: str, resume: bool = True,
                 log: Callable[[str], None] = print):
        self.out, self.contract, self.fp, self.log = Path(out), contract, fp, log
        self.dir = self.out / SHARDS
        if self.dir.is_dir():
            old = self._stored_fp()
            if not resume or old != self.fp:
                why = "resume is off" if not resume else "inputs or config changed"
                self.log(f"[shards] discarding {len(self.finished())} shard(s) in {self.dir} "
                         f"({why})")
                shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / FINGERPRINT_FILE, {"fingerprint": self.fp}, indent=None)

    def _stored_fp(self) -> str | None:
        try:
            return json.loads((self.dir / FINGERPRINT_FILE).read_text())["fingerprint"]
        except (OSError, ValueError, KeyError):
            return None

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.parquet"

    def finished(self) -> set[str]:
        return {p.stem for p in self.dir.glob("*.parquet")} if self.dir.is_dir() else set()

    def write(self, name: str, rows: list[dict] | pa.Table) -> int:
        """Validate one shard's rows against the contract and write them atomically."""
        table = io.conform(rows, self.contract, str(self.path(name)))
        io.validate(table, self.contract, str(self.path(name)))
        io.atomic_write_parquet(table, self.path(name))
        return table.num_rows

    def assemble(self, names: Sequence[str], extra: dict | None = None) -> ArtifactRef:
        """Concatenate the shards in ``names`` order into the final, validated artifact."""
        tables = []
        for n in names:
            try:
                tables.append(pq.read_table(self.path(n)))
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types
                raise ContractError(self.path(n), f"shard cannot be read ({e}).",
                                    fix="delete it and rerun; it will be recomputed.") from e
        table = (pa.concat_tables([io.conform(t, self.contract) for t in tables])
                 if tables else self.contract.schema.empty_table())
        ref = io.write(table, self.out, self.contract)
        # After io.write: a crash here leaves a complete artifact without _run.json, which a
        # rerun recomputes (safe), never the reverse.
        atomic_write_json(self.out / RUN_FILE,
                          {"fingerprint": self.fp, "shards": len(names), **(extra or {})})
        return ref


def complete_with(out: str | Path, fp: str) -> bool:
    """True when ``out`` is a complete artifact written under fingerprint ``fp``."""
    out = Path(out)
    if not io.exists(out):
        return False
    try:
        return json.loads((out / RUN_FILE).read_text()).get("fingerprint") == fp
    except (OSError, ValueError):
        return False


def split(items: Sequence[T], shard_size: int) -> list[list[T]]:
    """Consecutive chunks of ``shard_size`` items (the last may be shorter)."""
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size}: must be >= 1")
    return [list(items[i:i + shard_size]) for i in range(0, len(items), shard_size)]


def run_sharded(shards: Sequence[tuple[str, Sequence[T]]], out: str | Path, contract: Contract,
                process: Callable[[str, Sequence[T]], list[dict] | pa.Table], fp: str, *,
                resume: bool = True, replica: int = 0, replicas: int = 1,
                progress: bool = True, log: Callable[[str], None] = print,
                distributed: DistributedSettings | None = None) -> ShardRun:
    """Run ``process`` on every unfinished shard, then assemble the artifact at ``out``.

    ``shards`` are ``(name, items)`` in the order the final artifact keeps; names must be
    unique and file-name safe. ``process(name, items)`` returns the shard's rows.
    ``distributed`` with ``backend='ray'``: the shards run on a Ray Data actor pool and are
    written here as they finish (any order); the artifact is the same.
    """
    t0 = time.perf_counter()
    names = [n for n, _ in shards]
    if len(set(names)) != len(names):
        raise ValueError("shard names must be unique")
    if not 0 <= replica < replicas:
        raise ValueError(f"replica={replica} must be in [0, replicas={replicas})")
    on_ray = distributed is not None and distributed.backend == "ray"
    if on_ray and replicas > 1:
        raise ValueError("replicas > 1 with distributed.backend='ray': Ray already spreads "
                         "the shards over its actors; drop replica/replicas")
    if resume and complete_with(out, fp):
        log(f"[shards] {out} is complete for these inputs and config; nothing to do")
        return ShardRun(io.ref(out), len(names), skipped=names, reused=True,
                        seconds=time.perf_counter() - t0)
    w = ShardedWriter(out, contract, fp, resume=resume, log=log)
    done = w.finished()
    mine = [(i, n, items) for i, (n, items) in enumerate(shards) if i % replicas == replica]
    todo = [(n, items) for _, n, items in mine if n not in done]
    skipped = [n for _, n, _ in mine if n in done]
    if skipped:
        log(f"[shards] resuming: {len(skipped)} of {len(mine)} shard(s) already done")
    processed: list[str] = []
    if on_ray:
        from mmemb.distributed.ray_data import map_shards

        def keep(name: str, table: pa.Table) -> None:
            w.write(name, table)
            processed.append(name)

        map_shards(todo, process, contract, distributed, keep, progress=progress, log=log)
    else:
        _run_here(todo, process, w, processed, progress, Path(out).name)
    missing = sorted(set(names) - w.finished())
    res = ShardRun(None, len(names), processed, skipped, missing)
    if missing:
        log(f"[shards] {len(missing)} shard(s) left to other replicas; rerun with "
            "replicas=1 (or let replica 0 finish last) to assemble")
    elif replica == 0:
        backend = {"backend": "ray", "actors": distributed.actors} if on_ray else \
            {"backend": "inprocess"}
        res.ref = w.assemble(names, extra=backend)
    res.seconds = time.perf_counter() - t0
    return res


def _run_here(todo: Sequence[tuple[str, Sequence[T]]], process: Callable, w: ShardedWriter,
              processed: list[str], progress: bool, label: str) -> None:
    """The in-process backend: one shard after the other, each written when done."""
    from tqdm.auto import tqdm

    for n, items in tqdm(todo, desc=f"shards -> {label}", unit="shard",
                         disable=not progress or not todo):
        w.write(n, process(n, items))
        processed.append(n)
