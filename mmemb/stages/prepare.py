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

import argparse
import json
import os
import time
from pathlib import Path

from data_contracts import io
from data_contracts.io import ArtifactRef, ContractError
from data_contracts.schemas import EVAL_ROWS, PAIRS, Contract
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
    folder and renamed, so a killed run never leaves a half-written base.
    """
    import shutil
    import warnings

    from mmemb.model.embedder import Embedder
    from mmemb.model.loading import load_processor, missing_tokens, source_dtype

    if not Path(source).is_dir():  # a hub id: its snapshot folder in the local cache
        from huggingface_hub import snapshot_download

        source = snapshot_download(str(source), local_files_only=True)
    source, out = Path(source), Path(out)
    stamp = {"source": str(source.resolve()), "source_stamp": _source_stamp(source),
             "new_token_init": init}
    marker = out / PREPARED_FILE
    if marker.is_file():
        done = json.loads(marker.read_text())
        if all(done.get(k) == v for k, v in stamp.items()):
            print(f"[prepare] student base {out} is up to date (source unchanged)", flush=True)
            return out, {"base_reused": 1.0}
    t0 = time.perf_counter()
    print(f"[prepare] student base from {source} -> {out}", flush=True)
    added = missing_tokens(load_processor(source).tokenizer)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if not added:  # already a student base (the tiny model, a trained student): link it
        tmp.mkdir(parents=True)
        for f in source.iterdir():
            os.symlink(f.resolve(), tmp / f.name)
        (tmp / PREPARED_FILE).unlink(missing_ok=True)
        (tmp / PREPARED_FILE).write_text(json.dumps({**stamp, "added_tokens": [],
                                                     "linked": True}, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        print(f"[prepare] {source} already has the method's tokens: {out} links to it",
              flush=True)
        return out, {"base_tokens_added": 0.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old processor names: mapped, said once by preflight
        # loaded in the source dtype: a 4B bf16 base needs 8 GB here, not 16
        emb = Embedder.from_pretrained(source, dtype=source_dtype(source),
                                       add_special_tokens=True, new_token_init=init)
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
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"[prepare] added {added or 'no tokens'} on rows "
          f"{list(info['token_ids'].values())} of {rows} (init {init}); saved as "
          f"{info['dtype']}", flush=True)
    return out, {"base_prepare_s": time.perf_counter() - t0, "base_tokens_added": len(added),
                 "base_embedding_rows": float(rows)}


def run(cfg: PrepareConfig, log: StepLogger = null_logger) -> StageResult:
    """Build (tiny) or check (existing) the base model and the data; return references."""
    t0 = time.perf_counter()
    steps: list[tuple[int, dict[str, float]]] = []
    outputs: dict[str, ArtifactRef] = {}
    metrics: dict[str, float] = {}
    if cfg.source == "tiny":
        from mmemb.data.synth import generate
        from mmemb.model.tiny import build_tiny

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
        print(f"[prepare] synthetic world ({cfg.size}, seed {cfg.seed}) -> {cfg.out}",
              flush=True)
        paths = generate(cfg.out, size=cfg.size, seed=cfg.seed)
        outputs["pairs"] = io.ref(paths["pairs"])
        outputs["eval"] = io.ref(paths["eval"])
    else:
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
        if cfg.prepare_base:  # after the cheap checks: a bad path fails in a second
            model, info = prepare_base(cfg.model, cfg.model_out, init=cfg.new_token_init)
            metrics.update(info)
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Stage 0: build or check the base model and data.")
    ap.add_argument("--config", help="YAML config file")
    ap.add_argument("--section", default="prepare", help="section of the YAML to read")
    for k in ("source", "out", "model-out", "model", "pairs", "eval", "image-root", "size"):
        ap.add_argument(f"--{k}")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--pretrain-steps", type=int)
    a = ap.parse_args(argv)
    over = {k: v for k, v in vars(a).items() if k not in ("config", "section") and v is not None}
    cfg = PrepareConfig.from_args(a.config, a.section, over)
    res = run(cfg)
    print(json.dumps(res.to_dict(), indent=2))


if __name__ == "__main__":
    main()
