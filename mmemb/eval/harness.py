"""The one evaluator: one code path scores MMEB-V2, the synthetic benchmark and the stages.

:func:`score_task` (embed, rank and score one task in each mode) is used by the evaluate
stage through :func:`evaluate` (cached, with the report), by the train stage's eval between
its phases through :func:`evaluate_rows` / :func:`task_means` (in memory, direct mode, on
the training engine) and by the gate stage's report through :func:`gate_decisions` (the
gate's decisions on the queries); :func:`encode_rows` is the one place an encoder's result
becomes ``EMBEDDINGS`` rows with a status, which ``mmemb embed`` uses too.

Any object with ``encode(inputs: list[EmbedInput], mode: str) -> EncodeResult`` is an
:class:`Encoder`: the plain :class:`EmbedderEncoder` below (direct mode, and reasoning mode
with given rationales) or :class:`mmemb.inference.AdaptiveEncoder` (direct | reason |
adaptive, generating rationales). The harness reads only the result's fields, so it cannot
tell them apart and does not need to.

Per task and mode it

1. embeds the candidates once per unique (instruction, text, image) of the task, or the
   whole corpus of a globally ranked task, and the queries; both are cached as
   ``EMBEDDINGS`` Parquet under ``<out>/cache/<model key>/<suite>/<task>/<rows digest>/``,
   written in chunks so an interrupted task resumes mid-way and a finished task is never
   recomputed for the same model, mode and rows;
2. ranks each query's own candidate list (local tasks) or the whole corpus (global tasks,
   by chunked matmul and a running top-k, :mod:`mmemb.eval.ranking`, never the whole
   [queries, corpus] matrix) by cosine similarity and scores it with
   :mod:`mmemb.eval.metrics`;
3. writes one ``EVAL_RESULTS`` row per (task, mode) with the query-side reasoning ratio,
   generated tokens and latency (mean, p50, p95).

Candidates are embedded in direct mode by default (``reason_on_candidates=False``): in this
method the gate is a *query-side* decision (the model learns when a query needs an
inference step before it can match a target), candidates are encoded once and indexed like a
retrieval corpus, and generating a rationale for every one of a corpus's items would
multiply the cost by the corpus size for no trained benefit. Set it to ``True`` to embed
candidates in the query's mode (an ablation).

Inputs that fail (unreadable image, empty frame folder, an exception in the encoder) are
kept as rows with ``status='error'``: a failed query counts as a miss, a failed candidate
can never be ranked first, and the task's result row carries ``status='error'`` with the
count and the first message, so a partial failure is never reported as a clean score.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_contracts import io, vectors
from data_contracts.files import atomic_write_json, atomic_write_text, json_digest
from data_contracts.io import ContractError
from data_contracts.schemas import EMBEDDINGS, EVAL_CORPUS, EVAL_RESULTS, EVAL_ROWS
from data_contracts.vectors import VectorDtype
from mmemb.data.mmeb import NUM_FRAMES, media_files
from mmemb.eval import metrics, ranking, report
from mmemb.eval import synthetic as _synthetic  # noqa: F401  (registers the 'synthetic' suite)
from mmemb.eval.encoding import Encoder, EncodeResult
from mmemb.eval.tasks import DEFAULT_SUITE, MODALITIES, TaskSpec, get_task, select_tasks
from mmemb.model.prompts import EmbedInput

MODES = ("direct", "reason", "adaptive")
Log = Callable[[str], None]


# --------------------------------------------------------------------------- protocol

class EmbedderEncoder:
    """An :class:`~mmemb.model.embedder.Embedder` as an :class:`Encoder`.

    ``direct``: one forward pass per input. ``reason``: the rationale already on each input
    (e.g. a teacher's) is placed in ``<think>..</think>`` before ``<emb>``; nothing is
    generated, so ``n_gen_tokens`` is 0. Generated reasoning and the adaptive gate are
    :class:`mmemb.inference.AdaptiveEncoder`'s job. Per-input latency is its share of its
    batch's wall time (``batch_size=1`` gives true per-query latency).
    """

    modes = ("direct", "reason")

    def __init__(self, embedder, batch_size: int = 16):
        self.embedder = embedder
        self.batch_size = batch_size

    def encode(self, inputs: list[EmbedInput], mode: str = "direct") -> EncodeResult:
        """Embed in batches of ``batch_size``; each input's latency is its batch's share."""
        import torch

        if mode not in self.modes:
            raise ValueError(f"mode={mode!r}: EmbedderEncoder does {self.modes}; for generated "
                             "reasoning and 'adaptive' use mmemb.inference.AdaptiveEncoder")
        res = EncodeResult(None)
        chunks = []
        for s in range(0, len(inputs), self.batch_size):
            batch = inputs[s:s + self.batch_size]
            t0 = time.perf_counter()
            out = self.embedder.encode(batch, batch_size=len(batch), mode=mode)
            dt = 1000 * (time.perf_counter() - t0) / len(batch)
            chunks.append(out.embeddings)
            res.latency_ms += [dt] * len(batch)
            res.n_prompt_tokens += [int(n) for n in out.n_tokens]
        res.embeddings = (torch.cat(chunks) if chunks
                          else torch.zeros(0, self.embedder.hidden_size))
        res.reasoned = [mode == "reason"] * len(inputs)
        res.rationales = [x.rationale if mode == "reason" else None for x in inputs]
        res.n_gen_tokens = [0] * len(inputs)
        return res


# --------------------------------------------------------------------------- helpers

def _digest(obj: Any) -> str:
    return json_digest(obj)  # the one digest home (data_contracts.files)


def checkpoint_digest(path: str | Path, memo: str | Path | None = None) -> str:
    """Content digest of a checkpoint (its model files; see
    :func:`data_contracts.files.checkpoint_digest`), memoised by (path, size, mtime) in
    ``memo`` so a multi-GB checkpoint is hashed once, not on every evaluation."""
    from data_contracts import files

    path = Path(path)
    if not path.exists():
        return _digest({"id": str(path)})  # a hub id: its name is all we can key on
    return files.checkpoint_digest(path, memo)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _normalise(e: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(e, axis=1, keepdims=True)  # [N, 1]
    return np.where(n > 0, e / np.maximum(n, 1e-12), 0.0).astype(np.float32)  # [N, H]


@dataclass
class EmbedItem:
    """One thing to embed, with its contract id; ``error`` when its media cannot be read."""

    id: str
    inp: EmbedInput | None
    error: str | None = None


@dataclass
class Embedded:
    """Cached embeddings of one side of a task, in item order."""

    ids: list[str]
    emb: np.ndarray  # [N, H] L2-normalised; zeros where status != ok
    ok: np.ndarray  # [N] bool
    rows: list[dict]  # EMBEDDINGS rows (without the vector)
    computed: int = 0  # inputs encoded in this call (0 = fully cached)


def make_items(ids: Sequence[str], insts: Sequence[str | None], texts: Sequence[str | None],
               imgs: Sequence[str | None], image_root: str | Path | None,
               num_frames: int | None, pad: bool = True) -> list[EmbedItem]:
    """One :class:`EmbedItem` per input; a path whose media cannot be listed (an empty
    frame folder) gives an item with its error instead of an input. ``num_frames`` / ``pad``:
    :func:`mmemb.data.mmeb.sample_frames` (see :func:`frame_policy`)."""
    out = []
    for i, inst, text, img in zip(ids, insts, texts, imgs, strict=True):
        try:
            files = media_files(img or "", image_root, num_frames, pad)
            out.append(EmbedItem(i, EmbedInput(text=text or "", instruction=inst or "",
                                           images=files)))
        except (OSError, ValueError) as e:
            out.append(EmbedItem(i, None, f"{type(e).__name__}: {e}"))
    return out


def _result_lists(res: Any, n: int, wall_ms: float, mode: str) -> dict[str, list]:
    """Per-input fields of an encoder's result, defaulted where an encoder omits one; the
    gate's p(<think>) only in adaptive mode (the other modes make no decision)."""
    def get(name, default):
        v = list(getattr(res, name, None) or [])
        if v and len(v) != n:
            raise ValueError(f"encoder returned {len(v)} {name} for {n} inputs")
        return v or [default] * n

    lat = get("latency_ms", wall_ms / max(n, 1))
    p = get("p_think", None) if mode == "adaptive" else [None] * n
    return {"reasoned": [bool(x) for x in get("reasoned", False)],
            "rationale": get("rationales", None),
            "n_gen_tokens": [int(x) for x in get("n_gen_tokens", 0)],
            "n_prompt_tokens": [int(x) for x in get("n_prompt_tokens", 0)] or [0] * n,
            "latency_ms": [float(x) for x in lat],
            "p_think": [None if x is None else float(x) for x in p]}


def encode_rows(encoder: Encoder, items: list[EmbedItem], mode: str, task: str, side: str,
                strict: bool = False) -> tuple[np.ndarray | None, list[dict]]:
    """Encode the items that have inputs into ``EMBEDDINGS`` rows, one per item.

    The one place an encoder's result becomes rows: an input that could not be read, a
    non-finite embedding or an encoder exception gives a row with ``status='error'`` and the
    message. On an exception the batch is retried one by one so a single bad input fails
    alone; ``strict`` raises instead (training: every rank must run the same forward passes).
    Returns ([n, H] or None when nothing succeeded, rows); the rows hold no vector, and
    :func:`embedding_table` makes the artifact table of both.
    """
    rows = [{"id": it.id, "task": task, "side": side, "mode": mode,
             "reasoned": False, "rationale": None, "n_prompt_tokens": None,
             "n_gen_tokens": 0, "latency_ms": None, "status": "error", "error": it.error,
             "p_think": None} for it in items]
    live = [k for k, it in enumerate(items) if it.inp is not None]
    vecs: dict[int, np.ndarray] = {}

    def run(idx: list[int]) -> None:
        t0 = time.perf_counter()
        res = encoder.encode([items[k].inp for k in idx], mode)
        wall = 1000 * (time.perf_counter() - t0)
        e = _as_numpy(res.embeddings)  # [n, H]
        if e.ndim != 2 or e.shape[0] != len(idx):
            raise ValueError(f"encoder returned embeddings of shape {e.shape} for {len(idx)} "
                             "inputs")
        fields = _result_lists(res, len(idx), wall, mode)
        for j, k in enumerate(idx):
            if not np.isfinite(e[j]).all():
                rows[k].update(status="error", error="non-finite embedding")
                continue
            vecs[k] = e[j]
            rows[k].update(status="ok", error=None,
                           **{f: fields[f][j] for f in ("reasoned", "rationale", "n_gen_tokens",
                                                        "latency_ms", "p_think")},
                           n_prompt_tokens=fields["n_prompt_tokens"][j] or None)

    if live:
        try:
            run(live)
        except Exception as e:  # noqa: BLE001 - isolate the failing input(s)
            if strict:
                raise
            if len(live) == 1:
                rows[live[0]]["error"] = f"{type(e).__name__}: {e}"
            else:
                for k in live:
                    try:
                        run([k])
                    except Exception as e1:  # noqa: BLE001
                        rows[k]["error"] = f"{type(e1).__name__}: {e1}"
    return _with_vectors(rows, vecs)


def _with_vectors(rows: list[dict], vecs: dict[int, np.ndarray]
                  ) -> tuple[np.ndarray | None, list[dict]]:
    """[n, H] of the ok rows (zeros elsewhere), or None when no row has a vector. The rows
    carry no vector: :func:`embedding_table` joins both as Arrow buffers (through Python
    lists, 5,000 x 1,536 vectors took 3.3 s in and out: bench/bench_embed_io.py)."""
    if not vecs:
        return None, rows
    dim = next(iter(vecs.values())).shape[0]
    out = np.zeros((len(rows), dim), dtype=np.float32)  # [n, H]
    for k, v in vecs.items():
        out[k] = v
    return out, rows


_EMB = EMBEDDINGS.schema.get_field_index("embedding")
_META = EMBEDDINGS.schema.remove(_EMB)  # the contract without its vector column


def embedding_table(rows: list[dict], vecs: np.ndarray | None,
                    dtype: VectorDtype = "float32", where: str = "<memory>") -> pa.Table:
    """The ``EMBEDDINGS`` table of :func:`encode_rows`' rows and vectors [n, H]: the vector
    column a ``fixed_size_list<dtype, H>`` (zeros where status != ok); without any vector
    (every row failed, or an encoder that only decides) a null ``list<float32>`` column."""
    try:
        meta = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "embedding"}
                                     for r in rows], schema=_META)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ContractError(where, f"rows do not fit contract 'embeddings': {e}") from e
    if vecs is not None and vecs.ndim == 2 and vecs.shape[1] > 0:
        col = vectors.vector_array(vecs, dtype)
    else:
        col = pa.nulls(len(rows), pa.list_(pa.float32()))
    return io.conform(meta.add_column(_EMB, "embedding", col), EMBEDDINGS, where)


