"""``mmemb embed``: embed a Parquet/JSONL of inputs with a trained model into an artifact.

The rows go through the evaluator's own row handling (:func:`mmemb.eval.harness.encode_rows`),
so an input that cannot be read or embeds to a non-finite vector is an ``EMBEDDINGS`` row
with ``status='error'`` and its message, exactly as in an evaluation, and the gate's
decision (``reasoned``, ``p_think``) is recorded per row. Adaptive and reason modes run at
the gate's budget and threshold saved beside the model (:mod:`mmemb.model.gate_settings`)
unless given.

    >>> ref = embed_file("runs/demo/gate/policy", "q.jsonl", "emb")   # doctest: +SKIP
    >>> embed_report(ref.uri)["reasoned_share"]                       # doctest: +SKIP
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from data_contracts import io
from data_contracts.io import ArtifactRef, ContractError
from data_contracts.schemas import EMBEDDINGS
from data_contracts.vectors import VectorDtype
from mmemb.data.mmeb import NUM_FRAMES
from mmemb.eval.harness import (
    EmbedItem,
    concat_embeddings,
    embedding_table,
    encode_rows,
    make_items,
)

TEXT = ("text", "qry_text", "qry")
INSTRUCTION = ("instruction", "qry_inst")
IMAGE = ("image", "qry_img_path", "qry_image_path", "img_path")
ID = ("id", "pair_id", "row_id")
CHUNK = 256  # inputs per encoder call (a progress line after each when there are several)


def read_inputs(path: Path) -> list[dict]:
    """Rows of a JSONL file (one object a line) or a Parquet file/folder."""
    if path.suffix in (".jsonl", ".json") and path.is_file():
        rows = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ContractError(path, f"line {i} is not JSON ({e.msg}).",
                                            row=i - 1, fix="one JSON object per line.") from e
        return rows
    import pyarrow.parquet as pq

    if not path.exists():
        raise ContractError(path, "does not exist.", fix="give a .parquet, .jsonl or an "
                            "artifact folder.")
    return pq.read_table(path).to_pylist()


def _pick(row: dict, names: tuple[str, ...]):
    for n in names:
        if row.get(n) not in (None, ""):
            return row[n]
    return None


def input_items(rows: list[dict], source: str, image_root: str | None,
                num_frames: int = NUM_FRAMES) -> tuple[list[EmbedItem], list[str]]:
    """(items, task per row): each row's text / instruction / image under any of the
    accepted column names, its id (else its row number), unique within its task (the eval
    artifact's key is task + id)."""
    ids, tasks, texts, insts, imgs = [], [], [], [], []
    for i, r in enumerate(rows):
        text, inst, img = _pick(r, TEXT), _pick(r, INSTRUCTION), _pick(r, IMAGE)
        if text is None and img is None and inst is None:
            raise ContractError(source, "row has none of text/instruction/image.", row=i,
                                fix="give a 'text', 'instruction' or 'image' column.")
        texts.append(text)
        insts.append(inst)
        imgs.append(img)
        ids.append(str(_pick(r, ID) or i))
        tasks.append(str(r.get("task") or ""))
    seen: dict[tuple[str, str], int] = {}
    for i, key in enumerate(zip(tasks, ids, strict=True)):
        if key in seen:
            raise ContractError(source, f"id {key[1]!r} of task {key[0]!r} appears twice "
                                f"(rows {seen[key]} and {i}).", row=i, column="id",
                                fix="make (task, id) unique or drop the id column (row "
                                "numbers are used).")
        seen[key] = i
    return make_items(ids, insts, texts, imgs, image_root, num_frames), tasks


def build_encoder(model: str, mode: str, batch_size: int, budget: int | None = None,
                  threshold: float | None = None):
    """The plain embedder for direct mode, else the adaptive encoder at the gate's settings
    (each replaced by an explicit ``budget`` / ``threshold``)."""
    from mmemb.eval.harness import EmbedderEncoder
    from mmemb.model.embedder import Embedder

    emb = Embedder.from_pretrained(model)
    if mode == "direct":
        return EmbedderEncoder(emb, batch_size=batch_size)
    from mmemb.inference import AdaptiveEncoder
    from mmemb.model.gate_settings import GateSettings

    gate = GateSettings.load(model).override(budget, threshold)
    return AdaptiveEncoder(emb, budget=gate.budget, threshold=gate.threshold,
                           batch_size=batch_size)


def embed_file(model: str, input_path: str, output: str, mode: str = "adaptive",
               batch_size: int = 16, image_root: str | None = None,
               budget: int | None = None, threshold: float | None = None,
               vector_dtype: VectorDtype = "float32") -> ArtifactRef:
    """Embed a Parquet/JSONL of inputs; writes an ``embeddings`` artifact and returns its ref.

    The vectors are a ``fixed_size_list<vector_dtype, H>`` column (float16 halves the
    artifact); read them with ``data_contracts.vectors.matrix`` as an [N, H] array."""
    rows = read_inputs(Path(input_path))
    if not rows:
        raise ContractError(input_path, "has no rows.", fix="give at least one input.")
    items, tasks = input_items(rows, input_path, image_root)
    encoder = build_encoder(model, mode, batch_size, budget, threshold)
    tables = []
    for s in range(0, len(items), CHUNK):
        vecs, got = encode_rows(encoder, items[s:s + CHUNK], mode, "", "query")
        for r, task in zip(got, tasks[s:s + CHUNK], strict=True):
            r["task"] = task
        tables.append(embedding_table(got, vecs, vector_dtype, output))
        if len(items) > CHUNK:
            print(f"[embed] {min(s + CHUNK, len(items))}/{len(items)}", file=sys.stderr)
    return io.write(concat_embeddings(tables, vector_dtype), output, EMBEDDINGS)


def embed_report(output: str) -> dict:
    """How an ``embeddings`` artifact was produced: inputs, how many reasoned, p(think)."""
    rows = io.read(output, EMBEDDINGS).drop_columns(["embedding"]).to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    p = [r["p_think"] for r in ok if r["p_think"] is not None]
    n_r = sum(bool(r["reasoned"]) for r in ok)
    return {"inputs": len(rows), "ok": len(ok), "errors": len(rows) - len(ok),
            "reasoned": n_r, "reasoned_share": n_r / len(ok) if ok else None,
            "p_think_mean": sum(p) / len(p) if p else None,
            "p_think_min": min(p) if p else None, "p_think_max": max(p) if p else None,
            "gen_tokens_mean": (sum(r["n_gen_tokens"] or 0 for r in ok) / len(ok)
                                if ok else None),
            "per_row": "columns reasoned, p_think, n_gen_tokens, rationale of the artifact"}
