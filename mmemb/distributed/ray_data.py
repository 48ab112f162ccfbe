"""A sharded stage's unfinished shards as a Ray Data pipeline over a pool of actors.

Why Ray Data: it already schedules a fixed pool of stateful actors with ``num_gpus`` each
(``map_batches`` with a callable class and ``ActorPoolStrategy``), streams results back
while the pool works, and runs unchanged on a laptop (local Ray) and on a cluster
(``ray.init(address="auto")`` inside a KubeRay pod or after ``ray start`` under Slurm).

The unit of work stays the *shard* of :mod:`mmemb.sharding`, so resumption is unchanged:

* every unfinished shard becomes one dataset row ``{shard: name, items: pickle(items)}``;
* ``map_batches(batch_size=1)`` hands one row at a time to an actor of the pool; the actor
  holds the stage's picklable worker (``process``), which builds its heavy state (a vLLM
  engine, tensor parallel inside it, or an embedder) once, on its first shard;
* the actor returns one row per shard: its name and the shard's rows as an Arrow IPC stream
  (a whole table in one value, so a shard arrives complete or not at all, empty shards and
  null-typed columns included);
* the driver iterates the results as they stream in, in whatever order they finish, and
  writes each shard atomically with :class:`mmemb.sharding.ShardedWriter`: a killed run
  keeps every shard already written and the rerun skips them.

Failed inputs stay rows with their status: the workers already turn them into error rows.
An exception escaping a worker is a bug and stops the run (Ray Data's default,
``max_errored_blocks = 0``), after which the finished shards are still on disk.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from data_contracts import io
from data_contracts.schemas import Contract
from mmemb.configs.distributed import DistributedSettings

#: The folder that holds ``mmemb`` and ``data_contracts``: put on the PYTHONPATH of a local
#: Ray's workers so they import this checkout (a cluster's image must have it installed).
_ROOT = str(Path(__file__).resolve().parents[2])


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:  # pragma: no cover - the extra is installed in this project
        raise ImportError("distributed.backend: ray needs the 'ray' extra: pip install "
                          "'mmemb[ray]' (ray[data]==2.60.0)") from e
    return ray


def _local_cpus(settings: DistributedSettings) -> int:
    """Logical CPUs for a local Ray: at least the pool's reservation plus one for the
    driver's own tasks, so the pool can always start (logical, not a thread count)."""
    need = math.ceil(settings.actors * settings.cpus_per_actor) + 1
    return max(os.cpu_count() or 1, need)