def read_vectors(table: pa.Table, where: str = "<memory>") -> np.ndarray:
    """[N, H] float32 of an ``EMBEDDINGS`` table's vector column, zeros where status != ok,
    read through Arrow buffers (a zero-copy view of a fixed-size list; float16 widened).

    An older artifact's ``list<float>`` column (empty lists on failed rows) is read through
    its flat values too; rows of other lengths raise, naming ``where`` and the column."""
    col = table.column("embedding")
    ok = np.asarray(pc.equal(table.column("status"), "ok").to_numpy(zero_copy_only=False),
                    dtype=bool)  # [N]
    if pa.types.is_fixed_size_list(col.type):
        m = vectors.matrix(col, np.float32)  # [N, H]
    elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type) \
            or pa.types.is_null(col.type):
        # checked per row: vectors.matrix checks only the total count, which [H, [], H]
        # (a failed row between two) passes with the wrong H
        m = _ragged_matrix(col, where)
    else:
        raise ContractError(where, f"not a vector column: {col.type}", column="embedding",
                            fix="write embeddings as data_contracts.vectors arrays")
    if m.shape[1] == 0:  # no vectors at all (e.g. a deciding-only encoder)
        return np.zeros((len(ok), 1), np.float32)
    if ok.all():
        return m  # the view itself (read-only when it is Arrow's buffer)
    m = np.array(m)  # a copy: the failed rows are zeroed, Arrow's buffer is not written
    m[~ok] = 0.0
    return m  # [N, H]


