"""The evaluation's embeddings on Ray Data: one pass per mode, then look-ups by content.

Why: the harness asks its encoder for a task's candidates, then its queries, task after
task; on Ray each of those calls would be a pipeline (an actor pool, a model load per
actor). Instead, with ``distributed.backend: ray``, the evaluate stage first collects every
distinct input the evaluation will embed, per mode, over all selected tasks
(:func:`mmemb.eval.harness.inputs_by_mode`), embeds them in one resumable sharded Ray
pipeline (shards of one mode each, so one actor pool and one model load per actor for all
modes; ``<out>/distributed/embeddings``, vectors as Arrow fixed-size lists), then runs the
unchanged harness with a :class:`LookupEncoder` that answers each call from those
tables by content key: vectors and the adaptive fields (reasoned, rationale, tokens, the
actor's latency, p(<think>)). Failed inputs keep their status and their exact message.
"""

from __future__ import annotations

import builtins
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from data_contracts import io
from data_contracts.schemas import STATUS_VALUES, Contract
from data_contracts.vectors import matrix, vector_array, vector_type
from mmemb.eval.encoding import EncodeResult
from mmemb.model.prompts import EmbedInput
from mmemb.sharding import fingerprint, run_sharded, split

FOLDER = "distributed"


def input_key(inp: EmbedInput) -> str:
    """The content key of one input: instruction, text, images (as given), rationale."""
    body = [inp.instruction, inp.text, [str(i) for i in inp.images], inp.rationale]
    return hashlib.sha1(json.dumps(body).encode()).hexdigest()


def lookup_contract(dim: int) -> Contract:
    """One embedded input per row, keyed by its content; zeros where status != ok."""
    return Contract(
        name="eval_lookup", version=1,
        schema=pa.schema([
            pa.field("mode", pa.string(), nullable=False),
            pa.field("key", pa.string(), nullable=False),
            pa.field("status", pa.string(), nullable=False),
            pa.field("error", pa.string()),
            pa.field("embedding", vector_type(dim)),
            pa.field("reasoned", pa.bool_()),
            pa.field("rationale", pa.string()),
            pa.field("n_prompt_tokens", pa.int32()),
            pa.field("n_gen_tokens", pa.int32()),
            pa.field("latency_ms", pa.float32()),
            pa.field("p_think", pa.float32()),
        ]),
        key=("mode", "key"), non_empty=("key", "status"), enums={"status": STATUS_VALUES},
        doc="The Ray pre-pass of the evaluation: embeddings by content key.")


_FIELDS = ("status", "error", "reasoned", "rationale", "n_prompt_tokens", "n_gen_tokens",
           "latency_ms", "p_think")


@dataclass
class EvalEmbedWorker:
    """``process`` of the pre-pass: one shard's inputs through the stage's own encoder.

    Picklable: only the config, the gate settings and the vector size travel; each actor
    builds its encoder (:func:`mmemb.stages.evaluate.build_encoder`) on its first shard.
    Rows come from :func:`mmemb.eval.harness.encode_rows`, the harness's own conversion, so
    an input that fails here fails with the message it has in process.
    """

    cfg: Any  # EvaluateConfig, device and dtype fixed by the driver
    gate: Any  # GateSettings
    dim: int
    encoder: Any = field(default=None, repr=False)

    def __call__(self, name: str, items: list[tuple[str, str, EmbedInput]]) -> pa.Table:
        from mmemb.eval import harness
        from mmemb.sharding import torch_threads

        if self.encoder is None:
            from mmemb.stages.evaluate import build_encoder

            self.encoder = build_encoder(self.cfg, self.gate)[0]
        mode = items[0][0]
        its = [harness.EmbedItem(key, inp) for _, key, inp in items]
        with torch_threads(getattr(self.cfg, "torch_threads", None)):
            vecs, rows = harness.encode_rows(self.encoder, its, mode, task="", side="")
        if vecs is None:
            vecs = np.zeros((len(rows), self.dim), np.float32)  # [n, H]
        cols = {f: [r[f] for r in rows] for f in _FIELDS}
        return pa.table({"mode": [mode] * len(items), "key": [k for _, k, _ in items],
                         **{f: cols[f] for f in _FIELDS[:2]},
                         "embedding": vector_array(vecs),
                         **{f: cols[f] for f in _FIELDS[2:]}},
                        schema=lookup_contract(self.dim).schema)

    def close(self) -> None:
        vllm = getattr(self.encoder, "vllm", None)
        if vllm is not None:
            vllm.close()
        self.encoder = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "encoder": None}  # models never travel


def _raise_as(message: str) -> None:
    """Raise what the actor caught, as the harness formats it (``Type: message``), so the
    harness records the same error text as an in-process run."""
    name, sep, rest = message.partition(": ")
    kind = getattr(builtins, name, None)
    if not (sep and isinstance(kind, type) and issubclass(kind, Exception)):
        kind = type(name, (RuntimeError,), {}) if sep and name.isidentifier() else None
    if kind is None:
        raise RuntimeError(message)
    raise kind(rest)


