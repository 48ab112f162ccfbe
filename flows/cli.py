"""``mmemb``: the command line for people who do not think in flows.

    mmemb run configs/demo.yaml --run-dir runs/demo          # the whole pipeline
    mmemb run configs/demo.yaml --from train                 # recompute train and after
    mmemb stage generate configs/demo.yaml                   # one stage
    mmemb eval configs/demo.yaml --model runs/demo/gate/policy
    mmemb embed --model runs/demo/gate/policy --input q.jsonl --output emb --mode adaptive
    mmemb ui --run-dir runs/demo                             # MLflow UI on 127.0.0.1
    mmemb status --run-dir runs/demo                         # what is cached
    mmemb config configs/demo.yaml --stage train             # the resolved stage config
    mmemb sync --run-dir runs/demo                           # send spooled MLflow records

Every subcommand's ``--help`` explains its options. Prefect needs no server: without
``PREFECT_API_URL`` a temporary local API starts (its database under
``<run_dir>/.prefect``; waited for up to 600 s, ``--prefect-timeout``: flows/startup.py);
with it, runs appear on that server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# Engines (vLLM) spawn processes that re-import this __main__ module: importing mmemb here
# applies its CPU torchvision shim (mmemb/_compat.py) in them before vLLM imports
# transformers' image utilities.
import mmemb  # noqa: E402, F401
from flows.startup import (  # noqa: E402 - light: no Prefect at import
    DEFAULT_PREFECT_TIMEOUT_S,
    DEFAULT_UI_TIMEOUT_S,
    PREFECT_ENV,
    StartupTimeout,
)

STAGE_NAMES = ("prepare", "generate", "score", "select", "train", "gate", "evaluate")

_ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu",
    "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


#: Commands that never touch a model: they must not import torch, vLLM, DeepSpeed or
#: transformers (seconds each on a busy machine; tests/flows/test_first_contact.py).
LIGHT_COMMANDS = frozenset({"config", "status", "ui", "sync"})


def _setup_env(run_dir: str | None, light: bool = False) -> None:
    """Environment before Prefect is imported: offline hubs, loopback, a local Prefect home.

    ``light``: the command runs no model, so torch is not imported to ask for a GPU (the
    DeepSpeed accelerator default is then left unset; nothing in it imports DeepSpeed)."""
    cuda = False
    if not light:
        try:
            import torch

            cuda = torch.cuda.is_available()
        except Exception:  # noqa: BLE001
            cuda = False
    for k, v in _ENV_DEFAULTS.items():
        if k == "DS_ACCELERATOR" and light:
            continue
        if k == "DS_ACCELERATOR" and cuda:
            continue
        os.environ.setdefault(k, v)
    if not os.environ.get("PREFECT_API_URL") and "PREFECT_HOME" not in os.environ and run_dir:
        home = (Path(run_dir) / ".prefect").resolve()
        home.mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(home)
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")


def _run_dir_of(config: str | None, run_dir: str | None) -> str | None:
    if run_dir:
        return run_dir
    if config and Path(config).is_file():
        import yaml

        try:
            data = yaml.safe_load(Path(config).read_text()) or {}
            return (data.get("run") or {}).get("run_dir") or "runs/demo"
        except Exception:  # noqa: BLE001 - the real load reports YAML errors
            return None
    return None


# --------------------------------------------------------------------------- commands

def cmd_run(a: argparse.Namespace) -> int:
    """The pipeline, after the preflight (:mod:`mmemb.preflight`): seconds of checks before
    Prefect's start-up and any stage, refusing with every problem at once (exit 2)."""
    from flows.pipeline import pipeline, plan
    from flows.startup import prefect_startup, prefect_timeout
    from mmemb.configs.pipeline import PipelineConfig
    from mmemb.preflight import PreflightError, preflight

    overrides = list(a.set)
    if a.no_tracking:
        overrides.append("run.tracking.enabled=false")
    if a.stages:
        overrides.append(f"run.stages=[{a.stages}]")
    cfg = PipelineConfig.load(a.config, run_dir=a.run_dir, overrides=overrides)
    t0 = time.perf_counter()
    if not a.skip_preflight:
        # plan() raises ConfigError on a bad --from (exit 2 via main). A crash of the checks
        # themselves is a bug there: reported, and it does not stop a run that may be fine.
        stages = [s for s, _ in plan(cfg, a.from_stage, a.only, a.force or None)]
        try:
            problems = preflight(cfg, stages)
        except Exception as e:  # noqa: BLE001 - see above
            problems = None
            print(f"[preflight] the checks failed ({type(e).__name__}: {e}); running "
                  "without them", file=sys.stderr, flush=True)
        if problems:
            print(f"mmemb run: {PreflightError(problems)}", file=sys.stderr, flush=True)
            return 2
        if problems is not None:
            print(f"[preflight] {' -> '.join(stages)}: ok ({time.perf_counter() - t0:.1f}s)",
                  flush=True)
    with prefect_startup(*prefect_timeout(a.prefect_timeout,
                                          cfg.run.prefect_startup_timeout_s)):
        out = pipeline(cfg, from_stage=a.from_stage, only=a.only, force=a.force or None,
                       verify=a.verify)
    print("\n" + out["summary"])
    print(f"  wall time incl. Prefect start-up: {time.perf_counter() - t0:.0f}s", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


def cmd_stage(a: argparse.Namespace) -> int:
    from flows.stage import run_stage_from_file

    out = run_stage_from_file(a.name, a.config, a.run_dir, a.force, a.set, a.parent_run_id,
                              prefect_timeout=a.prefect_timeout, verify=a.verify)
    print(json.dumps({k: out.get(k) for k in ("stage", "status", "summary", "metrics",
                                              "outputs", "mlflow_run_id")}, indent=2,
                     default=str))
    return 0 if out["status"] in ("ran", "cached") else 1


def cmd_eval(a: argparse.Namespace) -> int:
    from flows.stage import run_stage_from_file

    sets = list(a.set)
    for field, val in (("model", a.model), ("eval", a.data), ("out", a.out)):
        if val:
            sets.append(f"evaluate.{field}={val}")
    if a.modes:
        sets.append(f"evaluate.modes=[{a.modes}]")
    sets = [s if Path(a.config).is_file() and _is_pipeline_yaml(a.config)
            else s.removeprefix("evaluate.") for s in sets]
    out = run_stage_from_file("evaluate", a.config, a.run_dir, a.force,
                              sets, prefect_timeout=a.prefect_timeout)
    print(out.get("summary") or out.get("reason", ""))
    return 0 if out["status"] in ("ran", "cached") else 1


def _is_pipeline_yaml(path: str) -> bool:
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    return isinstance(data, dict) and ("run" in data or "evaluate" in data)


def _read_inputs(path: Path) -> list[dict]:
    if path.suffix in (".jsonl", ".json") and path.is_file():
        rows = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        from data_contracts.io import ContractError

                        raise ContractError(path, f"line {i} is not JSON ({e.msg}).",
                                            row=i - 1, fix="one JSON object per line.") from e
        return rows
    import pyarrow.parquet as pq

    if not path.exists():
        from data_contracts.io import ContractError

        raise ContractError(path, "does not exist.", fix="give a .parquet, .jsonl or an "
                            "artifact folder.")
    return pq.read_table(path).to_pylist()


def _pick(row: dict, names: tuple[str, ...]):
    for n in names:
        if row.get(n) not in (None, ""):
            return row[n]
    return None


def embed_file(model: str, input_path: str, output: str, mode: str = "adaptive",
               batch_size: int = 16, image_root: str | None = None,
               budget: int | None = None, threshold: float | None = None):
    """Embed a Parquet/JSONL of inputs; writes an ``embeddings`` artifact and returns its ref."""
    import torch

    from data_contracts import io
    from data_contracts.io import ContractError
    from data_contracts.schemas import EMBEDDINGS
    from mmemb.model.embedder import Embedder
    from mmemb.model.prompts import EmbedInput

    rows = _read_inputs(Path(input_path))
    if not rows:
        raise ContractError(input_path, "has no rows.", fix="give at least one input.")
    inputs, ids, tasks = [], [], []
    for i, r in enumerate(rows):
        text = _pick(r, ("text", "qry_text", "qry"))
        inst = _pick(r, ("instruction", "qry_inst"))
        img = _pick(r, ("image", "qry_img_path", "qry_image_path", "img_path"))
        if text is None and img is None and inst is None:
            raise ContractError(input_path, "row has none of text/instruction/image.", row=i,
                                fix="give a 'text', 'instruction' or 'image' column.")
        inputs.append(EmbedInput.from_row(inst, text, img, image_root))
        ids.append(str(_pick(r, ("id", "pair_id", "row_id")) or i))
        tasks.append(str(r.get("task") or ""))
    # an id is unique within its task (the eval artifact's key is task + row_id)
    seen: dict[tuple[str, str], int] = {}
    for i, key in enumerate(zip(tasks, ids, strict=True)):
        if key in seen:
            raise ContractError(input_path, f"id {key[1]!r} of task {key[0]!r} appears twice "
                                f"(rows {seen[key]} and {i}).", row=i, column="id",
                                fix="make (task, id) unique or drop the id column (row "
                                "numbers are used).")
        seen[key] = i
    emb = Embedder.from_pretrained(model)
    t0 = time.perf_counter()
    if mode == "direct":
        out = emb.encode(inputs, batch_size=batch_size, mode="direct")
        dt = (time.perf_counter() - t0) * 1000 / len(inputs)
        vecs = out.embeddings
        extra = [{"reasoned": False, "rationale": None, "n_gen_tokens": 0,
                  "n_prompt_tokens": int(n), "latency_ms": dt, "p_think": None}
                 for n in out.n_tokens.tolist()]
    else:
        from mmemb.inference import AdaptiveEncoder

        kw = {}
        gate_cfg = Path(model) / "mmemb_gate.json"
        if gate_cfg.is_file():
            kw.update(json.loads(gate_cfg.read_text()))
        if budget is not None:
            kw["budget"] = budget
        if threshold is not None:
            kw["threshold"] = threshold
        enc = AdaptiveEncoder(emb, batch_size=batch_size, **{k: v for k, v in kw.items()
                                                             if k in ("budget", "threshold")})
        res = enc.encode(inputs, mode=mode, show_progress=len(inputs) > 4 * batch_size)
        vecs = res.embeddings
        extra = [{"reasoned": bool(res.reasoned[i]), "rationale": res.rationales[i],
                  "n_gen_tokens": int(res.n_gen_tokens[i]),
                  "n_prompt_tokens": int(res.n_prompt_tokens[i]),
                  "latency_ms": float(res.latency_ms[i]),
                  # the gate's own probability; in reason mode there is no decision pass
                  "p_think": float(res.p_think[i]) if mode == "adaptive" else None}
                 for i in range(len(inputs))]
    bad = (~torch.isfinite(vecs).all(dim=1)).nonzero().flatten().tolist()
    table = []
    for i, (rid, v, e) in enumerate(zip(ids, vecs.tolist(), extra, strict=True)):
        table.append({"id": rid, "task": tasks[i], "side": "query", "mode": mode,
                      "embedding": v if i not in bad else None, **e,
                      "status": "error" if i in bad else "ok",
                      "error": "non-finite embedding" if i in bad else None})
    return io.write(table, output, EMBEDDINGS)


def embed_report(output: str) -> dict:
    """How an ``embeddings`` artifact was produced: inputs, how many reasoned, p(think)."""
    from data_contracts import io
    from data_contracts.schemas import EMBEDDINGS

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


def cmd_embed(a: argparse.Namespace) -> int:
    ref = embed_file(a.model, a.input, a.output, a.mode, a.batch_size, a.image_root,
                     a.budget, a.threshold)
    rep = embed_report(ref.uri)
    print(json.dumps({**ref.to_dict(), "report": rep}, indent=2))
    share = "-" if rep["reasoned_share"] is None else f"{100 * rep['reasoned_share']:.0f}%"
    pm = "-" if rep["p_think_mean"] is None else f"{rep['p_think_mean']:.3f}"
    print(f"[embed] {rep['inputs']} inputs ({a.mode}): {rep['reasoned']} reasoned ({share}), "
          f"mean p(think) {pm}, {rep['errors']} error(s); per row: {ref.uri}", file=sys.stderr)
    return 0


def cmd_ui(a: argparse.Namespace) -> int:
    """Serve the MLflow UI over the run directory until Ctrl-C; exit 2 when there is no
    store yet, 3 when the server does not come up in ``--timeout``."""
    from tasks import mlflow_server as server

    try:
        proc = server.start_server(a.run_dir, a.host, a.port, a.backend_store_uri, a.workers)
    except FileNotFoundError as e:
        print(f"mmemb ui: {e}", file=sys.stderr)
        return 2
    url = f"http://{a.host}:{a.port}"
    print(f"starting the MLflow UI over {a.run_dir} on {url}; waiting up to {a.timeout:.0f}s "
          "for it (--timeout)", flush=True)
    try:
        took = server.wait_healthy(url, timeout=a.timeout, proc=proc)
        print(f"MLflow UI over {a.run_dir}: {url}  (up in {took:.0f}s; Ctrl-C stops it)",
              flush=True)
        proc.wait()
    except (TimeoutError, RuntimeError) as e:
        print(f"mmemb ui: {e}", file=sys.stderr, flush=True)
        return 3
    except KeyboardInterrupt:
        print("\nstopping the MLflow UI", flush=True)
    finally:
        server.stop_server(proc)
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    from tasks.cache import run_status

    for stage, (verdict, why, st) in run_status(a.run_dir, STAGE_NAMES, a.verify).items():
        if st is None:
            print(f"{stage:<9} " + (f"INTERRUPTED: {why}" if verdict == "interrupted" else "-"))
            continue
        text = "ok" if verdict == "ok" else f"STALE: {why}"
        print(f"{stage:<9} {text:<10} key {st['key'][:12]} "
              f"{st.get('finished_at', '')} {st.get('duration_s', 0):7.1f}s  "
              f"{st['result'].get('summary', '')}")
    return 0


def cmd_config(a: argparse.Namespace) -> int:
    import yaml

    from mmemb.configs.pipeline import PipelineConfig

    overrides = list(a.set)
    if a.stage:
        overrides.append(f"run.stages=[{a.stage}]")
    cfg = PipelineConfig.load(a.config, run_dir=a.run_dir, overrides=overrides)
    obj = cfg.section(a.stage) if a.stage else cfg
    print(yaml.safe_dump(obj.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def cmd_sync(a: argparse.Namespace) -> int:
    from tasks.tracking import Tracker, resolve_uri

    exp = a.experiment
    uri = a.tracking_uri
    if a.config:
        from mmemb.configs.pipeline import PipelineConfig

        cfg = PipelineConfig.load(a.config, run_dir=a.run_dir)
        exp = exp or cfg.run.tracking.experiment
        uri = uri or cfg.run.tracking.uri
    tr = Tracker(resolve_uri(uri, a.run_dir), exp or "mmemb", a.run_dir)
    sent, left = tr.replay()
    print(f"sent {sent} spooled record(s); {left} left")
    return 0 if left == 0 else 1


# --------------------------------------------------------------------------- parser

def _seconds(text: str) -> int:
    try:
        v = int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a number of seconds") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least 1 second")
    return v


def _prefect_timeout_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefect-timeout", type=_seconds, metavar="SECONDS",
                   help="how long to wait for Prefect's temporary API server when "
                   "PREFECT_API_URL is unset (default: run.prefect_startup_timeout_s, else "
                   f"{PREFECT_ENV}, else {DEFAULT_PREFECT_TIMEOUT_S})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmemb", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Run `mmemb COMMAND --help` for each command's options.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run the pipeline (prepare ... evaluate)",
                       description="Run the pipeline flow. Stages whose inputs, config and "
                       "code are unchanged are reused from the run directory.")
    r.add_argument("config", help="pipeline YAML (e.g. configs/demo.yaml)")
    r.add_argument("--run-dir", help="run directory: outputs, stage cache, MLflow store "
                   "(default: the config's run.run_dir)")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--from", dest="from_stage", choices=STAGE_NAMES, metavar="STAGE",
                   help="recompute STAGE and every stage after it; earlier ones are reused")
    g.add_argument("--only", choices=STAGE_NAMES, metavar="STAGE",
                   help="run only STAGE (recomputed), reading its inputs from the run dir")
    r.add_argument("--force", action="append", choices=STAGE_NAMES, metavar="STAGE",
                   help="recompute STAGE even if cached (repeatable); later stages rerun "
                   "only if its outputs changed")
    r.add_argument("--stages", metavar="A,B,...", help="run only these stages, in pipeline "
                   "order (sets run.stages)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (YAML syntax), e.g. --set train.lr=1e-4")
    r.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    r.add_argument("--json", metavar="FILE", help="also write the result payload as JSON")
    _prefect_timeout_option(r)
    r.add_argument("--verify", action="store_true", help="hash every output part and model "
                   "file before reusing a cached stage (default: each part must exist with "
                   "its recorded size)")
    r.add_argument("--skip-preflight", action="store_true", help="start without the "
                   "preflight (models load and have the method's tokens, input columns, "
                   "image roots, teacher prompt budgets, writable outputs; mmemb/preflight.py)")
    r.set_defaults(fn=cmd_run)

    s = sub.add_parser("stage", help="run one stage alone",
                       description="Run one stage as its own Prefect flow (cache and MLflow "
                       "as in the pipeline).")
    s.add_argument("name", choices=STAGE_NAMES, help="the stage")
    s.add_argument("config", help="pipeline YAML (its section NAME is used) or a YAML with "
                   "only the stage's settings")
    s.add_argument("--run-dir", help="run directory (default: the config's run.run_dir)")
    s.add_argument("--force", action="store_true", help="recompute even if cached")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set generate.seed=1")
    s.add_argument("--parent-run-id", help="MLflow run to nest under (default: the run "
                   "dir's last pipeline run)")
    _prefect_timeout_option(s)
    s.add_argument("--verify", action="store_true", help="hash every output part and model "
                   "file before reusing the cached stage")
    s.set_defaults(fn=cmd_stage)

    e = sub.add_parser("eval", help="evaluate a model (the evaluate stage)",
                       description="Run the evaluate stage, optionally on another model or "
                       "eval data than the config names.")
    e.add_argument("config", help="pipeline YAML or an evaluate-only YAML")
    e.add_argument("--model", help="checkpoint folder to evaluate (sets evaluate.model)")
    e.add_argument("--data", help="eval rows artifact / MMEB-V2 folder (sets evaluate.eval)")
    e.add_argument("--modes", metavar="A,B", help="modes, e.g. direct,reason,adaptive")
    e.add_argument("--out", help="output folder (sets evaluate.out)")
    e.add_argument("--run-dir", help="run directory")
    e.add_argument("--force", action="store_true", help="recompute even if cached")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value")
    _prefect_timeout_option(e)
    e.set_defaults(fn=cmd_eval)

    m = sub.add_parser("embed", help="embed a Parquet/JSONL of inputs with a trained model",
                       description="Embed inputs (columns text/instruction/image, or MMEB's "
                       "qry_text/qry_inst/qry_img_path; optional id) and write an "
                       "'embeddings' artifact folder (Parquet + manifest).")
    m.add_argument("--model", required=True, help="checkpoint folder (e.g. runs/demo/gate/"
                   "policy)")
    m.add_argument("--input", required=True, help=".parquet file, artifact folder or .jsonl")
    m.add_argument("--output", required=True, help="output artifact folder")
    m.add_argument("--mode", default="adaptive", choices=("direct", "reason", "adaptive"),
                   help="direct: never reason; reason: always; adaptive: the model's gate "
                   "decides (default)")
    m.add_argument("--batch-size", type=int, default=16, help="inputs per forward pass")
    m.add_argument("--image-root", help="folder image paths are relative to")
    m.add_argument("--budget", type=int, help="max reasoning tokens (default: the model's "
                   "mmemb_gate.json, else 64)")
    m.add_argument("--threshold", type=float, help="reason when p(<think>) > threshold")
    m.set_defaults(fn=cmd_embed)

    u = sub.add_parser("ui", help="start the MLflow UI over a run directory",
                       description="Start the MLflow UI (mlflow server) on the run "
                       "directory's SQLite store; Ctrl-C stops it and its helpers.")
    u.add_argument("--run-dir", default="runs/demo", help="run directory (default runs/demo)")
    u.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; "
                   "anything else exposes the UI to the network)")
    u.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    u.add_argument("--backend-store-uri", help="another tracking store instead")
    u.add_argument("--workers", type=int, default=1, help="server worker processes")
    u.add_argument("--timeout", type=_seconds, default=DEFAULT_UI_TIMEOUT_S,
                   metavar="SECONDS", help="how long to wait for the server to answer "
                   f"(default {DEFAULT_UI_TIMEOUT_S}; a busy machine can need minutes)")
    u.set_defaults(fn=cmd_ui)

    t = sub.add_parser("status", help="show which stages are cached in a run directory",
                       description="Per stage: ok, STALE (an output part is gone or changed, "
                       "an input differs from the one it was built from, or its upstream "
                       "stage is stale) or INTERRUPTED (a run did not finish).")
    t.add_argument("--run-dir", default="runs/demo", help="run directory")
    t.add_argument("--verify", action="store_true", help="also hash every output part and "
                   "model file")
    t.set_defaults(fn=cmd_status)

    c = sub.add_parser("config", help="print the resolved (wired, validated) config",
                       description="Load a pipeline YAML, fill the wired paths and print it; "
                       "with --stage only that stage's section, which is a valid YAML for "
                       "`python -m mmemb.stages.NAME --config FILE`.")
    c.add_argument("config", help="pipeline YAML")
    c.add_argument("--stage", choices=STAGE_NAMES, help="print only this stage's section")
    c.add_argument("--run-dir", help="run directory (default: the config's run.run_dir)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set generate.replica=1")
    c.set_defaults(fn=cmd_config)

    y = sub.add_parser("sync", help="send MLflow records spooled while the store was down",
                       description="Replay <run_dir>/_mlflow_spool/*.json to the tracking "
                       "store (MLFLOW_TRACKING_URI, --tracking-uri or the run dir's SQLite).")
    y.add_argument("--run-dir", default="runs/demo", help="run directory")
    y.add_argument("--config", help="pipeline YAML (for tracking.uri and experiment)")
    y.add_argument("--tracking-uri", help="tracking store to send to")
    y.add_argument("--experiment", help="experiment name (default mmemb)")
    y.set_defaults(fn=cmd_sync)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    _setup_env(_run_dir_of(getattr(a, "config", None), getattr(a, "run_dir", None)),
               light=a.command in LIGHT_COMMANDS)
    from data_contracts.io import ContractError
    from mmemb.configs.base import ConfigError

    try:
        return a.fn(a)
    except (ConfigError, ContractError) as e:
        print(f"mmemb {a.command}: {e}", file=sys.stderr)
        return 2
    except StartupTimeout as e:
        print(f"mmemb {a.command}: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