@contextlib.contextmanager
def ray_session(settings: DistributedSettings, log: Callable[[str], None] = print
                ) -> Iterator[Any]:
    """Ray for the duration of a block: the running one (a test's, a notebook's), the
    cluster at ``settings.address``, or a fresh local Ray that is shut down afterwards.

    ``address=None`` means ``"local"`` (a new instance on this machine, in its own temp
    folder), never an instance some other user started on a shared host; ``"auto"``
    attaches to the cluster this node belongs to and fails if there is none.
    """
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    tmp = None
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True,
                              "ignore_reinit_error": True}
    if settings.address is None:
        tmp = tempfile.mkdtemp(prefix="mmemb-ray-")  # short: Ray's socket paths are limited
        path = os.pathsep.join([_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])
        kwargs.update(address="local", num_cpus=_local_cpus(settings), _temp_dir=tmp,
                      runtime_env={"env_vars": {"PYTHONPATH": path}})
        log(f"[ray] starting a local Ray ({kwargs['num_cpus']} logical CPUs, temp {tmp})")
    else:
        kwargs["address"] = settings.address
        log(f"[ray] attaching to the Ray cluster at {settings.address}")
    ray.init(**kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def actor_gpus(settings: DistributedSettings, process: Any, cluster_gpus: float) -> float:
    """GPUs per actor: the setting; else the worker's own need (``process.gpus_per_actor``,
    e.g. a vLLM teacher's tensor_parallel_size) when the cluster has GPUs, else 0."""
    if settings.gpus_per_actor is not None:
        return float(settings.gpus_per_actor)
    if cluster_gpus <= 0:
        return 0.0
    return float(getattr(process, "gpus_per_actor", 1))


def to_ipc(table: pa.Table) -> bytes:
    """One Arrow table as the bytes of an IPC stream (schema and all batches)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


class ShardActor:
    """The callable class Ray Data instantiates once per actor: it runs the stage's worker
    on each shard row and returns ``{shard, rows (Arrow IPC), n_rows}``.

    The worker is unpickled once per actor (it drops its heavy state when pickled and
    rebuilds it lazily), so one engine or embedder serves every shard the actor gets.
    """

    def __init__(self, process: Callable, contract: Contract):
        self.process = process
        self.contract = contract

    def __call__(self, batch: pa.Table) -> pa.Table:
        names, blobs, counts = [], [], []
        for name, payload in zip(batch.column("shard").to_pylist(),
                                 batch.column("items").to_pylist(), strict=True):
            rows = self.process(name, pickle.loads(payload))
            table = io.conform(rows, self.contract, f"shard {name}")  # the contract's types
            names.append(name)
            blobs.append(to_ipc(table))
            counts.append(table.num_rows)
        return pa.table({"shard": pa.array(names, pa.string()),
                         "rows": pa.array(blobs, pa.large_binary()),
                         "n_rows": pa.array(counts, pa.int64())})

    def __del__(self):  # Ray Data deletes the UDF when the pool shuts down gracefully
        close = getattr(self.process, "close", None)
        if callable(close):
            with contextlib.suppress(Exception):
                close()


def map_shards(todo: Sequence[tuple[str, Any]], process: Callable, contract: Contract,
               settings: DistributedSettings, on_shard: Callable[[str, pa.Table], None], *,
               progress: bool = True, log: Callable[[str], None] = print) -> None:
    """Run ``process(name, items)`` for every shard of ``todo`` on a Ray Data actor pool
    and call ``on_shard(name, table)`` on this process as each finishes (any order)."""
    if not todo:
        return
    with ray_session(settings, log) as ray:
        from ray.data import ActorPoolStrategy, DataContext

        ctx = DataContext.get_current()
        ctx.execution_options.preserve_order = False  # shards are written by name
        ctx.enable_progress_bars = False  # one line per shard below instead
        actors = min(settings.actors, len(todo))
        have = ray.cluster_resources().get("GPU", 0)
        gpus = actor_gpus(settings, process, have)
        if settings.address is None and gpus > have:  # a local Ray never grows: it would hang
            raise ValueError(f"distributed.gpus_per_actor={gpus:g} but this machine's Ray "
                             f"has {have:g} GPU(s); set gpus_per_actor: 0 (CPU) or fewer")
        log(f"[ray] {len(todo)} shard(s) over {actors} actor(s) "
            f"({gpus:g} GPU, {settings.cpus_per_actor:g} CPU each)")
        ds = ray.data.from_items([{"shard": n, "items": pickle.dumps(items)}
                                  for n, items in todo])
        ds = ds.map_batches(
            ShardActor, fn_constructor_args=(process, contract), batch_size=1,
            batch_format="pyarrow", num_cpus=settings.cpus_per_actor, num_gpus=gpus or None,
            compute=ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=2))
        from tqdm.auto import tqdm

        with tqdm(total=len(todo), desc="shards (ray)", unit="shard",
                  disable=not progress) as bar:
            for row in ds.iter_rows():
                table = from_ipc(row["rows"])
                if table.num_rows != row["n_rows"]:
                    raise RuntimeError(f"shard {row['shard']}: {table.num_rows} rows arrived, "
                                       f"the actor sent {row['n_rows']}")
                on_shard(row["shard"], table)
                bar.update(1)