class LookupEncoder:
    """An :class:`~mmemb.eval.encoding.Encoder` answering from the pre-pass tables.

    ``misses`` counts inputs the pre-pass did not embed (a bug: the collection and the
    harness disagree); the stage refuses such a run."""

    def __init__(self, table: pa.Table):
        modes, keys = table.column("mode").to_pylist(), table.column("key").to_pylist()
        self.index = {(m, k): i for i, (m, k) in enumerate(zip(modes, keys, strict=True))}
        self.vectors = matrix(table.column("embedding"))  # [N, H], zero-copy
        self.fields = {f: table.column(f).to_pylist() for f in _FIELDS}
        self.misses = 0

    def encode(self, inputs: list[EmbedInput], mode: str) -> EncodeResult:
        pos = []
        for inp in inputs:
            i = self.index.get((mode, input_key(inp)))
            if i is None:
                self.misses += 1
                raise KeyError(f"input not embedded by the Ray pre-pass (mode {mode})")
            pos.append(i)
        f = self.fields
        for i in pos:
            if f["status"][i] != "ok" and f["error"][i] != "non-finite embedding":
                _raise_as(f["error"][i] or "RuntimeError: failed")
        emb = self.vectors[pos].astype(np.float32)  # [n, H]
        bad = [j for j, i in enumerate(pos) if f["status"][i] != "ok"]
        emb[bad] = np.nan  # the harness marks them "non-finite embedding", as in process
        return EncodeResult(
            emb, reasoned=[bool(f["reasoned"][i]) for i in pos],
            rationales=[f["rationale"][i] for i in pos],
            n_gen_tokens=[int(f["n_gen_tokens"][i] or 0) for i in pos],
            n_prompt_tokens=[int(f["n_prompt_tokens"][i] or 0) for i in pos],
            latency_ms=[float(f["latency_ms"][i] or 0.0) for i in pos],
            p_think=[f["p_think"][i] for i in pos] if mode == "adaptive" else [])


def embed_all(inputs: Mapping[str, list[EmbedInput]], worker: EvalEmbedWorker, out: Path,
              key: Mapping[str, Any], shard_size: int, distributed,
              log: Callable[[str], None] = print) -> LookupEncoder:
    """Embed each mode's distinct inputs in one sharded Ray pipeline (shards
    ``<mode>-<n>``) into the artifact ``out``; ``key`` is what the vectors depend on (model,
    dtype, each mode's settings), so a rerun with the same inputs and key reuses the
    finished shards or the whole table."""
    shards, listing = [], {}
    for mode, inps in inputs.items():
        distinct = {input_key(x): x for x in inps}  # first occurrence order
        listing[mode] = list(distinct)
        items = [(mode, k, x) for k, x in distinct.items()]
        shards += [(f"{mode}-{i:05d}", s) for i, s in enumerate(split(items, shard_size))]
        log(f"[evaluate] ray pre-pass: {len(items)} distinct {mode} input(s) of {len(inps)}")
    fp = fingerprint("eval-embed-v1", dict(key), worker.dim, listing)
    contract = lookup_contract(worker.dim)
    res = run_sharded(shards, out, contract, worker, fp, progress=False, log=log,
                      distributed=distributed)
    return LookupEncoder(io.read(res.ref.uri, contract))


def hidden_size(model: str) -> int:
    """The embedding size of a checkpoint, from its config alone (no weights loaded here)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model)
    return int(getattr(c, "text_config", c).hidden_size)


def ray_encoder(cfg, gate, rows: pa.Table, corpus: pa.Table | None, image_root,
                tasks, model_key: Callable[[str], str], mode_settings: Mapping[str, Mapping],
                log: Callable[[str], None] = print) -> tuple[LookupEncoder, str]:
    """The evaluate stage's encoder with ``distributed.backend: ray``: every input embedded
    up front on the actor pool, returned as a :class:`LookupEncoder`, with the dtype the
    actors ran (which the harness's cache key needs: ``model_key(dtype)``).

    The actors' device and dtype are fixed here, from what they are given (GPUs or not),
    not from this driver's hardware: a CPU driver may steer GPU actors.
    """
    from mmemb.distributed.ray_data import actor_gpus, ray_session
    from mmemb.eval import harness

    inputs = harness.inputs_by_mode(
        rows, corpus, modes=cfg.modes, image_root=image_root, tasks=tasks,
        categories=cfg.categories, modalities=cfg.modalities, max_queries=cfg.max_queries,
        num_frames=cfg.num_frames, reason_on_candidates=cfg.reason_on_candidates,
        protocol=cfg.protocol)
    with ray_session(cfg.distributed, log) as ray:
        worker = EvalEmbedWorker(cfg, gate, hidden_size(cfg.model))
        gpus = actor_gpus(cfg.distributed, worker, ray.cluster_resources().get("GPU", 0))
        device = cfg.device or ("cuda" if gpus > 0 else "cpu")
        dtype = cfg.dtype if cfg.dtype != "auto" else \
            ("bfloat16" if device.startswith("cuda") else "float32")
        worker.cfg = cfg.model_copy(update={"device": device, "dtype": dtype})
        mk = model_key(dtype)
        key = {m: {"model": mk, "settings": mode_settings.get(m, {}),
                   "encoder": "embedder" if set(cfg.modes) <= {"direct"} else "adaptive",
                   "generation": cfg.generation, "seed": cfg.seed} for m in inputs}
        shard = cfg.distributed.rows_per_task or cfg.chunk_size
        enc = embed_all(inputs, worker, Path(cfg.out) / FOLDER / "embeddings", key, shard,
                        cfg.distributed, log)
    return enc, dtype
