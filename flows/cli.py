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
from mmemb.configs.base import read_yaml  # noqa: E402 - light: pydantic and YAML only
from mmemb.configs.pipeline import STAGES  # noqa: E402

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
        try:
            return (read_yaml(config).get("run") or {}).get("run_dir") or "runs/demo"
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
    user_overrides = list(a.set)  # what the parent run's name shows (not the flags below)
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
                       overrides=user_overrides, verify=a.verify)
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
    # evaluate.KEY is the stage's KEY in a pipeline and in an evaluate-only YAML alike
    out = run_stage_from_file("evaluate", a.config, a.run_dir, a.force,
                              sets, prefect_timeout=a.prefect_timeout)
    print(out.get("summary", ""))
    return 0 if out["status"] in ("ran", "cached") else 1


def cmd_embed(a: argparse.Namespace) -> int:
    from mmemb.embed_file import embed_file, embed_report

    ref = embed_file(a.model, a.input, a.output, a.mode, a.batch_size, a.image_root,
                     a.budget, a.threshold, a.vector_dtype)
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
        page = server.experiment_page(url, a.run_dir)
        if page:
            print(f"MLflow UI over {a.run_dir}: {page}\n  (the experiment's runs; or the "
                  f"MLflow home: {url}; up in {took:.0f}s; Ctrl-C stops it)", flush=True)
        else:
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

    for stage, (verdict, why, st) in run_status(a.run_dir, STAGES, a.verify).items():
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


def _o(*flags: str, **kw) -> tuple[tuple[str, ...], dict]:
    """One option of a command: argparse's ``add_argument`` arguments."""
    return flags, kw


_RUN_DIR = _o("--run-dir", help="run directory (default: the config's run.run_dir)")
_FORCE = _o("--force", action="store_true", help="recompute even if cached")
_VERIFY = _o("--verify", action="store_true", help="hash every output part and model file "
             "before reusing a cached stage (default: each part must exist with its recorded "
             "size)")
_TIMEOUT = _o("--prefect-timeout", type=_seconds, metavar="SECONDS", help="how long to wait "
              "for Prefect's temporary API server when PREFECT_API_URL is unset (default: "
              f"run.prefect_startup_timeout_s, else {PREFECT_ENV}, else "
              f"{DEFAULT_PREFECT_TIMEOUT_S})")


def _set(example: str) -> tuple[tuple[str, ...], dict]:
    return _o("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
              help=f"override a config value (YAML syntax, repeatable), e.g. --set {example}")


def _stage(flag: str, what: str, **kw) -> tuple[tuple[str, ...], dict]:
    return _o(flag, choices=STAGES, metavar="STAGE", help=what, **kw)


