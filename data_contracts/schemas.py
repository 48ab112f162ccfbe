"""The Parquet schemas every stage exchanges: the single source of truth.

Each artifact kind has one :class:`Contract`: a pyarrow schema plus the value rules a reader
checks (non-empty ids, unique keys, list columns whose lengths must agree, path columns).
The schema name and version travel in the Parquet file metadata, so a reader can tell an
artifact written by an older release apart from a corrupt one and say which.

Bump ``version`` of a contract whenever a column is added, removed or changes type; readers
refuse other versions with a message that says how to regenerate the artifact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

#: Parquet key-value metadata keys.
META_NAME = b"mmemb.contract"
META_VERSION = b"mmemb.schema_version"

#: Row outcome values shared by every produced artifact. Failed rows are kept, never dropped.
#: ``too_long``: the input did not fit the model's context and was not submitted (stage 1:
#: the teacher prompt, its token count in ``prompt_tokens``).
STATUS_VALUES = ("ok", "truncated", "empty", "error", "skipped", "too_long")

#: Strings a text column marked ``no_markup`` must not hold: the embedding format's tokens
#: and Qwen's chat and vision markers (= ``mmemb.teachers.base.RESERVED_TOKENS``).
RESERVED_MARKUP = ("<think>", "</think>", "<emb>", "<|im_start|>", "<|im_end|>",
                   "<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                   "<|video_pad|>")


@dataclass(frozen=True)
class Contract:
    """A named, versioned schema and the rules its rows must satisfy."""

    name: str
    version: int
    schema: pa.Schema
    key: tuple[str, ...] = ()
    non_empty: tuple[str, ...] = ()
    # Groups of list columns that must have equal length in every row.
    same_length: tuple[tuple[str, ...], ...] = ()
    # Columns holding image paths (str or list<str>); "" means "no image".
    path_columns: tuple[str, ...] = ()
    # Columns restricted to a set of values.
    enums: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Text columns that must not hold a RESERVED_MARKUP string.
    no_markup: tuple[str, ...] = ()
    # Numeric columns that must be non-null and finite in every row whose status is "ok".
    finite_if_ok: tuple[str, ...] = ()
    # Embedding columns, one vector a row: written as fixed_size_list<float32|float16, H>
    # (data_contracts.vectors; any H and either float, kept as written, read as a zero-copy
    # [N, H] view). The schema's own type (list<float32>) is what older artifacts hold and
    # what a column without any vector (every row failed) is written as; both still read.
    vectors: tuple[str, ...] = ()
    doc: str = ""

    @property
    def columns(self) -> list[str]:
        return self.schema.names


def _s(*fields: pa.Field, name: str) -> pa.Schema:
    return pa.schema(list(fields))


_str = pa.string()
_lstr = pa.list_(pa.string())

# Fields shared by the training-pair contract and the selections contract (which is the
# training set of stage 4: the pair plus the chosen rationale).
_PAIR_FIELDS = [
    pa.field("pair_id", _str, nullable=False),
    pa.field("dataset", _str, nullable=False),  # MMEB-train subset / synthetic task name
    pa.field("family", _str),  # e.g. "easy" / "inference" (synthetic); null for real data
    pa.field("qry_inst", _str),  # instruction; may contain <|image_1|>
    pa.field("qry_text", _str),
    pa.field("qry_img_path", _str),  # "" when the query has no image
    pa.field("pos_inst", _str),
    pa.field("pos_text", _str),
    pa.field("pos_img_path", _str),
    pa.field("neg_text", _lstr),  # hard negatives, may be empty
    pa.field("neg_img_path", _lstr),
    pa.field("meta", _str),  # JSON; scene metadata for the synthetic world
]

PAIRS = Contract(
    name="pairs",
    version=1,
    schema=_s(*_PAIR_FIELDS, name="pairs"),
    key=("pair_id",),
    non_empty=("pair_id", "dataset"),
    same_length=(("neg_text", "neg_img_path"),),
    path_columns=("qry_img_path", "pos_img_path", "neg_img_path"),
    doc="Training pairs (MMEB-train compatible): query, positive, optional hard negatives.",
)

EVAL_ROWS = Contract(
    name="eval_rows",
    version=1,
    schema=_s(
        pa.field("row_id", _str, nullable=False),
        pa.field("task", _str, nullable=False),
        pa.field("suite", _str, nullable=False),  # "mmeb-v2" or "synthetic"
        pa.field("category", _str),
        pa.field("modality", _str),
        pa.field("metric", _str),  # "hit@1" | "ndcg@5"
        pa.field("qry_inst", _str),
        pa.field("qry_text", _str),
        pa.field("qry_img_path", _str),
        pa.field("tgt_inst", _str),
        # Local tasks: the candidate list to rank, the first is the positive.
        # Global tasks: the relevant corpus items (ids in tgt_id) with graded relevance.
        pa.field("tgt_id", _lstr),
        pa.field("tgt_text", _lstr),
        pa.field("tgt_img_path", _lstr),
        pa.field("tgt_rel", pa.list_(pa.float32())),
        pa.field("family", _str),
        name="eval_rows",
    ),
    key=("task", "row_id"),
    non_empty=("row_id", "task", "suite"),
    same_length=(("tgt_id", "tgt_text", "tgt_img_path", "tgt_rel"),),
    path_columns=("qry_img_path", "tgt_img_path"),
    enums={"metric": ("hit@1", "ndcg@5"), "modality": ("image", "video", "visdoc")},
    doc="MMEB-V2 eval rows: qry_inst, qry_text, qry_img_path, tgt_inst, tgt_text[list], "
    "tgt_img_path[list] plus task/category/modality/metric and graded relevance.",
)

EVAL_CORPUS = Contract(
    name="eval_corpus",
    version=1,
    schema=_s(
        pa.field("task", _str, nullable=False),
        pa.field("cand_id", _str, nullable=False),
        pa.field("cand_inst", _str),
        pa.field("cand_text", _str),
        pa.field("cand_img_path", _str),
        name="eval_corpus",
    ),
    key=("task", "cand_id"),
    non_empty=("task", "cand_id"),
    path_columns=("cand_img_path",),
    doc="The whole candidate corpus of a globally ranked task (visdoc, some video tasks).",
)

RATIONALES = Contract(
    name="rationales",
    version=2,  # 2: raw_text, prompt_tokens, status too_long
    schema=_s(
        pa.field("pair_id", _str, nullable=False),
        pa.field("side", _str, nullable=False),  # "query" | "target"
        pa.field("teacher_id", _str, nullable=False),
        pa.field("cand_idx", pa.int32(), nullable=False),
        pa.field("text", _str),  # the rationale
        # The teacher's verbatim output when `text` was cut out of it (its own <think> span
        # parsed, teacher option think_output); null when `text` is the output itself.
        pa.field("raw_text", _str),
        pa.field("n_tokens", pa.int32()),  # tokens of `text` (verbatim: tokens generated)
        pa.field("prompt_tokens", pa.int32()),  # the prompt as measured; null: the oracle
        pa.field("finish_reason", _str),  # "stop" | "length" | ...; null: never generated
        pa.field("status", _str, nullable=False),
        pa.field("error", _str),
        pa.field("backend", _str),  # "vllm" | "hf" | "oracle"
        pa.field("model", _str),
        pa.field("sampling", _str),  # JSON of the sampling parameters
        pa.field("prompt_version", _str),
        pa.field("seed", pa.int64()),
        pa.field("oracle_label", _str),  # synthetic oracle only: correct/wrong/irrelevant
        name="rationales",
    ),
    key=("pair_id", "side", "teacher_id", "cand_idx"),
    non_empty=("pair_id", "side", "teacher_id", "status"),
    enums={"side": ("query", "target"), "status": STATUS_VALUES},
    doc="Stage 1: K candidate rationales per instance; failed ones kept with status/error.",
)

SCORES = Contract(
    name="scores",
    version=1,
    schema=_s(
        pa.field("pair_id", _str, nullable=False),
        pa.field("teacher_id", _str, nullable=False),
        pa.field("cand_idx", pa.int32(), nullable=False),
        pa.field("pool_size", pa.int32()),
        pa.field("cos_with", pa.float32()),
        pa.field("cos_without", pa.float32()),
        pa.field("s_with", pa.float32()),
        pa.field("s_without", pa.float32()),
        pa.field("delta", pa.float32()),
        pa.field("rank_with", pa.int32()),  # 1 = the positive ranks first
        pa.field("rank_without", pa.int32()),
        pa.field("status", _str, nullable=False),
        pa.field("error", _str),
        name="scores",
    ),
    key=("pair_id", "teacher_id", "cand_idx"),
    non_empty=("pair_id", "teacher_id", "status"),
    enums={"status": STATUS_VALUES},
    finite_if_ok=("delta", "s_with", "s_without", "cos_with", "cos_without", "rank_with",
                  "rank_without"),
    doc="Stage 2: counterfactual utility delta = s(q + r) - s(q) per candidate.",
)

SELECTIONS = Contract(
    name="selections",
    version=1,
    schema=_s(
        *_PAIR_FIELDS,
        pa.field("rationale", _str),  # null = no reasoning helps: train in direct mode
        pa.field("utility", pa.float32()),  # the chosen candidate's delta (max delta if none)
        pa.field("teacher_id", _str),
        pa.field("cand_idx", pa.int32()),
        pa.field("n_candidates", pa.int32()),
        pa.field("n_kept", pa.int32()),  # candidates left after the filters
        name="selections",
    ),
    key=("pair_id",),
    non_empty=("pair_id", "dataset"),
    same_length=(("neg_text", "neg_img_path"),),
    path_columns=("qry_img_path", "pos_img_path", "neg_img_path"),
    no_markup=("rationale",),  # stage 3 filters malformed candidates; a hand-made file too
    doc="Stage 3: the stage-4 training set, one row per pair with its chosen rationale.",
)

EMBEDDINGS = Contract(
    name="embeddings",
    version=2,  # 2: p_think
    schema=_s(
        pa.field("id", _str, nullable=False),
        pa.field("task", _str),
        pa.field("side", _str),  # "query" | "candidate"
        pa.field("mode", _str),  # "direct" | "reason" | "adaptive"
        # fixed_size_list<float32|float16, H> (Contract.vectors); zeros where status != ok
        pa.field("embedding", pa.list_(pa.float32())),
        pa.field("reasoned", pa.bool_()),
        pa.field("rationale", _str),
        pa.field("n_prompt_tokens", pa.int32()),
        pa.field("n_gen_tokens", pa.int32()),
        pa.field("latency_ms", pa.float32()),
        pa.field("status", _str, nullable=False),
        pa.field("error", _str),
        pa.field("p_think", pa.float32()),  # the gate's p(<think>) (adaptive mode), else null
        name="embeddings",
    ),
    key=("task", "side", "id"),
    non_empty=("id", "status"),
    enums={"status": STATUS_VALUES},
    vectors=("embedding",),
    doc="Embeddings with how they were produced (reasoned or not, tokens, latency).",
)

EVAL_RESULTS = Contract(
    name="eval_results",
    version=1,
    schema=_s(
        pa.field("suite", _str, nullable=False),
        pa.field("task", _str, nullable=False),
        pa.field("modality", _str),
        pa.field("category", _str),
        pa.field("metric", _str),
        pa.field("mode", _str, nullable=False),
        pa.field("score", pa.float64()),  # in [0, 1]
        pa.field("n_queries", pa.int32()),
        pa.field("reasoning_ratio", pa.float64()),
        pa.field("mean_gen_tokens", pa.float64()),
        pa.field("latency_mean_ms", pa.float64()),
        pa.field("latency_p50_ms", pa.float64()),
        pa.field("latency_p95_ms", pa.float64()),
        pa.field("status", _str, nullable=False),
        pa.field("error", _str),
        name="eval_results",
    ),
    key=("suite", "task", "mode"),
    non_empty=("suite", "task", "mode", "status"),
    enums={"status": STATUS_VALUES},
    doc="Per task and mode: the score with its metric, reasoning ratio, latency.",
)

CONTRACTS: dict[str, Contract] = {
    c.name: c
    for c in (PAIRS, EVAL_ROWS, EVAL_CORPUS, RATIONALES, SCORES, SELECTIONS, EMBEDDINGS,
              EVAL_RESULTS)
}


def get_contract(name: str) -> Contract:
    try:
        return CONTRACTS[name]
    except KeyError:
        raise KeyError(f"unknown contract {name!r}; known: {sorted(CONTRACTS)}") from None


# --------------------------------------------------------------------------- stage 2 vectors

VECTORS = Contract(
    name="vectors",
    version=1,
    schema=_s(
        # sha256 (32 hex digits) of the input: (mode, instruction, text, images, rationale)
        pa.field("key", _str, nullable=False),
        pa.field("mode", _str),  # "direct" | "reason"
        # One [H] embedding per row, written from a fixed-size-list array
        # (data_contracts.vectors.vector_array) and read back as one [N, H] view
        # (vectors.matrix); declared as a list so the contract holds for every model width.
        pa.field("vector", pa.list_(pa.float32()), nullable=False),
        pa.field("status", _str, nullable=False),  # ok | error (its vector is NaN)
        pa.field("error", _str),
        name="vectors",
    ),
    key=("key",),
    non_empty=("key", "status"),
    vectors=("vector",),
    enums={"status": STATUS_VALUES, "mode": ("direct", "reason")},
    doc="Stage 2's store of every distinct input's embedding (embedded once, resumable).",
)
CONTRACTS[VECTORS.name] = VECTORS