def _ragged_matrix(col: pa.ChunkedArray | pa.Array, where: str) -> np.ndarray:
    """[N, H] of a ``list<float>`` column whose rows hold H values or none (zeros), through
    its flat values (no Python objects)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_null(col.type):
        return np.zeros((len(col), 0), np.float32)
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy()  # [N]
    dim = int(lengths.max(initial=0))
    if ((lengths != 0) & (lengths != dim)).any():
        row = int(np.flatnonzero((lengths != 0) & (lengths != dim))[0])
        raise ContractError(where, f"embeddings of different lengths ({int(lengths[row])} "
                            f"and {dim})", column="embedding", row=row,
                            fix="recompute the embeddings (delete this artifact)")
    out = np.zeros((len(col), dim), np.float32)  # [N, H]
    if dim:
        full = np.flatnonzero(lengths == dim)  # [n_full]
        out[full] = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    return out


def concat_embeddings(tables: list[pa.Table], dtype: VectorDtype) -> pa.Table:
    """One table of cache chunks; chunks whose vector columns differ (a chunk where every
    input failed, a chunk of an older release) are brought to one fixed-size type."""
    if not tables:
        return embedding_table([], None, dtype)
    if len({t.schema.field("embedding").type for t in tables}) == 1:
        return pa.concat_tables(tables)
    mats = [read_vectors(t) for t in tables]
    dim = max(m.shape[1] for m in mats)
    fixed = []
    for t, m in zip(tables, mats, strict=True):
        m = np.pad(m, ((0, 0), (0, dim - m.shape[1])))  # [n, H]
        fixed.append(t.set_column(_EMB, "embedding", vectors.vector_array(m, dtype)))
    return pa.concat_tables(fixed)


def embed_side(encoder: Encoder, items: list[EmbedItem], mode: str, task: str, side: str,
               folder: Path | None = None, chunk_size: int = 256, strict: bool = False,
               log: Log = print, vector_dtype: VectorDtype = "float32") -> Embedded:
    """Embed one side of a task: through the Parquet cache under ``folder`` (the evaluate
    stage; vectors stored as ``vector_dtype``), or in memory when ``folder`` is None (the
    train and gate stages' evaluation)."""
    if folder is not None:
        return encode_cached(encoder, items, folder, mode, task, side, chunk_size, log,
                             vector_dtype)
    vecs, rows = encode_rows(encoder, items, mode, task, side, strict=strict)
    return _embedded(embedding_table(rows, vecs), [it.id for it in items],
                     computed=len(items))


def encode_cached(encoder: Encoder, items: list[EmbedItem], folder: Path, mode: str, task: str,
                  side: str, chunk_size: int = 256, log: Log = print,
                  vector_dtype: VectorDtype = "float32") -> Embedded:
    """Embed ``items`` through a chunked Parquet cache under ``folder``.

    ``folder/embeddings`` (a complete ``EMBEDDINGS`` artifact) means done; otherwise
    ``folder/chunks/chunk-NNNNN.parquet`` files (each written atomically) are reused and
    only the missing chunks are encoded. Vectors are stored as ``vector_dtype``.
    """
    ids = [it.id for it in items]
    final = folder / "embeddings"
    if io.exists(final):
        try:
            table = io.read(final, EMBEDDINGS)
        except ContractError as e:  # e.g. written by an older release (schema_version)
            log(f"[evaluate] {task}/{side}/{mode}: cache unreadable ({e}); recomputing")
            table = None
        if table is not None and table.column("id").to_pylist() == ids:
            return _embedded(table, ids, computed=0, where=str(final))
        if table is not None:
            log(f"[evaluate] {task}/{side}/{mode}: cache holds other ids; recomputing")
    chunks_dir = folder / "chunks"
    tables, computed = [], 0
    for c, s in enumerate(range(0, len(items), chunk_size)):
        part = items[s:s + chunk_size]
        path = chunks_dir / f"chunk-{c:05d}.parquet"
        if path.is_file():
            try:
                t = io.conform(pq.read_table(path), EMBEDDINGS, str(path))
                if t.column("id").to_pylist() == [it.id for it in part]:
                    tables.append(t)
                    continue
            except (ContractError, pa.ArrowException, OSError):
                pass  # a stale or foreign chunk: recompute it
        vecs, rows = encode_rows(encoder, part, mode, task, side)
        computed += len(part)
        t = embedding_table(rows, vecs, vector_dtype, str(path))
        io.atomic_write_parquet(t, path)
        tables.append(t)
        if len(items) > chunk_size:
            log(f"[evaluate] {task}: {side} ({mode}) {min(s + chunk_size, len(items))}"
                f"/{len(items)}")
    table = concat_embeddings(tables, vector_dtype)
    io.write(table, final, EMBEDDINGS)
    shutil.rmtree(chunks_dir, ignore_errors=True)
    return _embedded(table, ids, computed, where=str(final))


def _embedded(table: pa.Table, ids: list[str], computed: int,
              where: str = "<memory>") -> Embedded:
    rows = table.drop_columns(["embedding"]).to_pylist()
    ok = np.array([r["status"] == "ok" for r in rows], dtype=bool)  # [N]
    return Embedded(ids, _normalise(read_vectors(table, where)), ok, rows, computed)


# --------------------------------------------------------------------------- one task

@dataclass
class TaskData:
    """A task's rows (EVAL_ROWS dicts) and corpus (EVAL_CORPUS dicts, global tasks)."""

    spec: TaskSpec
    rows: list[dict]
    corpus: list[dict]


@dataclass
class TaskScore:
    """One task scored in one mode: per-query metric values and the query-side rows."""

    spec: TaskSpec
    mode: str
    per_query: np.ndarray  # [Nq] metric per query
    query_rows: list[dict]  # EMBEDDINGS rows of the queries (reasoned, tokens, latency)
    failures: list[str]
    computed: int  # inputs encoded in this run (0 = all cached)
    family: str | None = None  # the task's family (its first row's), for family means
    worst: list[dict] = field(default_factory=list)  # the lowest queries (worst_queries)
    protocol: str = "strict"  # the scoring protocol (docs/evaluation.md)
    n_candidates: int = 0  # unique embedded candidates (local) or the corpus size (global)
    n_hash_dependent: int = 0  # official graded NDCG: queries whose value needs the hash seed
    official: dict | None = None  # the official <T>_score.json body (official protocol)

    @property
    def score(self) -> float:
        return float(self.per_query.mean())


def frame_policy(spec: TaskSpec, protocol: str, num_frames: int | None
                 ) -> tuple[int | None, bool]:
    """(frames per video, pad) for one task: strict samples ``num_frames`` and repeats frames
    of a shorter video; official passes a shorter video's frames as they are
    (``process_video_frames``) and MomentSeeker every frame (its parser calls
    ``load_frames`` directly, ``momentseeker_dataset.py``). Image and visdoc tasks have no
    frame folders: one policy, so their embeddings are shared by both protocols."""
    if protocol != "official" or spec.modality != "video":
        return num_frames, True
    return (None if spec.name == "MomentSeeker" and spec.suite == DEFAULT_SUITE
            else num_frames), False


def _candidates(td: TaskData, image_root, num_frames, pad: bool = True
                ) -> tuple[list[EmbedItem], list[list[int]], list]:
    """Unique candidate items, and per query the candidate indices and gains (a dense
    array over its own list for local tasks, {corpus index: gain} in target order for
    global ones)."""
    spec = td.spec
    if spec.ranking == "global":
        if not td.corpus:
            raise ContractError(f"task {spec.name}", "a globally ranked task needs its corpus "
                                "(EVAL_CORPUS rows) and none was given.",
                                fix="pass the eval_corpus artifact (evaluate.corpus)")
        index = {c["cand_id"]: k for k, c in enumerate(td.corpus)}
        items = make_items([c["cand_id"] for c in td.corpus],
                            [c["cand_inst"] for c in td.corpus],
                            [c["cand_text"] for c in td.corpus],
                            [c["cand_img_path"] for c in td.corpus], image_root, num_frames,
                            pad)
        all_idx = list(range(len(items)))
        lists, gains = [], []
        for r in td.rows:
            g: dict[int, float] = {}  # sparse: a corpus can hold 10^4+ items per query
            for cid, rel in zip(r["tgt_id"] or [], r["tgt_rel"] or [], strict=True):
                if cid not in index:
                    raise ContractError(f"task {spec.name}", f"row {r['row_id']!r}: target "
                                        f"{cid!r} is not in the task's corpus.",
                                        column="tgt_id", fix="regenerate the rows and corpus "
                                        "together (mmemb.data.mmeb)")
                g[index[cid]] = max(g.get(index[cid], 0.0), float(rel))
            lists.append(all_idx)
            gains.append(g)
        return items, lists, gains
    key_to_idx: dict[tuple, int] = {}
    keys: list[tuple] = []
    lists, gains = [], []
    for r in td.rows:
        idx = []
        for text, img in zip(r["tgt_text"] or [], r["tgt_img_path"] or [], strict=True):
            key = (r["tgt_inst"] or "", text or "", img or "")
            if key not in key_to_idx:
                key_to_idx[key] = len(keys)
                keys.append(key)
            idx.append(key_to_idx[key])
        lists.append(idx)
        gains.append(np.asarray(r["tgt_rel"] or [], dtype=np.float64))
    ids = [hashlib.sha1(json.dumps(k).encode()).hexdigest()[:16] for k in keys]
    items = make_items(ids, [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys],
                        image_root, num_frames, pad)
    return items, lists, gains


def official_label_keys(td: TaskData) -> tuple[list[list | None] | None, int]:
    """Per query the native ids of its labels in qrels order, for the official graded-NDCG
    pairing (:func:`metrics.ndcg_at_k`), and the number of queries whose official value
    depends on ``PYTHONHASHSEED``.

    The official scorer applies ``set()`` to the native ids: integer ids (ViDoRe's BEIR
    corpus-ids) have a deterministic set order, reproduced here; string ids (file names)
    do not, so those queries keep the exact pairing and are counted. The native type is read
    from the ids: a task whose ids are all canonical decimal integers is taken as int-typed.
    """
    if td.spec.ranking != "global" or not td.spec.metric.startswith("ndcg"):
        return None, 0
    ids = [c for r in td.rows for c in (r["tgt_id"] or [])]
    as_int = bool(ids) and all(c.isdigit() and str(int(c)) == c for c in ids)
    keys: list[list | None] = []
    n_hash = 0
    for r in td.rows:
        tid, rel = list(r["tgt_id"] or []), list(r["tgt_rel"] or [])
        if as_int:
            keys.append([int(c) for c in tid])
        else:
            keys.append(None)
            n_hash += metrics.pairing_is_hash_dependent(tid, rel)
    return keys, n_hash


def score_task(encoder: Encoder, td: TaskData, modes: Sequence[str],
               cache: Callable[[str, str], Path] | None = None, *,
               image_root: str | Path | None = None, num_frames: int = NUM_FRAMES,
               reason_on_candidates: bool = False, chunk_size: int = 256,
               strict: bool = False, log: Log = print,
               protocol: metrics.Protocol = "strict",
               vector_dtype: VectorDtype = "float32") -> list[TaskScore]:
    """Embed, rank and score one task in each mode: the one evaluator.

    ``cache(side, mode)`` is the cache folder of one side ('query' | 'candidate') embedded in
    ``mode``, so direct-mode candidates are shared by every query mode; without ``cache``
    everything is embedded in memory (the train stage's evaluation between its phases).
    ``protocol``: the frame policy, tie rule and graded-NDCG pairing (docs/evaluation.md);
    ``vector_dtype``: how the cache stores vectors (float16 halves it; scores in float32).
    """
    spec = td.spec
    n_frames, pad = frame_policy(spec, protocol, num_frames)
    items, lists, gains = _candidates(td, image_root, n_frames, pad)
    keys, n_hash = official_label_keys(td) if protocol == "official" else (None, 0)
    if n_hash:
        log(f"[evaluate] {spec.name}: the official value depends on PYTHONHASHSEED for "
            f"{n_hash} queries (string ids, several grades); scored with the exact pairing")
    queries = make_items([r["row_id"] for r in td.rows], [r["qry_inst"] for r in td.rows],
                          [r["qry_text"] for r in td.rows], [r["qry_img_path"] for r in td.rows],
                          image_root, n_frames, pad)
    if protocol == "official":
        warn_short_retrieval_videos(spec, items, n_frames, log)

    def embed(its: list[EmbedItem], side: str, mode: str) -> Embedded:
        return embed_side(encoder, its, mode, spec.name, side,
                          cache(side, mode) if cache else None, chunk_size, strict, log,
                          vector_dtype)

    out = []
    cand_cache: dict[str, Embedded] = {}
    for mode in modes:
        cmode = mode if reason_on_candidates else "direct"
        if cmode not in cand_cache:
            cand_cache[cmode] = embed(items, "candidate", cmode)
        cand = cand_cache[cmode]
        qry = embed(queries, "query", mode)
        official = [] if protocol == "official" and spec.suite == DEFAULT_SUITE else None
        lowest: list[tuple] = []
        per_query = _rank_and_score(spec, lists, gains, qry, cand, protocol, keys, official,
                                    lowest)
        computed = qry.computed + cand.computed
        cand.computed = 0  # count a shared candidate encoding once
        out.append(TaskScore(spec, mode, per_query, qry.rows, _failures(qry, cand), computed,
                             family=td.rows[0].get("family") if td.rows else None,
                             worst=worst_queries(td, gains, mode, lowest),
                             protocol=protocol, n_candidates=len(items),
                             n_hash_dependent=n_hash,
                             official=metrics.official_score_dict(official)
                             if official is not None else None))
    return out


def warn_short_retrieval_videos(spec: TaskSpec, items: list[EmbedItem], n_frames: int | None,
                                log: Log) -> int:
    """Count (and log once) the videos of a video retrieval task with fewer than
    ``n_frames`` frames: the official loaders of those tasks (``msrvtt_dataset.py`` & co.)
    assert on them and never score the task; we embed the frames there are."""
    if spec.suite != DEFAULT_SUITE or spec.category != "RET" or spec.modality != "video" \
            or n_frames is None:
        return 0
    short = sum(1 for it in items if it.inp is not None and 0 < len(it.inp.images) < n_frames)
    if short:
        log(f"[evaluate] {spec.name}: {short} videos have < {n_frames} frames; the official "
            "loader would fail on them")
    return short


def _official_grades(gains: dict[int, float], keys: list | None) -> dict[int, float]:
    """{corpus index: grade} as the official scorer pairs them: grades in qrels order zipped
    onto ``list(set(native ids))`` (``keys``: the native ids in qrels order); without
    native ids (string ids, hash-dependent) the exact pairing."""
    if keys is None:
        return dict(gains)
    index_of = dict(zip(keys, gains, strict=True))  # native id -> corpus index
    return {index_of[k]: v for k, v in zip(list(set(keys)), gains.values(), strict=True)}


def _rank_and_score(spec: TaskSpec, lists: list[list[int]], gains: list, qry: Embedded,
                    cand: Embedded, protocol: metrics.Protocol = "strict",
                    label_keys: list | None = None, official_out: list | None = None,
                    lowest: list | None = None) -> np.ndarray:
    """[Nq] metric per query: each query ranks its own candidates (local) or the corpus
    (global, in bounded memory: :func:`_global_rows`) by cosine; a candidate that failed can
    never rank first, a query that failed is a miss. ``official_out`` (a list) receives each
    query's official metrics (:func:`official_query_metrics`); ``lowest`` receives
    :func:`lowest_queries` of the ranking."""
    if cand.emb.shape[1] != qry.emb.shape[1] and cand.ok.any() and qry.ok.any():
        raise ValueError(f"task {spec.name}: query dim {qry.emb.shape[1]} != candidate dim "
                         f"{cand.emb.shape[1]}")
    kind, _k = metrics.parse_metric(spec.metric)
    dim = max(cand.emb.shape[1], qry.emb.shape[1])
    c_emb = np.pad(cand.emb, ((0, 0), (0, dim - cand.emb.shape[1])))  # [Nc, H]
    q_emb = np.pad(qry.emb, ((0, 0), (0, dim - qry.emb.shape[1])))  # [Nq, H]
    back = None  # global: per query the corpus index of each position of its score row
    if spec.ranking == "global":
        need = max(_k, max(metrics.OFFICIAL_KS) if official_out is not None else 0, WORST_TOP)
        back, rows_scores, gains = _global_rows(q_emb, c_emb, cand.ok, gains, need)
    else:
        rows_scores = []
        for q, idx in enumerate(lists):
            s = c_emb[idx] @ q_emb[q]  # [n_cand]
            s[~cand.ok[idx]] = -np.inf
            rows_scores.append(s)
    rels = []
    for g in gains:
        if isinstance(g, dict):
            rels.append([i for i, v in g.items() if v > 0] if kind == "hit" else g)
        else:
            rels.append(g > 0 if kind == "hit" else g)
    try:
        per_query = metrics.query_scores(rows_scores, rels, spec.metric, protocol, label_keys)
    except ValueError as e:
        raise ValueError(f"task {spec.name}: {e}") from None
    per_query[~qry.ok] = 0.0  # a query that could not be embedded is a miss
    if official_out is not None:
        official_out += official_query_metrics(rows_scores, lists, gains, qry.ok, label_keys,
                                               spec.ranking == "global")
    if lowest is not None:
        low = lowest_queries(per_query, rows_scores)
        lowest.extend(low if back is None else [(q, v, [int(back[q][j]) for j in top])
                                                for q, v, top in low])
    return per_query


def _global_rows(q_emb: np.ndarray, c_emb: np.ndarray, ok: np.ndarray, gains: list[dict],
                 need: int) -> tuple[list[np.ndarray], list[np.ndarray], list[dict]]:
    """A global task's ranking without its [Nq, Nc] matrix: per query its short score row
    (:func:`mmemb.eval.ranking.candidate_rows`, exact for every metric at cut-off ``need``),
    the corpus index of each position, and its gains keyed by position (in qrels order, which
    the official graded pairing reads)."""
    rows = ranking.candidate_rows(q_emb, c_emb, [list(g) for g in gains], need, valid=ok)
    back = [idx for idx, _ in rows]
    local = []
    for idx, g in zip(back, gains, strict=True):
        pos = {int(c): j for j, c in enumerate(idx)}
        local.append({pos[c]: v for c, v in g.items()})
    return back, [sc for _, sc in rows], local


#: Queries per (task, mode) in the worst-queries preview, and candidates shown for each.
WORST_N, WORST_TOP = 5, 3


def lowest_queries(per_query: np.ndarray, rows_scores: Sequence[np.ndarray],
                   n: int = WORST_N, top: int = WORST_TOP) -> list[tuple[int, float, list[int]]]:
    """(query index, its score, the positions of its ``top`` best-ranked candidates in its
    score row) for the ``n`` lowest-scoring queries, lowest first (ties in query order).
    Read off the ranking already computed, so it costs a partial sort of ``n`` rows."""
    out = []
    for q in np.argsort(per_query, kind="stable")[:n]:  # [n]
        row = np.asarray(rows_scores[q])  # [n_cand] or [Nc]
        k = min(top, row.size)
        # [k] by similarity, descending, ties in index order (the official tie rule)
        best = metrics.stable_top(row, k) if k else np.zeros(0, dtype=int)
        out.append((int(q), float(per_query[q]), [int(j) for j in best]))
    return out


def _cand_label(td: TaskData, q: int, pos: int) -> str | None:
    """The candidate at position ``pos`` of query ``q``'s score row as the data names it:
    its text, else its image path (as written in the rows), else its id."""
    if td.spec.ranking == "global":  # the row is the whole corpus
        c = td.corpus[pos]
        return c["cand_text"] or c["cand_img_path"] or c["cand_id"]
    r = td.rows[q]  # a local row's score row follows its targets (see _candidates)
    return r["tgt_text"][pos] or r["tgt_img_path"][pos]


def worst_queries(td: TaskData, gains: list, mode: str,
                  lowest: list[tuple[int, float, list[int]]]) -> list[dict]:
    """The worst-queries preview rows of one (task, mode): the query, its score, its gold
    (first positive; ``(+n)`` more) and the top-ranked candidates, as text."""
    out = []
    for q, score, top in lowest:
        r, g = td.rows[q], gains[q]
        # positions of the positives in the query's score row, highest gain first (a
        # global task's row is the whole corpus, so a position is a corpus index)
        pos = ([j for j, v in sorted(g.items(), key=lambda kv: -kv[1]) if v > 0]
               if isinstance(g, dict) else [j for j in np.argsort(-g, kind="stable") if g[j] > 0])
        gold = _cand_label(td, q, pos[0]) if pos else None
        if gold is not None and len(pos) > 1:
            gold += f" (+{len(pos) - 1})"
        labels = [_cand_label(td, q, j) for j in top]
        labels += [None] * (WORST_TOP - len(labels))
        out.append({"task": td.spec.name, "mode": mode, "row_id": r["row_id"],
                    "query": r["qry_text"] or r["qry_img_path"] or r["row_id"], "score": score,
                    "gold": gold, **{f"top{i + 1}": lb for i, lb in enumerate(labels)}})
    return out


def official_query_metrics(rows_scores: list[np.ndarray], lists: list[list[int]],
                           gains: list, ok: np.ndarray, label_keys: list | None,
                           is_global: bool) -> list[dict | None]:
    """Per query the official scorer's metrics (:func:`metrics.official_query_metrics`):
    names are candidate item indices (one per official name, see
    ``mmemb.data.mmeb._official_identity``), the top 10 in the stable order; graded tasks
    pair grades as the official scorer does where the ids allow it. None where the query
    could not be embedded."""
    out: list[dict | None] = []
    for q, (s, g) in enumerate(zip(rows_scores, gains, strict=True)):
        if not ok[q]:
            out.append(None)
            continue
        top = metrics.stable_top(s, max(metrics.OFFICIAL_KS))
        names = top.tolist() if is_global else [lists[q][j] for j in top]
        if isinstance(g, dict):  # global: {corpus index: grade} in qrels order
            labels = {i for i, v in g.items() if v > 0}
            keys = label_keys[q] if label_keys is not None else None
            grades = _official_grades(g, keys) if any(v != 1.0 for v in g.values()) else None
        else:  # local: gains per position of the row's list
            labels = {lists[q][j] for j in np.flatnonzero(g > 0)}
            grades = None
        out.append(metrics.official_query_metrics(names, labels, grades))
    return out


def _failures(qry: Embedded, cand: Embedded) -> list[str]:
    out = []
    for side, emb in (("query", qry), ("candidate", cand)):
        bad = [r for r in emb.rows if r["status"] != "ok"]
        if bad:
            out.append(f"{len(bad)} of {len(emb.rows)} {side} inputs failed "
                       f"(first: {bad[0]['id']}: {bad[0]['error']})")
    return out


# --------------------------------------------------------------------------- plain rows

ROWS_SUITE = "eval-rows"  # the spec of a task read from its rows, in no registered suite


def rows_to_tasks(rows: Sequence[Mapping[str, Any]]) -> list[TaskData]:
    """Plain eval-row dicts (the train and gate stages' eval sets) as tasks sorted by name,
    each with a spec read from its first row, since those sets may hold a user's own tasks
    that no registered suite knows. A local row without ``tgt_rel`` has its first candidate
    as the positive (the EVAL_ROWS convention); one without images has none."""
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        r = dict(r)
        texts = r.get("tgt_text")
        if texts:
            r["tgt_img_path"] = r.get("tgt_img_path") or [None] * len(texts)
            r["tgt_rel"] = r.get("tgt_rel") or [1.0] + [0.0] * (len(texts) - 1)
        by_task.setdefault(r["task"], []).append(r)
    out = []
    for name in sorted(by_task):
        first = by_task[name][0]
        modality = first.get("modality") if first.get("modality") in MODALITIES else "image"
        spec = TaskSpec(name, modality, first.get("category") or "none",
                        first.get("metric") or "hit@1",
                        "local" if first.get("tgt_text") else "global", suite=ROWS_SUITE)
        out.append(TaskData(spec, by_task[name], []))
    return out


def evaluate_rows(encoder: Encoder, rows: Sequence[Mapping[str, Any]], *,
                  modes: Sequence[str] = ("direct",), image_root: str | Path | None = None,
                  num_frames: int = NUM_FRAMES, strict: bool = False) -> list[TaskScore]:
    """Score plain eval rows in memory (no cache, no report), one :class:`TaskScore` per
    (task, mode): what the train stage reports before and after training. Only tasks that
    rank their own candidate list are scored (a global task needs its corpus)."""
    tds = [td for td in rows_to_tasks(rows) if td.spec.ranking == "local"]
    return [s for td in tds for s in score_task(encoder, td, modes, None, image_root=image_root,
                                                num_frames=num_frames, strict=strict,
                                                log=lambda _m: None)]


def task_means(scores: Sequence[TaskScore]) -> dict[str, float]:
    """``{metric/task: score, "mean": mean over tasks, "family/<f>": mean over the family's
    tasks}`` of one mode's scores (a task's family is its first row's; 'none' if unset)."""
    out: dict[str, float] = {f"{s.spec.metric}/{s.spec.name}": s.score for s in scores}
    if not scores:
        return out
    out["mean"] = sum(out.values()) / len(scores)
    fam: dict[str, list[float]] = {}
    for s in scores:
        fam.setdefault(s.family or "none", []).append(s.score)
    for f, vs in sorted(fam.items()):
        out[f"family/{f}"] = sum(vs) / len(vs)
    return out


def gate_decisions(encoder: Encoder, rows: Sequence[Mapping[str, Any]], *,
                   image_root: str | Path | None = None, num_frames: int = NUM_FRAMES
                   ) -> dict[str, float]:
    """Share of queries the gate sends to reasoning and mean p(<think>), per family and task
    and overall: what the gate stage reports before and after training. The queries go
    through the evaluator's row handling in adaptive mode (``encoder`` may be one that only
    decides, :class:`mmemb.inference.GateProbe`); candidates are not embedded."""
    groups: dict[str, list[int]] = {}
    reasoned: list[bool] = []
    p: list[float] = []
    for td in rows_to_tasks(rows):
        items = make_items([r["row_id"] for r in td.rows], [r["qry_inst"] for r in td.rows],
                            [r["qry_text"] for r in td.rows],
                            [r["qry_img_path"] for r in td.rows], image_root, num_frames)
        got = embed_side(encoder, items, "adaptive", td.spec.name, "query", strict=True)
        for r, e in zip(td.rows, got.rows, strict=True):
            groups.setdefault(f"family/{r.get('family') or 'none'}", []).append(len(p))
            groups.setdefault(f"task/{td.spec.name}", []).append(len(p))
            reasoned.append(bool(e["reasoned"]))
            p.append(float(e["p_think"]) if e["p_think"] is not None else 0.0)
    out: dict[str, float] = {}
    for k, ids in sorted(groups.items()):
        out[f"reason_ratio/{k}"] = float(np.mean([reasoned[i] for i in ids]))
        out[f"p_think/{k}"] = float(np.mean([p[i] for i in ids], dtype=np.float32))
    out["reason_ratio/all"] = float(np.mean(reasoned)) if reasoned else 0.0
    return out


# --------------------------------------------------------------------------- the run

def _group_tasks(rows: pa.Table, corpus: pa.Table | None, names: Iterable[str] | None,
                 categories, modalities, max_queries: int | None) -> tuple[str, list[TaskData]]:
    """(suite, tasks) of EVAL_ROWS: one suite, every task registered and its rows agreeing
    with the registry (modality, category, metric), the selection naming only present tasks;
    each task with its corpus rows and at most ``max_queries`` queries."""
    suites_ = sorted(set(rows.column("suite").to_pylist()))
    if len(suites_) != 1:
        raise ContractError("eval rows", f"rows mix suites {suites_}; evaluate one suite at a "
                            "time (filter the rows by 'suite').", column="suite")
    suite = suites_[0]
    present = list(dict.fromkeys(rows.column("task").to_pylist()))
    for t in present:
        get_task(t, suite)  # unknown task -> error with a did-you-mean hint
    specs = select_tasks(suite, names=present if names is None else list(names),
                         categories=categories, modalities=modalities)
    specs = [s for s in specs if s.name in set(present)]
    if names is not None:
        absent = [n for n in names if n not in set(present)]
        if absent:
            raise ContractError("eval rows", f"selected task(s) {absent} have no rows in the "
                                "eval data.", fix="drop them from evaluate.tasks or load them")
    if not specs:
        raise ContractError("eval rows", "the task selection matches no task in the eval data.",
                            fix="check evaluate.tasks / categories / modalities")
    by_task: dict[str, list[dict]] = {}
    for r in rows.to_pylist():
        by_task.setdefault(r["task"], []).append(r)
    corp: dict[str, list[dict]] = {}
    if corpus is not None:
        for c in corpus.to_pylist():
            corp.setdefault(c["task"], []).append(c)
    out = []
    for s in specs:
        trows = by_task[s.name]
        for r in trows[:1]:
            got = {"modality": r["modality"], "category": r["category"], "metric": r["metric"]}
            want = {"modality": s.modality, "category": s.category, "metric": s.metric}
            if got != want:
                raise ContractError("eval rows", f"task {s.name!r}: rows say {got} but the "
                                    f"registry says {want}.", fix="regenerate the eval rows")
        if max_queries is not None:
            trows = trows[:max_queries]
        out.append(TaskData(s, trows, corp.get(s.name, [])))
    return suite, out


@dataclass
class EvalRun:
    """What one evaluation produced."""

    results: pa.Table  # EVAL_RESULTS
    aggregates: dict[str, dict]  # mode -> metrics.aggregate(...)
    per_input: list[dict]  # query-side rows for the reasoning report
    files: dict[str, Path]
    suite: str
    computed: int  # inputs encoded in this run (0 = everything came from the cache)
    worst: list[dict] = field(default_factory=list)  # worst_queries of every (task, mode)


def evaluate(encoder: Encoder, rows: pa.Table, corpus: pa.Table | None, out: str | Path, *,
             modes: Sequence[str] = ("direct",), model_id: str,
             mode_settings: Mapping[str, Mapping] | None = None,
             image_root: str | Path | None = None, tasks: Iterable[str] | None = None,
             categories: Iterable[str] | None = None, modalities: Iterable[str] | None = None,
             max_queries: int | None = None, num_frames: int = NUM_FRAMES,
             reason_on_candidates: bool = False, chunk_size: int = 256,
             baseline: Mapping[str, float] | None = None, baseline_name: str = "baseline",
             cache_dir: str | Path | None = None, log: Log = print,
             protocol: metrics.Protocol = "strict",
             data_digests: Mapping[str, str] | None = None,
             missing: Iterable[str] | None = None, vector_dtype: VectorDtype = "float32",
             plots: bool = True) -> EvalRun:
    """Score ``encoder`` on the eval rows in each mode; write results, report and plot.

    ``model_id`` keys the cache (use :func:`checkpoint_digest`); ``mode_settings`` adds what
    changes a mode's embeddings (reasoning budget, gate threshold...) to that mode's key, so
    changing the threshold recomputes adaptive embeddings only. ``protocol`` is the scoring
    protocol (``official`` | ``strict``); ``data_digests`` the digest of each task's source
    files (the MMEB loader's) and ``missing`` the tasks skipped, both for the provenance.
    ``vector_dtype`` is how the cache stores vectors (float16 keys a cache of its own);
    ``plots`` False skips the report's plot (made once, after every task is scored, never
    in the per-task loop).
    """
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes {list(modes)}: choose from {MODES}")
    out = Path(out)
    cache_root = Path(cache_dir) if cache_dir else out / "cache"
    io.validate(rows, EVAL_ROWS, "eval rows")
    suite, tds = _group_tasks(rows, corpus, tasks, categories, modalities, max_queries)
    settings = dict(mode_settings or {})
    scores: list[TaskScore] = []
    root_key = str(Path(image_root).resolve()) if image_root else ""
    log(f"[evaluate] suite {suite}: {len(tds)} task(s), modes {', '.join(modes)}; "
        f"cache {cache_root}")
    vec_key = {} if vector_dtype == "float32" else {"vectors": vector_dtype}  # float32: as before
    mode_key = {m: _digest({"model": model_id, "mode": m, "settings": settings.get(m, {}),
                            **vec_key})[:16] for m in MODES}
    for n, td in enumerate(tds):
        scores += _score_one_task(encoder, td, f"{n + 1}/{len(tds)}", modes, suite,
                                  cache_root, mode_key, root_key, image_root, num_frames,
                                  reason_on_candidates, chunk_size, log, protocol,
                                  vector_dtype)
    results = _results_table(suite, scores)
    per_input = _per_input(scores)
    aggs = {m: metrics.aggregate(_agg_rows(results, m)) for m in modes}
    prov = provenance_rows(tds, scores, model_id, data_digests or {})
    files = write_report(out, results, aggs, per_input, baseline, baseline_name,
                         model_id=model_id, provenance=prov, protocol=protocol, plots=plots)
    files.update(write_provenance(out, prov, protocol, model_id, list(missing or [])))
    files.update(write_official_scores(out, scores, suite))
    ref = io.write(results, out / "results", EVAL_RESULTS)
    files["results"] = Path(ref.uri)
    return EvalRun(results, aggs, per_input, files, suite, sum(s.computed for s in scores),
                   worst=[w for s in scores for w in s.worst])


def _score_one_task(encoder: Encoder, td: TaskData, where: str, modes: Sequence[str],
                    suite: str, cache_root: Path, mode_key: dict[str, str], root_key: str,
                    image_root, num_frames: int, reason_on_candidates: bool,
                    chunk_size: int, log: Log, protocol: metrics.Protocol,
                    vector_dtype: VectorDtype = "float32") -> list[TaskScore]:
    """One task of :func:`evaluate` in every mode, through its cache folder (keyed by the
    model and mode, the suite and task, and a digest of the task's rows, corpus, image root
    and frame policy), with its progress line."""
    t0 = time.perf_counter()
    # The frame policy changes inputs (not the tie rule): official and strict share
    # embeddings wherever their inputs are the same.
    frames = frame_policy(td.spec, protocol, num_frames)
    rows_key = _digest({"rows": td.rows, "corpus": td.corpus, "root": root_key,
                        "frames": num_frames if frames == (num_frames, True) else frames}
                       )[:16]

    def folder(side: str, mode: str) -> Path:
        return cache_root / mode_key[mode] / _safe(suite) / _safe(td.spec.name) / rows_key / side

    got = score_task(encoder, td, modes, folder, image_root=image_root,
                     num_frames=num_frames, reason_on_candidates=reason_on_candidates,
                     chunk_size=chunk_size, log=log, protocol=protocol,
                     vector_dtype=vector_dtype)
    dt = time.perf_counter() - t0
    enc = sum(s.computed for s in got)
    parts = ", ".join(f"{s.mode} {100 * s.score:.1f}" for s in got)
    log(f"[evaluate] {where} {td.spec.name} ({len(td.rows)} queries, "
        f"{td.spec.ranking}): {parts} ({td.spec.metric})"
        + (f"; {enc} inputs embedded in {dt:.1f}s" if enc else "; cached"))
    return got


def _results_table(suite: str, scores: list[TaskScore]) -> pa.Table:
    """One EVAL_RESULTS row per (task, mode): score, query-side reasoning and latency over
    the queries that were embedded, and ``status='error'`` with the failures if any."""
    out = []
    for s in scores:
        lat = np.array([r["latency_ms"] for r in s.query_rows if r["status"] == "ok"
                        and r["latency_ms"] is not None], dtype=np.float64)  # [n_ok]
        ok = [r for r in s.query_rows if r["status"] == "ok"]
        out.append({
            "suite": suite, "task": s.spec.name, "modality": s.spec.modality,
            "category": s.spec.category, "metric": s.spec.metric, "mode": s.mode,
            "score": s.score, "n_queries": int(s.per_query.size),
            "reasoning_ratio": float(np.mean([bool(r["reasoned"]) for r in ok])) if ok
            else None,
            "mean_gen_tokens": float(np.mean([r["n_gen_tokens"] or 0 for r in ok])) if ok
            else None,
            "latency_mean_ms": float(lat.mean()) if lat.size else None,
            "latency_p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
            "latency_p95_ms": float(np.percentile(lat, 95)) if lat.size else None,
            "status": "error" if s.failures else "ok",
            "error": "; ".join(s.failures) or None,
        })
    return io.conform(out, EVAL_RESULTS)


def _agg_rows(results: pa.Table, mode: str) -> list[dict]:
    return [r for r in results.to_pylist() if r["mode"] == mode]


def _per_input(scores: list[TaskScore]) -> list[dict]:
    out = []
    for s in scores:
        for r in s.query_rows:
            if r["status"] != "ok":
                continue
            out.append({"mode": s.mode, "task": s.spec.name, "modality": s.spec.modality,
                        "category": s.spec.category, "reasoned": bool(r["reasoned"]),
                        "tokens": int(r["n_gen_tokens"] or 0),
                        "latency_ms": float(r["latency_ms"] or 0.0)})
    return out


# --------------------------------------------------------------------------- provenance

def provenance_rows(tds: Sequence[TaskData], scores: Sequence[TaskScore], model_id: str,
                    data_digests: Mapping[str, str]) -> list[dict]:
    """Per (task, mode): metric, protocol, numbers of queries and candidates, the digest of
    the task's data (its source files' digest from the MMEB loader, else of its rows and
    corpus) and the model's digest, so a number can be traced to what produced it."""
    own = {td.spec.name: json_digest({"rows": td.rows, "corpus": td.corpus}) for td in tds}
    return [{"task": s.spec.name, "mode": s.mode, "metric": s.spec.metric,
             "protocol": s.protocol, "n_queries": int(s.per_query.size),
             "n_candidates": s.n_candidates,
             "candidates": "corpus" if s.spec.ranking == "global" else "unique in the lists",
             "data_digest": data_digests.get(s.spec.name) or own[s.spec.name],
             "data_digest_of": "source files" if s.spec.name in data_digests else "rows",
             "model_digest": model_id, "n_hash_dependent": s.n_hash_dependent}
            for s in scores]


def provenance_lines(prov: list[dict], protocol: str | None) -> list[str]:
    """The report's provenance section: protocol and, per task, where its number came from."""
    if not prov:
        return []
    head = ["task", "mode", "metric", "protocol", "queries", "candidates", "data digest",
            "model digest"]
    body = [[p["task"], p["mode"], p["metric"], p["protocol"], p["n_queries"],
             p["n_candidates"], f"`{p['data_digest'][:16]}`", f"`{p['model_digest'][:16]}`"]
            for p in prov]
    hashed = [f"{p['task']} ({p['n_hash_dependent']})" for p in prov if p["n_hash_dependent"]]
    out = [f"Protocol: **{protocol or prov[0]['protocol']}** (docs/evaluation.md).", "",
           "## Provenance", "", report.markdown_table(head, body), ""]
    if hashed:
        out += ["Official value depends on PYTHONHASHSEED for queries of: "
                + ", ".join(hashed) + " (scored with the exact pairing).", ""]
    return out


def write_provenance(out: Path, prov: list[dict], protocol: str, model_id: str,
                     missing: list[str]) -> dict[str, Path]:
    """``provenance.json``: the protocol, the model digest, the skipped tasks and the
    per-task rows of :func:`provenance_rows`."""
    path = out / "provenance.json"
    atomic_write_json(path, {"protocol": protocol, "model_digest": model_id,
                             "missing": missing, "tasks": prov})
    return {"provenance": path}


def write_official_scores(out: Path, scores: Sequence[TaskScore], suite: str
                          ) -> dict[str, Path]:
    """Per task ``official/<mode>/<modality>/<T>_score.json`` in the official layout
    (``eval.py``'s ``json.dump(score_dict, indent=4)``: hit, ndcg_linear, ndcg_exponential,
    precision, recall, f1, map, mrr at 1, 5, 10, then ``num_pred`` and ``num_data``), so an
    official-protocol run can be diffed against published files; strict runs write none."""
    if suite != DEFAULT_SUITE:
        return {}
    root = out / "official"
    done = [s for s in scores if s.official is not None]
    for s in done:
        body = s.official
        path = root / s.mode / s.spec.modality / f"{s.spec.name}_score.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(body, indent=4))
    return {"official": root} if done else {}


# --------------------------------------------------------------------------- report

def _fmt(score: float | None, metric: str) -> str:
    return "—" if score is None else f"{100 * score:.1f} ({metric})"


def _demote(md: str) -> str:
    return "\n".join("#" + line if line.startswith("#") else line for line in md.splitlines())


def write_report(out: Path, results: pa.Table, aggs: dict[str, dict], per_input: list[dict],
                 baseline: Mapping[str, float] | None, baseline_name: str = "baseline",
                 model_id: str = "", provenance: list[dict] | None = None,
                 protocol: str | None = None, plots: bool = True) -> dict[str, Path]:
    """``report.md`` (modes side by side, per-mode tables with the baseline, reasoning and
    latency, per-task provenance), ``reasoning.md``, ``accuracy_latency.png`` and
    ``aggregate.json`` under ``out``; a partial MMEB-V2 run says so in its first line."""
    out.mkdir(parents=True, exist_ok=True)
    modes = list(aggs)
    suite = next(iter(aggs.values()))["suite"]
    summary = {s["mode"]: s for s in report.mode_summary(per_input)} if per_input else {}
    lines = [f"# Evaluation: {suite}", ""]
    first = next(iter(aggs.values()))
    if first.get("partial"):
        lines += [report.partial_headline(first), ""]
    if model_id:
        lines += [f"Model key `{model_id[:16]}`. Scores x100 with the metric beside each "
                  "number; overall = mean over tasks.", ""]
    lines += provenance_lines(provenance or [], protocol)
    lines += ["## Modes", "", _modes_table(aggs, summary), ""]
    lines += _task_lines(results.to_pylist(), modes, baseline, baseline_name)
    for m in modes:
        md = report.markdown_report(aggs[m], baseline)
        md = md.replace(f"# Evaluation report: {suite}", f"# Mode: {m}", 1)
        lines += [_demote(md), ""]
    files: dict[str, Path] = {}
    if per_input:
        rr = report.reasoning_report(per_input, aggs[modes[0]])
        (out / "reasoning.md").write_text(rr + "\n")
        files["reasoning"] = out / "reasoning.md"
        lines += [rr, ""]
        points = accuracy_latency_points(aggs, summary)
        if points:  # the points always (tiny); the plot (~1 s of matplotlib) on request
            files["plot_points"] = out / report.PLOT_POINTS
            atomic_write_json(files["plot_points"], points)
        if points and plots:
            files["plot"] = report.plot_accuracy_latency(points, out / "accuracy_latency.png")
            lines += ["![accuracy vs latency](accuracy_latency.png)", ""]
        elif points:
            lines += [f"Plot skipped (`plots: false`); draw it from `{report.PLOT_POINTS}` with "
                      f"`python -m mmemb.eval.report {out}`.", ""]
    (out / "report.md").write_text("\n".join(lines).rstrip() + "\n")
    files["report"] = out / "report.md"
    (out / "aggregate.json").write_text(json.dumps(
        {m: {k: v for k, v in a.items() if k != "categories"} | {
            "categories": {"/".join(k): v for k, v in a["categories"].items()}}
         for m, a in aggs.items()}, indent=2, default=_json_default))
    files["aggregate"] = out / "aggregate.json"
    return files


def accuracy_latency_points(aggs: Mapping[str, Mapping], summary: Mapping[str, Mapping]
                            ) -> list[dict]:
    """The accuracy-vs-latency plot's points: per mode with per-input rows, its overall score
    and mean latency (``summary``: :func:`report.mode_summary` by mode)."""
    return [{"mode": m, "score": aggs[m]["overall"]["score"],
             "metric": aggs[m]["overall"]["metric"],
             "latency_mean_ms": summary[m]["latency_mean_ms"]} for m in aggs if m in summary
            and aggs[m]["overall"]["score"] is not None]  # no point for a partial MMEB run


def _modes_table(aggs: Mapping[str, Mapping], summary: Mapping[str, Mapping]) -> str:
    head = ["mode", "tasks", "overall", "reasoning ratio", "mean tokens", "latency mean (ms)",
            "p50 (ms)", "p95 (ms)"]
    body = []
    for m in aggs:
        g, s = aggs[m]["overall"], summary.get(m)
        body.append([m, g["n_tasks"], _fmt(g["score"], g["metric"]),
                     f"{100 * s['reasoning_ratio']:.1f}%" if s else "—",
                     f"{s['mean_tokens']:.1f}" if s else "—",
                     f"{s['latency_mean_ms']:.1f}" if s else "—",
                     f"{s['latency_p50_ms']:.1f}" if s else "—",
                     f"{s['latency_p95_ms']:.1f}" if s else "—"])
    return report.markdown_table(head, body)


def _task_lines(res: list[dict], modes: list[str], baseline: Mapping[str, float] | None,
                baseline_name: str) -> list[str]:
    """Per task, the modes side by side (⚠ where inputs failed) and the failed inputs."""
    by = {(r["task"], r["mode"]): r for r in res}
    cols = ["task", "metric", *modes] + ([baseline_name] if baseline is not None else [])
    trows = []
    for t in dict.fromkeys(r["task"] for r in res):
        first = next(by[(t, m)] for m in modes if (t, m) in by)
        row = [t, first["metric"]] + [
            (f"{100 * by[(t, m)]['score']:.1f}" + (" ⚠" if by[(t, m)]["status"] != "ok" else ""))
            if (t, m) in by else "—" for m in modes]
        if baseline is not None:
            row.append(f"{100 * baseline[t]:.1f}" if t in baseline else "—")
        trows.append(row)
    lines = ["## Per task, modes side by side", "", report.markdown_table(cols, trows), ""]
    errs = [r for r in res if r["status"] != "ok"]
    if errs:
        lines += ["## Failed inputs (⚠)", ""] + [f"- {r['task']} / {r['mode']}: {r['error']}"
                                                 for r in errs] + [""]
    return lines


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def load_eval_data(eval_path: str | Path, corpus_path: str | Path | None = None
                   ) -> tuple[pa.Table, pa.Table | None]:
    """EVAL_ROWS (and EVAL_CORPUS) artifacts; the corpus defaults to ``eval_corpus`` beside
    the rows when present."""
    rows = io.read(eval_path, EVAL_ROWS)
    if corpus_path is None:
        sib = Path(eval_path).parent / "eval_corpus"
        corpus_path = sib if io.exists(sib) else None
    corpus = io.read(corpus_path, EVAL_CORPUS) if corpus_path else None
    return rows, corpus


def inputs_by_mode(rows: pa.Table, corpus: pa.Table | None, *, modes: Sequence[str],
                   image_root: str | Path | None = None, tasks: Iterable[str] | None = None,
                   categories: Iterable[str] | None = None,
                   modalities: Iterable[str] | None = None, max_queries: int | None = None,
                   num_frames: int = NUM_FRAMES, reason_on_candidates: bool = False,
                   protocol: metrics.Protocol = "strict") -> dict[str, list[EmbedInput]]:
    """Every input :func:`evaluate` with these arguments hands its encoder, per mode (with
    repeats; unreadable media excluded, they never reach an encoder).

    Why: a distributed backend embeds them all in one pass per mode before the evaluation
    (:mod:`mmemb.distributed.eval_embed`) instead of loading a model per encoder call; the
    same task selection, frame policy and candidate lists as :func:`score_task` apply.
    """
    _, tds = _group_tasks(rows, corpus, tasks, categories, modalities, max_queries)
    out: dict[str, list[EmbedInput]] = {}
    for td in tds:
        n_frames, pad = frame_policy(td.spec, protocol, num_frames)
        items, _, _ = _candidates(td, image_root, n_frames, pad)
        queries = make_items([r["row_id"] for r in td.rows], [r["qry_inst"] for r in td.rows],
                             [r["qry_text"] for r in td.rows],
                             [r["qry_img_path"] for r in td.rows], image_root, n_frames, pad)
        for mode in modes:
            cmode = mode if reason_on_candidates else "direct"
            out.setdefault(cmode, []).extend(it.inp for it in items if it.inp is not None)
            out.setdefault(mode, []).extend(it.inp for it in queries if it.inp is not None)
    return out