#: command -> (handler, one-line help, description, options). An option whose kwargs carry
#: ``group`` joins that mutually exclusive group.
COMMANDS: dict[str, tuple] = {
    "run": (cmd_run, "run the pipeline (prepare ... evaluate)", "Run the pipeline flow. "
            "Stages whose inputs, config and code are unchanged are reused from the run "
            "directory.", [
                _o("config", help="pipeline YAML (e.g. configs/demo.yaml)"),
                _o("--run-dir", help="run directory: outputs, stage cache, MLflow store "
                   "(default: the config's run.run_dir)"),
                _stage("--from", "recompute STAGE and every stage after it; earlier ones "
                       "are reused", dest="from_stage", group="from"),
                _stage("--only", "run only STAGE (recomputed), reading its inputs from the "
                       "run dir", group="from"),
                _stage("--force", "recompute STAGE even if cached (repeatable); later stages "
                       "rerun only if its outputs changed", action="append"),
                _o("--stages", metavar="A,B,...", help="run only these stages, in pipeline "
                   "order (sets run.stages)"),
                _set("train.lr=1e-4"),
                _o("--no-tracking", action="store_true", help="do not log to MLflow"),
                _o("--json", metavar="FILE", help="also write the result payload as JSON"),
                _TIMEOUT, _VERIFY,
                _o("--skip-preflight", action="store_true", help="start without the "
                   "preflight (models load and have the method's tokens, input columns, "
                   "image roots, teacher prompt budgets, writable outputs; "
                   "mmemb/preflight.py)")]),
    "stage": (cmd_stage, "run one stage alone", "Run one stage as its own Prefect flow "
              "(cache and MLflow as in the pipeline).", [
                  _o("name", choices=STAGES, help="the stage"),
                  _o("config", help="pipeline YAML (its section NAME is used) or a YAML "
                     "with only the stage's settings"),
                  _RUN_DIR, _FORCE, _set("generate.seed=1 (stage-only YAML: also seed=1)"),
                  _o("--parent-run-id", help="MLflow run to nest under (default: the run "
                     "dir's last pipeline run)"),
                  _TIMEOUT, _VERIFY]),
    "eval": (cmd_eval, "evaluate a model (the evaluate stage)", "Run the evaluate stage, "
             "optionally on another model or eval data than the config names.", [
                 _o("config", help="pipeline YAML or an evaluate-only YAML"),
                 _o("--model", help="checkpoint folder to evaluate (sets evaluate.model)"),
                 _o("--data", help="eval rows artifact / MMEB-V2 folder (sets evaluate.eval)"),
                 _o("--modes", metavar="A,B", help="modes, e.g. direct,reason,adaptive"),
                 _o("--out", help="output folder (sets evaluate.out)"),
                 _RUN_DIR, _FORCE, _set("evaluate.budget=32"), _TIMEOUT]),
    "embed": (cmd_embed, "embed a Parquet/JSONL of inputs with a trained model", "Embed "
              "inputs (columns text/instruction/image, or MMEB's qry_text/qry_inst/"
              "qry_img_path; optional id) and write an 'embeddings' artifact folder (Parquet "
              "+ manifest).", [
                  _o("--model", required=True, help="checkpoint folder (e.g. runs/demo/gate/"
                     "policy)"),
                  _o("--input", required=True, help=".parquet file, artifact folder or "
                     ".jsonl"),
                  _o("--output", required=True, help="output artifact folder"),
                  _o("--mode", default="adaptive", choices=("direct", "reason", "adaptive"),
                     help="direct: never reason; reason: always; adaptive: the model's gate "
                     "decides (default)"),
                  _o("--batch-size", type=int, default=16, help="inputs per forward pass"),
                  _o("--image-root", help="folder image paths are relative to"),
                  _o("--budget", type=int, help="max reasoning tokens (default: the model's "
                     "mmemb_gate.json, else 64)"),
                  _o("--threshold", type=float, help="reason when p(<think>) > threshold"),
                  _o("--vector-dtype", default="float32", choices=("float32", "float16"),
                     help="how the vectors are stored (float16 halves the artifact)")]),
    "ui": (cmd_ui, "start the MLflow UI over a run directory", "Start the MLflow UI (mlflow "
           "server) on the run directory's SQLite store; Ctrl-C stops it and its helpers.", [
               _o("--run-dir", default="runs/demo", help="run directory (default runs/demo)"),
               _o("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; "
                  "anything else exposes the UI to the network)"),
               _o("--port", type=int, default=5000, help="port (default 5000)"),
               _o("--backend-store-uri", help="another tracking store instead"),
               _o("--workers", type=int, default=1, help="server worker processes"),
               _o("--timeout", type=_seconds, default=DEFAULT_UI_TIMEOUT_S, metavar="SECONDS",
                  help="how long to wait for the server to answer (default "
                  f"{DEFAULT_UI_TIMEOUT_S}; a busy machine can need minutes)")]),
    "status": (cmd_status, "show which stages are cached in a run directory", "Per stage: "
               "ok, STALE (an output part is gone or changed, an input differs from the one "
               "it was built from, or its upstream stage is stale) or INTERRUPTED (a run did "
               "not finish).", [
                   _o("--run-dir", default="runs/demo", help="run directory"),
                   _o("--verify", action="store_true", help="also hash every output part "
                      "and model file")]),
    "config": (cmd_config, "print the resolved (wired, validated) config", "Load a pipeline "
               "YAML, fill the wired paths and print it; with --stage only that stage's "
               "section, which is a valid YAML for `python -m mmemb.stages.NAME --config "
               "FILE`.", [
                   _o("config", help="pipeline YAML"),
                   _o("--stage", choices=STAGES, help="print only this stage's section"),
                   _RUN_DIR, _set("generate.distributed.actors=2")]),
    "sync": (cmd_sync, "send MLflow records spooled while the store was down", "Replay "
             "<run_dir>/_mlflow_spool/*.json to the tracking store (MLFLOW_TRACKING_URI, "
             "--tracking-uri or the run dir's SQLite).", [
                 _o("--run-dir", default="runs/demo", help="run directory"),
                 _o("--config", help="pipeline YAML (for tracking.uri and experiment)"),
                 _o("--tracking-uri", help="tracking store to send to"),
                 _o("--experiment", help="experiment name (default mmemb)")]),
}


def build_parser() -> argparse.ArgumentParser:
    """``mmemb`` and its subcommands, from :data:`COMMANDS`."""
    p = argparse.ArgumentParser(prog="mmemb", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Run `mmemb COMMAND --help` for each command's options.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (fn, help_, description, options) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=description)
        groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
        for flags, kw in options:
            kw = dict(kw)
            group = kw.pop("group", None)
            if group and group not in groups:
                groups[group] = sp.add_mutually_exclusive_group()
            (groups[group] if group else sp).add_argument(*flags, **kw)
        sp.set_defaults(fn=fn)
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
