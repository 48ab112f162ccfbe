"""Evaluation stage: score a checkpoint in direct / reason / adaptive mode, side by side.

The data is either eval-rows artifacts (the synthetic benchmark, or MMEB-V2 converted with
``python -m mmemb.data.mmeb eval``) or an MMEB-V2 download folder, loaded here by its layout.
Both go through :func:`mmemb.eval.harness.evaluate`, so the demo's numbers come from the
code that would score MMEB-V2. Outputs under ``out``: ``results/`` (EVAL_RESULTS Parquet),
``report.md``, ``reasoning.md``, ``accuracy_latency.png``, ``aggregate.json``, the preview
tables ``per_task.table.json`` and ``worst_queries.table.json`` (the lowest-scoring queries of
each task and mode with what was retrieved) and the resumable embedding cache ``cache/``.

Run alone::

    python -m mmemb.stages.evaluate --config configs/demo.yaml --section evaluate
    python -m mmemb.stages.evaluate --model runs/demo/gate/policy --eval runs/demo/data/eval \\
        --image-root runs/demo/data --modes direct,reason,adaptive --out runs/demo/evaluate
    python -m mmemb.stages.evaluate --model Qwen/Qwen3-VL-4B-Instruct --eval data/mmeb-v2 \\
        --modalities image --max-queries 100 --baseline scores/VLM2Vec-V2.json --out runs/mmeb
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np

from data_contracts import io
from data_contracts.files import atomic_write_json
from data_contracts.io import ContractError
from data_contracts.schemas import EVAL_CORPUS, EVAL_ROWS
from mmemb.configs.cli import stage_main
from mmemb.configs.evaluate import EvaluateConfig
from mmemb.eval import harness, report
from mmemb.eval.baseline import load_baseline
from mmemb.model.gate_settings import GateSettings
from mmemb.model.images import DEFAULT_MAX_DECODE_PIXELS
from mmemb.stages.base import StageResult, StepLogger, null_logger
from mmemb.tables import write_table

PER_TASK_COLUMNS = ["task", "modality", "metric", "mode", "score", "n_queries",
                    "reasoning_ratio", "mean_gen_tokens", "latency_mean_ms", "latency_p95_ms",
                    "status"]
WORST_COLUMNS = ["task", "mode", "row_id", "query", "score", "gold", "top1", "top2", "top3"]


def _is_artifact(path: Path) -> bool:
    return io.exists(path)


def load_data(cfg: EvaluateConfig):
    """(rows, corpus, image_root, missing) from artifacts or an MMEB-V2 download folder."""
    ev = Path(cfg.eval)
    if _is_artifact(ev):
        rows, corpus = harness.load_eval_data(ev, cfg.corpus)
        if cfg.image_root and not cfg.allow_images_outside_root:  # paths stay in the root
            io.validate(rows, EVAL_ROWS, str(ev), image_root=cfg.image_root)
            if corpus is not None:
                io.validate(corpus, EVAL_CORPUS, str(cfg.corpus or ev.parent / "eval_corpus"),
                            image_root=cfg.image_root)
        return rows, corpus, cfg.image_root, {}
    if not ev.is_dir():
        raise ContractError(ev, "does not exist.", fix="set evaluate.eval to an eval_rows "
                            "artifact or an MMEB-V2 download folder (docs/evaluation.md)")
    from mmemb.data.mmeb import load_mmeb_eval

    print(f"[evaluate] loading MMEB-V2 tasks from {ev}", flush=True)
    loaded = load_mmeb_eval(ev, cfg.tasks, categories=cfg.categories,
                            modalities=cfg.modalities, num_frames=cfg.num_frames,
                            max_queries=cfg.max_queries, image_cache=cfg.image_cache,
                            skip_missing=cfg.skip_missing, protocol=cfg.protocol)
    data = Path(cfg.out) / "data"
    io.write(loaded.rows, data / "eval_rows", EVAL_ROWS)
    corpus = loaded.corpus if loaded.corpus.num_rows else None
    if corpus is not None:
        io.write(corpus, data / "eval_corpus", EVAL_CORPUS)
    if cfg.corpus:
        corpus = io.read(cfg.corpus, EVAL_CORPUS)
    if loaded.missing:
        first = next(iter(loaded.missing.values()))
        print(f"[evaluate] skip_missing: {len(loaded.missing)} task(s) absent and skipped "
              f"({', '.join(loaded.missing)}); e.g. {first}", flush=True)
    atomic_write_json(data / TASK_DIGESTS, loaded.digests)
    return loaded.rows, corpus, cfg.image_root or str(loaded.image_root), loaded.missing


#: Beside the eval_rows artifact: the MMEB loader's per-task source-file digests (provenance).
TASK_DIGESTS = "task_digests.json"


def task_digests(cfg: EvaluateConfig, from_mmeb: bool) -> dict[str, str]:
    """The per-task data digests written beside the eval rows when they were loaded from an
    MMEB root (this run's ``<out>/data``, or an artifact's folder); {} when there are none."""
    path = (Path(cfg.out) / "data" if from_mmeb else Path(cfg.eval).parent) / TASK_DIGESTS
    return json.loads(path.read_text()) if path.is_file() else {}


def gate_settings(cfg: EvaluateConfig) -> GateSettings:
    """The budget and threshold adaptive and reason modes run at: the gate's (saved beside
    the model), each replaced by an explicit ``evaluate.budget`` / ``evaluate.threshold``."""
    return GateSettings.load(cfg.model).override(cfg.budget, cfg.threshold)


def build_encoder(cfg: EvaluateConfig, gate: GateSettings | None = None):
    """The plain embedder for direct-only runs, the adaptive encoder (at the gate's settings,
    or ``gate``) otherwise; returns (encoder, dtype name)."""
    import torch

    from mmemb.model.embedder import Embedder

    gate = gate or gate_settings(cfg)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    direct_only = set(cfg.modes) <= {"direct"}
    if cfg.embed_engine == "vllm" and direct_only:  # no gate: the pooling engine alone
        return harness.EmbedderEncoder(_pooling_engine(cfg, dtype),
                                       batch_size=cfg.batch_size), dtype
    emb = Embedder.from_pretrained(cfg.model, dtype=dtype, device=device,
                                   max_pixels=cfg.max_pixels, min_pixels=cfg.min_pixels,
                                   max_decode_pixels=cfg.max_decode_pixels)
    if direct_only:
        return harness.EmbedderEncoder(emb, batch_size=cfg.batch_size), dtype
    if cfg.embed_engine == "vllm":  # the gate and generation stay in transformers
        from mmemb.model.vllm_embedder import SplitEmbedder

        emb = SplitEmbedder(emb, _pooling_engine(cfg, dtype, shared_gpu=True))
    from mmemb.inference import AdaptiveEncoder

    vllm = None
    if cfg.generation == "vllm" and set(cfg.modes) - {"direct"}:
        from mmemb.vllm_policy import VLLMPolicy

        vllm = VLLMPolicy(cfg.model, budget=gate.budget, seed=cfg.seed)
    return AdaptiveEncoder(emb, budget=gate.budget, threshold=gate.threshold,
                           temperature=cfg.temperature, top_p=cfg.top_p,
                           batch_size=cfg.batch_size, vllm=vllm), dtype


def _pooling_engine(cfg: EvaluateConfig, dtype: str, shared_gpu: bool = False):
    """``embed_engine: vllm``: a vLLM pooling engine admitting a video's frames; on a GPU
    it shares with the transformers model (and a rollout engine), it takes less memory."""
    import torch

    from mmemb.model.vllm_embedder import VLLMEmbedder

    extra = {"gpu_memory_utilization": 0.3} if shared_gpu and torch.cuda.is_available() else {}
    videos = cfg.modalities is None or "video" in cfg.modalities  # frames: images of one input
    return VLLMEmbedder.from_pretrained(cfg.model, dtype=dtype, max_pixels=cfg.max_pixels,
                                        min_pixels=cfg.min_pixels,
                                        max_decode_pixels=cfg.max_decode_pixels,
                                        max_images=cfg.num_frames if videos else 1,
                                        seed=cfg.seed,
                                        **extra)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    import torch

    torch.manual_seed(seed)


def _model_key(cfg: EvaluateConfig, dtype: str, cache: Path) -> str:
    """The embedding cache's model key: checkpoint content plus what changes its vectors."""
    return harness._digest({"checkpoint": harness.checkpoint_digest(
        cfg.model, cache / "_checkpoint_digests.json"), "dtype": dtype,
        "max_pixels": cfg.max_pixels, "min_pixels": cfg.min_pixels,
        **({"max_decode_pixels": cfg.max_decode_pixels}
           if cfg.max_decode_pixels != DEFAULT_MAX_DECODE_PIXELS else {}),
        **({"embed_engine": cfg.embed_engine} if cfg.embed_engine != "embedder" else {})})


