"""Where a stage's heavy passes run: in this process, or on a Ray cluster (Ray Data).

One settings block, shared by the stages whose work is a pure map over rows (generation,
stage 2's embeddings, the evaluation's embeddings). It is a ``runtime`` field of each: the
same rows come out whichever backend computed them (tested), so it is in no digest and a
run may resume across a change of backend.

    generate:
      distributed: {backend: ray, address: auto, actors: 8, gpus_per_actor: 1}
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DistributedSettings(BaseModel):
    """``backend: inprocess`` (the default: one machine, tests) or ``ray``: a Ray Data
    pipeline over a pool of ``actors`` actors, each holding one engine or embedder on
    ``gpus_per_actor`` GPUs."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    backend: Literal["inprocess", "ray"] = Field(
        "inprocess", description="inprocess: this process; ray: Ray Data over an actor pool")
    address: str | None = Field(
        None, description="ray.init(address=...): 'auto' attaches to the cluster this node "
        "belongs to (KubeRay pod, `ray start` under Slurm), 'host:6379' or "
        "'ray://host:10001' to a given one; None starts a fresh local Ray on this machine "
        "(address 'local', own temp folder; a Ray already running in this process is used)")
    actors: int = Field(1, ge=1, description="actors in the pool (one engine/embedder each)")
    gpus_per_actor: float | None = Field(
        None, ge=0, description="GPUs per actor (a vLLM teacher's tensor_parallel_size is "
        "inside one actor); None: 1 when this machine has CUDA, else 0")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per actor")
    rows_per_task: int | None = Field(
        None, ge=1, description="evaluate: inputs per shard of the Ray pre-pass (None: "
        "chunk_size); generate and score send one of their shards (shard_size) per task")

    @model_validator(mode="after")
    def _check(self) -> DistributedSettings:
        if self.backend == "inprocess" and self.address is not None:
            raise ValueError(f"distributed.address={self.address!r} is set but backend is "
                             "'inprocess'; set distributed.backend: ray to use the cluster")
        return self
