"""Stage 0: the base model and the data every later stage reads.

With ``source: tiny`` (the embedded default) it builds the tiny Qwen-VL and the synthetic
world under the run directory, so a laptop with no network runs the whole method. With
``source: existing`` it only checks a real checkpoint and real data and hands on their
references: on a cluster, data preparation is someone else's job and must not be redone
(or re-hashed, beyond one pass over plain Parquet files) on every pipeline run.

Run alone::

    python -m mmemb.stages.prepare --config configs/demo.yaml --section prepare
    python -m mmemb.stages.prepare --out runs/demo/data --model-out runs/demo/base_model
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from data_contracts import io
from data_contracts.io import ArtifactRef, ContractError
from data_contracts.schemas import EVAL_ROWS, PAIRS, Contract
from mmemb.configs.cli import stage_main
from mmemb.configs.prepare import PrepareConfig
from mmemb.sharding import fingerprint
from mmemb.stages.base import StageResult, StepLogger, null_logger


def _file_ref(path: Path, contract: Contract) -> ArtifactRef:
    """A reference to a plain Parquet file (a user's input): schema checked, content hashed.

    Only the schema and the row count (footer metadata) are read, not the data: the stage
    that consumes the file validates its rows anyway.
    """
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise ContractError(path, f"not a readable Parquet file ({type(e).__name__}: {e}).",
                            fix="point to a Parquet file or an artifact folder.") from e
    io.check_columns(meta.schema.to_arrow_schema(), contract, str(path))
    return ArtifactRef(str(path), contract.name, contract.version, meta.num_rows,
                       io.content_digest(path))


def reference(path: str | Path, contract: Contract) -> ArtifactRef:
    """The :class:`ArtifactRef` of an artifact folder (its manifest) or a plain Parquet file."""
    path = Path(path)
    if not path.exists():
        raise ContractError(path, "does not exist.", fix="check the path in the prepare section.")
    if path.is_dir():
        r = io.ref(path)
        if r.contract != contract.name:
            raise ContractError(path, f"holds contract {r.contract!r}, expected "
                                f"{contract.name!r}.", fix="point to the right artifact.")
        return r
    return _file_ref(path, contract)


def _model_summary(path: Path) -> dict[str, float]:
    files = [p for p in path.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    out = {"model_mb": size / 2**20}
    st = [p for p in files if p.suffix == ".safetensors"]
    if st:
        from safetensors import safe_open

        n = 0
        for p in st:
            with safe_open(p, "pt") as f:
                for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    n += int(_numel(f.get_slice(k).get_shape()))
        out["model_params"] = float(n)
    return out


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


PREPARED_FILE = "mmemb_prepared.json"


def _source_stamp(path: Path) -> str:
    """Names, sizes and mtimes of a checkpoint's files: changes when the source does,
    without reading gigabytes of weights on every pipeline run."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return fingerprint([(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                        for p in files])


def prepare_base(source: str | Path, out: str | Path, init: str = "mean"
                 ) -> tuple[Path, dict[str, float]]:
    """The student base from a hub checkpoint, made once: the checkpoint plus the method's
    tokens (:func:`mmemb.model.loading.add_method_tokens`), saved in its own dtype.

    Reused when ``out`` records the same source stamp and init rule; written to a temp
    folder and renamed, so a killed run never leaves a half-written base. The processor is
    loaded once: to see which tokens are missing, then handed to the model loading.
    """
    import shutil

    from mmemb.model.loading import load_processor, missing_tokens

    source, out = _local_source(source), Path(out)
    stamp = {"source": str(source.resolve()), "source_stamp": _source_stamp(source),
             "new_token_init": init}
    if _base_is_current(out, stamp):
        print(f"[prepare] student base {out} is up to date (source unchanged)", flush=True)
        return out, {"base_reused": 1.0}
    t0 = time.perf_counter()
    print(f"[prepare] student base from {source} -> {out}", flush=True)
    processor = load_processor(source)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if not missing_tokens(processor.tokenizer):
        # already a student base (the tiny model, a trained student): link it
        _link_base(source, tmp, stamp)
        _replace_dir(tmp, out)
        print(f"[prepare] {source} already has the method's tokens: {out} links to it",
              flush=True)
        return out, {"base_tokens_added": 0.0}
    info = _write_base(source, tmp, processor, init, stamp)
    _replace_dir(tmp, out)
    print(f"[prepare] added {info['added_tokens'] or 'no tokens'} on rows "
          f"{list(info['token_ids'].values())} of {info['embedding_rows']} (init {init}); "
          f"saved as {info['dtype']}", flush=True)
    return out, {"base_prepare_s": time.perf_counter() - t0,
                 "base_tokens_added": len(info["added_tokens"]),
                 "base_embedding_rows": float(info["embedding_rows"])}


def _local_source(source: str | Path) -> Path:
    """A checkpoint folder; a hub id resolves to its snapshot folder in the local cache."""
    if not Path(source).is_dir():
        from huggingface_hub import snapshot_download

        source = snapshot_download(str(source), local_files_only=True)
    return Path(source)


def _base_is_current(out: Path, stamp: dict) -> bool:
    marker = out / PREPARED_FILE
    if not marker.is_file():
        return False
    done = json.loads(marker.read_text())
    return all(done.get(k) == v for k, v in stamp.items())


def _replace_dir(tmp: Path, out: Path) -> None:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def _link_base(source: Path, tmp: Path, stamp: dict) -> None:
    """A base of links to ``source``'s files, with its own marker."""
    tmp.mkdir(parents=True)
    for f in source.iterdir():
        os.symlink(f.resolve(), tmp / f.name)
    (tmp / PREPARED_FILE).unlink(missing_ok=True)
    (tmp / PREPARED_FILE).write_text(json.dumps({**stamp, "added_tokens": [],
                                                 "linked": True}, indent=2))


def _write_base(source: Path, tmp: Path, processor, init: str, stamp: dict) -> dict:
    """Load the model in the source dtype (a 4B bf16 base needs 8 GB here, not 16), add the
    method's tokens, save it (source dtype, the checkpoint's own generation config) with a
    marker that records what was added; the marker's content."""
    import shutil
    import warnings

    from mmemb.model.embedder import Embedder
    from mmemb.model.loading import load_model_with_tokens, source_dtype

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old processor names: mapped, said once by preflight
        model, emb_cfg, added = load_model_with_tokens(source, processor, init=init,
                                                       dtype=source_dtype(source))
    emb = Embedder(model, processor, emb_cfg)
    emb.save_dtype = source_dtype(source)
    tok = emb.tokenizer
    emb.save_pretrained(tmp)  # the source dtype (Embedder.save_dtype)
    if (source / "generation_config.json").is_file():  # the checkpoint's own, not a rebuilt one
        shutil.copyfile(source / "generation_config.json", tmp / "generation_config.json")
    rows = int(emb.model.get_input_embeddings().weight.shape[0])
    info = {**stamp, "added_tokens": added,
            "token_ids": {t: int(tok.convert_tokens_to_ids(t)) for t in added},
            "embedding_rows": rows, "tokenizer_size": len(tok),
            "dtype": str(emb.save_dtype).removeprefix("torch.")}
    (tmp / PREPARED_FILE).write_text(json.dumps(info, indent=2))
    return info


def run(cfg: PrepareConfig, log: StepLogger = null_logger) -> StageResult:
    """Build (tiny) or check (existing) the base model and the data; return references."""
    t0 = time.perf_counter()
    steps: list[tuple[int, dict[str, float]]] = []
    if cfg.source == "tiny":
        model, outputs, metrics = _prepare_tiny(cfg, log, steps)
    else:
        model, outputs, metrics = _check_existing(cfg)
    for name, r in outputs.items():
        metrics[f"{name}_rows"] = float(r.rows)
    if Path(model).is_dir():
        metrics.update(_model_summary(Path(model)))
    metrics["prepare_s"] = time.perf_counter() - t0
    summary = (f"prepare ({cfg.source}): {metrics.get('pairs_rows', 0):.0f} training pairs, "
               f"{metrics.get('eval_rows', 0):.0f} eval rows, model {model}"
               + (f" ({metrics['model_params'] / 1e6:.2f} M params)"
                  if "model_params" in metrics else "")
               + (f", pretrain loss {metrics['pretrain_loss_first']:.2f} -> "
                  f"{metrics['pretrain_loss_last']:.2f}" if "pretrain_loss_last" in metrics
                  else ""))
    print(f"[prepare] {summary}", flush=True)
    return StageResult("prepare", outputs=outputs, metrics=metrics, step_metrics=steps,
                       models={"base": Path(model)} if Path(model).is_dir() else {},
                       summary=summary)


def _prepare_tiny(cfg: PrepareConfig, log: StepLogger, steps: list
                  ) -> tuple[Path, dict[str, ArtifactRef], dict[str, float]]:
    """The tiny Qwen-VL (simulated pretraining, its curve in ``steps``) and the synthetic
    world under the run directory."""
    from mmemb.data.synth import generate
    from mmemb.model.tiny import build_tiny

    metrics: dict[str, float] = {}
    print(f"[prepare] building the tiny {cfg.arch} model -> {cfg.model_out}", flush=True)
    model = build_tiny(cfg.model_out, arch=cfg.arch, seed=cfg.seed)
    n_pre = cfg.pretrain_steps
    if n_pre is None:
        from mmemb.model.pretrain import DEFAULT_STEPS as n_pre
    if n_pre:
        from mmemb.model.pretrain import pretrain_tiny

        print(f"[prepare] simulated pretraining: {n_pre} steps", flush=True)
        info = pretrain_tiny(model, steps=n_pre, seed=cfg.seed)
        for step, loss in info["curve"]:
            m = {"pretrain_loss": float(loss)}
            steps.append((int(step), m))
            log(int(step), m)
        metrics.update(pretrain_loss_first=float(info["loss_first"]),
                       pretrain_loss_last=float(info["loss_last"]),
                       pretrain_s=float(info["seconds"]))
    print(f"[prepare] synthetic world ({cfg.size}, seed {cfg.seed}) -> {cfg.out}", flush=True)
    paths = generate(cfg.out, size=cfg.size, seed=cfg.seed)
    return model, {"pairs": io.ref(paths["pairs"]), "eval": io.ref(paths["eval"])}, metrics


def _check_existing(cfg: PrepareConfig
                    ) -> tuple[Path, dict[str, ArtifactRef], dict[str, float]]:
    """Check a real checkpoint and real data (cheap checks first), reference them, and make
    the student base (``prepare_base``) last: a bad path fails in a second."""
    metrics: dict[str, float] = {}
    outputs: dict[str, ArtifactRef] = {}
    model = Path(cfg.model)
    if not model.exists() and (cfg.model.startswith((".", "/")) or cfg.model.count("/") != 1):
        raise ContractError(cfg.model, "checkpoint folder does not exist.",
                            fix="set prepare.model to a local checkpoint or a hub id "
                            "(org/name) that is in the local cache.")
    outputs["pairs"] = reference(cfg.pairs, PAIRS)
    if cfg.eval:
        ev = Path(cfg.eval)
        if ev.is_file() or (ev / io.MANIFEST).is_file():
            outputs["eval"] = reference(ev, EVAL_ROWS)
        elif not ev.is_dir():
            raise ContractError(ev, "does not exist.", fix="set prepare.eval to an eval "
                                "rows artifact or an MMEB-V2 download folder, or remove it.")
        # else: an MMEB-V2 download folder; the evaluate stage loads it by its layout.
    if cfg.image_root and not Path(cfg.image_root).is_dir():
        raise ContractError(cfg.image_root, "image_root is not a folder.",
                            fix="set prepare.image_root to the folder image paths are "
                            "relative to.")
    if cfg.prepare_base:
        model, info = prepare_base(cfg.model, cfg.model_out, init=cfg.new_token_init)
        metrics.update(info)
    return model, outputs, metrics


def main(argv: list[str] | None = None) -> None:
    """``python -m mmemb.stages.prepare``: flags generated from its config class."""
    stage_main("prepare", run, argv)


if __name__ == "__main__":
    main()