def _mode_settings(cfg: EvaluateConfig, gate: GateSettings) -> dict[str, dict]:
    """What changes each mode's embeddings beyond the model: part of that mode's cache key."""
    gen = {"budget": gate.budget, "temperature": cfg.temperature, "top_p": cfg.top_p,
           "generation": cfg.generation}
    return {"reason": gen, "adaptive": {**gen, "threshold": gate.threshold}}


def run(cfg: EvaluateConfig, log: StepLogger = null_logger) -> StageResult:
    """Load the data, embed through the cache, score every task in every mode, report."""
    t0 = time.perf_counter()
    _seed(cfg.seed)
    out = Path(cfg.out)
    rows, corpus, image_root, missing = load_data(cfg)
    from_mmeb = not _is_artifact(Path(cfg.eval))
    baseline = load_baseline(cfg.baseline, cfg.baseline_mode) if cfg.baseline else None
    gate = gate_settings(cfg)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
    if cfg.distributed.backend == "ray":  # every input embedded up front on the actor pool
        from mmemb.distributed.eval_embed import ray_encoder

        encoder, dtype = ray_encoder(cfg, gate, rows, corpus, image_root,
                                     None if from_mmeb else cfg.tasks,
                                     lambda d: _model_key(cfg, d, cache),
                                     _mode_settings(cfg, gate))
    else:
        encoder, dtype = build_encoder(cfg, gate)
    reasons = set(cfg.modes) - {"direct"}
    print(f"[evaluate] model {cfg.model} ({type(encoder).__name__}, {dtype}); modes "
          f"{', '.join(cfg.modes)}; candidates in "
          f"{'the query mode' if cfg.reason_on_candidates else 'direct mode'}"
          + (f"; {gate.describe()}" if reasons else ""), flush=True)
    try:
        res = harness.evaluate(
            encoder, rows, corpus, out, modes=cfg.modes, model_id=_model_key(cfg, dtype, cache),
            mode_settings=_mode_settings(cfg, gate), image_root=image_root,
            tasks=None if from_mmeb else cfg.tasks,  # the loader already selected them
            categories=cfg.categories, modalities=cfg.modalities,
            max_queries=cfg.max_queries, num_frames=cfg.num_frames,
            reason_on_candidates=cfg.reason_on_candidates, chunk_size=cfg.chunk_size,
            baseline=baseline, baseline_name=cfg.baseline_name, cache_dir=cache,
            log=lambda s: print(s, flush=True), protocol=cfg.protocol,
            data_digests=task_digests(cfg, from_mmeb), missing=list(missing),
            vector_dtype=cfg.vector_dtype, plots=cfg.plots)
    finally:
        if getattr(encoder, "vllm", None) is not None:
            encoder.vllm.close()
    if getattr(encoder, "misses", 0):
        raise RuntimeError(f"{encoder.misses} input(s) reached the evaluation without being "
                           "embedded by the Ray pre-pass (harness.inputs_by_mode disagrees "
                           "with the harness): a bug; rerun with distributed.backend: "
                           "inprocess meanwhile")
    for step, task in enumerate(dict.fromkeys(res.results.column("task").to_pylist())):
        log(step, {f"{r['mode']}.score": float(r["score"]) for r in res.results.to_pylist()
                   if r["task"] == task})
    metrics, lines = _metrics(res)
    if reasons:
        metrics.update({"gate.budget": float(gate.budget), "gate.threshold": gate.threshold})
    metrics["evaluate_s"] = time.perf_counter() - t0
    n_err = int(metrics["tasks_with_failed_inputs"])
    summary = (f"evaluate ({res.suite}): " + "; ".join(lines)
               + (f"; {gate.describe()}" if reasons else "")
               + (f"; {n_err} task/mode results with failed inputs" if n_err else "")
               + (f"; missing {len(missing)} tasks" if missing else "")
               + f"; report {res.files['report']}")
    print(f"[evaluate] {summary}", flush=True)
    files = {k: v for k, v in res.files.items() if k != "results"}
    files.update(write_preview_tables(out, res))
    return StageResult("evaluate", outputs={"results": io.ref(res.files["results"])},
                       metrics=metrics, files=files, summary=summary)


