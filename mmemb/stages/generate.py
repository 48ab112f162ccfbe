"""Stage 1: teachers write K candidate rationales per training instance (the prior p(r|x)).

Reads the training pairs, asks every configured teacher for K rationales per query (and per
target when ``sides`` includes it), and writes one row per candidate (contract
``rationales``): text, token count, finish reason, status (ok / truncated / empty / error /
too_long), teacher id, backend, model, sampling parameters (JSON), prompt version, the
request's seed and its prompt length. Nothing is dropped: failed generations are rows with
status ``error`` and the message, truncated and empty ones keep their status, a prompt
longer than the teacher's ``max_model_len`` is not submitted and its K rows get status
``too_long`` with the count (lower ``run.resolution.max_pixels`` or raise the limit), and a
rationale containing a reserved token (``<think>``, ``<emb>``, chat markers) is kept with
``error`` starting "malformed:". A teacher that writes its own ``<think>...</think>`` is
parsed (``think_output``); its verbatim output is kept in ``raw_text``.

Sharded and resumable (:mod:`mmemb.sharding`): shards are (teacher, block of pairs); each
teacher's engine starts once, only if one of its shards is unfinished, and is shut down
before the next teacher's starts (two engines never share a GPU).

Run alone on the embedded default (after ``python -m mmemb.stages.prepare``)::

    python -m mmemb.stages.generate --config configs/demo.yaml --section generate
    python -m mmemb.stages.generate --pairs runs/demo/data/pairs \\
        --image-root runs/demo/data --model runs/demo/base_model --k 2 --oracle-k 4 \\
        --out runs/demo/generate

Data-parallel on N GPUs or nodes: ``distributed: {backend: ray, actors: N}`` runs the
unfinished shards as a Ray Data pipeline over N actors, each with its own engine (tensor
parallel inside it) on ``gpus_per_actor`` GPUs (default: the largest vLLM teacher's
``tensor_parallel_size``); the rows equal the in-process run's (every request is seeded)::

    python -m mmemb.stages.generate --config configs/demo.yaml --section generate \\
        --distributed.backend ray --distributed.actors 2
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from data_contracts import io
from data_contracts.schemas import PAIRS, RATIONALES
from mmemb.configs.cli import stage_main
from mmemb.configs.generate import GenerateConfig, TeacherConfig
from mmemb.model.prompts import EmbedInput
from mmemb.sharding import fingerprint, input_digest, run_sharded, split, torch_threads
from mmemb.stages.base import StageResult, StepLogger, null_logger
from mmemb.teachers import (
    PROMPT_TEMPLATES,
    GenRequest,
    close_engine,
    engine_key,
    make_teacher,
    request_seed,
    start_engine,
    teacher_info,
)


def _meta(raw: str | None) -> dict | None:
    if not raw:
        return None
    try:
        m = json.loads(raw)
    except ValueError:
        return None
    return m if isinstance(m, dict) else None


def build_requests(pairs: list[dict], side: str, seed: int, image_root: str | None,
                   teacher_id: str = "") -> list[GenRequest]:
    """One request per pair and side, images resolved, seeded by (seed, teacher, pair, side)."""
    reqs = []
    for p in pairs:
        if side == "query":
            inp = EmbedInput.from_row(p["qry_inst"], p["qry_text"], p["qry_img_path"], image_root)
        else:
            inp = EmbedInput.from_row(p["pos_inst"], p["pos_text"], p["pos_img_path"], image_root)
        reqs.append(GenRequest(p["pair_id"], side, inp, _meta(p.get("meta")),
                               request_seed(seed, teacher_id, p["pair_id"], side)))
    return reqs


def teacher_rows(tcfg: TeacherConfig, teacher, requests: list[GenRequest], seed: int
                 ) -> list[dict]:
    """Rows of one teacher for requests of one side (K per request, in candidate order)."""
    info = teacher_info(tcfg, seed)
    by_side: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        by_side.setdefault(r.side, []).append(i)
    cands: list[list] = [None] * len(requests)  # type: ignore[list-item]
    for side, idx in by_side.items():
        version = tcfg.template_version(side)
        got = teacher.generate([requests[i] for i in idx], PROMPT_TEMPLATES[version])
        for i, c in zip(idx, got, strict=True):
            cands[i] = c
    rows = []
    for r, cs in zip(requests, cands, strict=True):
        version = tcfg.template_version(r.side)
        for j, c in enumerate(cs):
            rows.append({"pair_id": r.pair_id, "side": r.side, "teacher_id": info.teacher_id,
                         "cand_idx": j, "text": c.text, "raw_text": c.raw_text,
                         "n_tokens": c.n_tokens, "prompt_tokens": c.prompt_tokens,
                         "finish_reason": c.finish_reason, "status": c.status,
                         "error": c.error, "backend": info.backend, "model": info.model,
                         "sampling": info.sampling_json(), "prompt_version": version,
                         "seed": r.seed, "oracle_label": c.oracle_label})
    return rows


def run(cfg: GenerateConfig, log: StepLogger = null_logger) -> StageResult:
    """Generate (or resume generating) the rationales artifact at ``<out>/rationales``."""
    with torch_threads(cfg.torch_threads):
        return _run(cfg)


def _run(cfg: GenerateConfig) -> StageResult:
    """The recipe: pairs, shards (teacher x block), each unfinished shard generated by its
    teacher (engines started lazily, one at a time), the report."""
    t0 = time.perf_counter()
    pairs = io.read(cfg.pairs, PAIRS, image_root=cfg.image_root,
                    allow_outside_root=cfg.allow_images_outside_root).to_pylist()
    if cfg.limit:
        pairs = pairs[: cfg.limit]
    out = Path(cfg.out) / "rationales"
    fp = fingerprint("generate-v2", input_digest(cfg.pairs), cfg.digest_view("resume"))
    worker = GenerateWorker(cfg)
    try:
        res = run_sharded([(n, [it]) for n, it in make_shards(cfg, pairs)], out, RATIONALES,
                          worker, fp, resume=cfg.resume, distributed=cfg.distributed)
    finally:
        worker.close()
    outputs, metrics, summary = report(cfg, res, out, len(pairs))
    metrics["seconds"] = time.perf_counter() - t0
    print(f"[generate] {summary}", flush=True)
    return StageResult("generate", outputs=outputs, metrics=metrics, summary=summary)


def make_shards(cfg: GenerateConfig, pairs: list[dict]) -> list[tuple[str, tuple]]:
    """(name, (teacher index, block of pairs)) for every teacher and block."""
    blocks = split(pairs, cfg.shard_size)
    return [(f"{t_i:02d}-{t.id}-{b_i:05d}", (t_i, block))
            for t_i, t in enumerate(cfg.teachers) for b_i, block in enumerate(blocks)]


def teacher_seed(cfg: GenerateConfig, tcfg: TeacherConfig) -> int:
    return tcfg.seed if tcfg.seed is not None else cfg.seed


@dataclass
class Teachers:
    """The teachers made so far and the (at most one) engine alive; teachers with equal
    engine keys share it. Starting another engine first closes the one alive (two engines
    never share a GPU) and the teachers on it."""

    cfg: GenerateConfig
    engines: dict[tuple, object] = field(default_factory=dict)
    made: dict[int, object] = field(default_factory=dict)

    def key(self, t_i: int):
        tcfg = self.cfg.teachers[t_i]
        return engine_key(tcfg, teacher_seed(self.cfg, tcfg))

    def get(self, t_i: int):
        if t_i in self.made:
            return self.made[t_i]
        tcfg, key = self.cfg.teachers[t_i], self.key(t_i)
        seed = teacher_seed(self.cfg, tcfg)
        if key is not None and key not in self.engines:
            for k in list(self.engines):  # one engine at a time: free the GPU/RAM first
                close_engine(self.engines.pop(k))
                for j in [j for j in self.made if self.key(j) == k]:
                    self.made.pop(j).close()
            self.engines[key] = start_engine(tcfg, seed, max_images=1,  # one image per side
                                             log=print)
        self.made[t_i] = make_teacher(tcfg, seed, engine=self.engines.get(key), log=print)
        return self.made[t_i]

    def close(self) -> None:
        for t in self.made.values():
            t.close()
        for e in self.engines.values():
            close_engine(e)
        self.made.clear()
        self.engines.clear()


@dataclass
class GenerateWorker:
    """``process`` of the stage's sharded run: one shard's rows from its teacher.

    Picklable, so a Ray actor can hold one: pickling keeps only the config, and each copy
    (this process, or every actor of the pool) makes its own :class:`Teachers`, so its
    engines on its first shard, and closes them with :meth:`close`.
    """

    cfg: GenerateConfig
    teachers: Teachers | None = field(default=None, repr=False)

    def __call__(self, name: str, items: list[tuple]) -> list[dict]:
        if self.teachers is None:
            self.teachers = Teachers(self.cfg)
        t_i, block = items[0]
        with torch_threads(self.cfg.torch_threads):  # also inside a Ray actor
            return generate_shard(self.cfg, self.teachers, t_i, block)

    @property
    def gpus_per_actor(self) -> int:
        """GPUs one actor needs on a GPU cluster: the largest engine's tensor parallel size
        (1 for a transformers teacher, 0 when only the oracle runs)."""
        need = [t.tensor_parallel_size if t.backend == "vllm" else 1
                for t in self.cfg.teachers if t.backend != "oracle"]
        return max(need, default=0)

    def close(self) -> None:
        if self.teachers is not None:
            self.teachers.close()
            self.teachers = None

    def __getstate__(self) -> dict:
        return {"cfg": self.cfg, "teachers": None}  # engines never travel


def generate_shard(cfg: GenerateConfig, teachers: Teachers, t_i: int, block: list[dict]
                   ) -> list[dict]:
    """The rows of one shard: teacher ``t_i`` on every configured side of ``block``."""
    tcfg = cfg.teachers[t_i]
    seed = teacher_seed(cfg, tcfg)
    reqs = [r for side in cfg.sides
            for r in build_requests(block, side, seed, cfg.image_root, tcfg.id)]
    return teacher_rows(tcfg, teachers.get(t_i), reqs, seed)


def report(cfg: GenerateConfig, res, out: Path, n_pairs: int
           ) -> tuple[dict, dict[str, float], str]:
    """Outputs, metrics and summary; the status shares only once every shard is done (a
    low-level replica run that leaves shards to others reports just its shard counts)."""
    metrics: dict[str, float] = {"shards": float(res.n_shards),
                                 "shards_processed": float(len(res.processed)),
                                 "shards_skipped": float(len(res.skipped)),
                                 "pairs": float(n_pairs)}
    if res.ref is None:
        return {}, metrics, f"generate: {len(res.missing)} shard(s) left to other replicas"
    table = io.read(out, RATIONALES)
    status = Counter(table.column("status").to_pylist())
    errors = table.column("error").to_pylist()
    n = max(1, table.num_rows)
    metrics["rows"] = float(table.num_rows)
    for s in ("ok", "truncated", "empty", "error", "too_long"):
        metrics[f"share_{s}"] = status.get(s, 0) / n
    metrics["share_malformed"] = sum(bool(e and e.startswith("malformed:")) for e in errors) / n
    ntok = [x for x in table.column("n_tokens").to_pylist() if x is not None]
    metrics["mean_tokens"] = sum(ntok) / max(1, len(ntok))
    summary = (f"generate: {table.num_rows} candidate rows from {len(cfg.teachers)} "
               f"teacher(s) for {n_pairs} pairs; status {dict(status)}; "
               f"{len(res.skipped)} shard(s) resumed, {len(res.processed)} computed")
    if status.get("too_long"):
        summary += (f"; {status['too_long']} row(s) too_long (prompt over the teacher's "
                    "max_model_len, not generated): lower run.resolution.max_pixels or "
                    "raise max_model_len")
    return {"rationales": res.ref}, metrics, summary


def _teacher_flags(ap):
    """``--model``/``--oracle-k`` and friends: one teacher without writing ``--teachers``
    JSON (the TeacherConfig/SamplingConfig defaults apply to what is left out)."""
    g = ap.add_argument_group("teacher shorthands (given, they replace the teachers)")
    g.add_argument("--model", help="a teacher with this checkpoint (backend --backend)")
    g.add_argument("--backend", choices=["vllm", "hf"], help="backend of the --model teacher "
                   "(default vllm; hf = the transformers fallback)")
    g.add_argument("--k", type=int, help="samples per instance of the --model teacher")
    g.add_argument("--max-tokens", type=int, help="max_tokens of the --model teacher")
    g.add_argument("--oracle-k", type=int, help="add the synthetic oracle with this K "
                   "(synthetic data)")

    def expand(extra: dict, fields: dict) -> dict:
        teachers = []
        if extra.get("model"):
            backend = extra.get("backend") or "vllm"
            t = {"id": backend, "backend": backend, "model": extra["model"]}
            if extra.get("k") is not None:
                t["k"] = extra["k"]
            if extra.get("max_tokens") is not None:
                t["sampling"] = {"max_tokens": extra["max_tokens"]}
            teachers.append(t)
        if extra.get("oracle_k"):
            teachers.append({"id": "oracle", "backend": "oracle", "k": extra["oracle_k"]})
        return {**fields, "teachers": teachers} if teachers else fields

    return expand


def main(argv: list[str] | None = None) -> None:
    """``python -m mmemb.stages.generate``: flags generated from GenerateConfig."""
    stage_main("generate", run, argv, _teacher_flags)


if __name__ == "__main__":
    main()