def write_preview_tables(out: Path, res: harness.EvalRun) -> dict[str, Path]:
    """``per_task.table.json`` (one row per task and mode) and ``worst_queries.table.json``
    (per task and mode the lowest-scoring queries, with their gold and what ranked first),
    the evaluation's previews in the tracking UI (:mod:`mmemb.tables`)."""
    return {"per_task": write_table(out / "per_task.table.json", res.results.to_pylist(),
                                    PER_TASK_COLUMNS),
            "worst_queries": write_table(out / "worst_queries.table.json", res.worst,
                                         WORST_COLUMNS)}


def _metrics(res: harness.EvalRun) -> tuple[dict[str, float], list[str]]:
    """The stage's metrics (per mode: overall, per modality, per task, reasoning ratio,
    tokens, latency) and one summary line per mode."""
    metrics: dict[str, float] = {}
    summary_modes = ({s["mode"]: s for s in report.mode_summary(res.per_input)}
                     if res.per_input else {})
    lines = []
    for mode, agg in res.aggregates.items():
        g = agg["overall"]
        if g["score"] is not None:  # None: a partial MMEB-V2 run has no overall
            metrics[f"{mode}.overall"] = g["score"]
        for mod, mg in agg["modalities"].items():
            if mg["score"] is not None:  # None: a partial modality of MMEB-V2
                metrics[f"{mode}.{mod}"] = mg["score"]
        for task, t in agg["tasks"].items():
            metrics[f"{mode}.task.{task}"] = t["score"]
        s = summary_modes.get(mode)
        if s:
            metrics[f"{mode}.reasoning_ratio"] = s["reasoning_ratio"]
            metrics[f"{mode}.mean_gen_tokens"] = s["mean_tokens"]
            for k in ("latency_mean_ms", "latency_p50_ms", "latency_p95_ms"):
                metrics[f"{mode}.{k}"] = s[k]
        head = (f"partial {agg['partial']}" if g["score"] is None else f"{100 * g['score']:.1f}")
        lines.append(f"{mode} {head} ({g['metric']}, {g['n_tasks']} tasks"
                     + (f", reasoning {100 * s['reasoning_ratio']:.0f}%, "
                        f"{s['latency_mean_ms']:.1f} ms/query" if s else "") + ")")
    metrics["tasks_with_failed_inputs"] = float(sum(r["status"] != "ok"
                                                    for r in res.results.to_pylist()))
    metrics["inputs_embedded"] = float(res.computed)
    return metrics, lines


def main(argv: list[str] | None = None) -> None:
    """``python -m mmemb.stages.evaluate``: flags generated from its config class."""
    stage_main("evaluate", run, argv)


if __name__ == "__main__":
    main()
