"""MLflow tracking for the pipeline: one parent run per pipeline run, one child per stage.

Why it is shaped like this:

* Runs are created with :class:`~mlflow.MlflowClient` and the ``mlflow.parentRunId`` tag,
  not the fluent ``start_run`` stack, so a stage that runs in another process (a torchrun
  worker, a Kubernetes pod) nests under the same parent by receiving only two strings:
  the tracking URI and the parent run id (env ``MMEMB_MLFLOW_PARENT_RUN_ID``).
* The default store is ``sqlite:///<run_dir>/mlflow.db`` with artifacts in
  ``<run_dir>/mlartifacts``: the run directory is the whole experiment record and the UI
  opens over it (``mmemb ui``). ``MLFLOW_TRACKING_URI`` (or ``run.tracking.uri``) switches
  to a team server unchanged.
* Tracking never costs a result. Everything a stage logs is first gathered into one JSON
  record; if the store is unreachable (or fails mid-way) the record is written to
  ``<run_dir>/_mlflow_spool/`` and a clear message says so; ``mmemb sync`` (and the next
  pipeline run) replays it once the store is back.
* Only rank 0 logs (``RANK``/``LOCAL_RANK`` env); other ranks get a no-op tracker.
* Params are redacted: keys that look like secrets and URLs with credentials never reach
  the store.

Models are logged as MLflow pyfunc models *from code* (:mod:`tasks.mlflow_model`, no pickle)
with the checkpoint folder as their artifact, which works offline, loads back with
``mlflow.pyfunc.load_model`` and can be registered with an alias; ``log_models:
artifacts`` logs the bare folder instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import urllib.request
import uuid
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data_contracts.files import atomic_write_json
from mmemb.configs.base import ConfigError
from mmemb.redact import REDACTED, redact, redact_obj, redact_text  # noqa: F401 - re-exported

ENV_PARENT = "MMEMB_MLFLOW_PARENT_RUN_ID"
ENV_RUN = "MMEMB_MLFLOW_RUN_ID"
ENV_UI = "MMEMB_MLFLOW_UI_URL"
SPOOL_DIR = "_mlflow_spool"
EXPERIMENT_KIND = "mlflow.experimentKind"
DEFAULT_UI = "http://127.0.0.1:5000"
#: The query that opens MLflow 3's UI in "Model training" mode, on the experiment's runs:
#: the UI decides its landing tab from this parameter (else from the browser's remembered
#: switch, default GenAI), not from the experiment's kind tag.
UI_QUERY = "workflowType=machine_learning"
#: Step metrics (curves) are logged under this prefix: MLflow sorts named chart sections
#: before the unprefixed "Model metrics" section, so a run's metrics page opens on them.
CURVE_PREFIX = "curves/"
#: The run tag MLflow's artifact viewer reads to show a JSON file as a table.
LOGGED_ARTIFACTS = "mlflow.loggedArtifacts"

# MLflow's HTTP client retries for minutes by default; a pipeline should say "unreachable"
# within seconds and go on (users can still raise these).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


# --------------------------------------------------------------------------- helpers

def default_tracking_uri(run_dir: str | Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def artifact_root(run_dir: str | Path) -> str:
    return (Path(run_dir).resolve() / "mlartifacts").as_uri()


_TEMPLATE = re.compile(r"\{\{.*?\}\}")


def resolve_uri(configured: str | None, run_dir: str | Path) -> str:
    """Config value (``${VAR}`` expanded), else ``MLFLOW_TRACKING_URI``, else the run
    directory's SQLite store.

    Refuses a template that was never filled (``{{ $MLFLOW_TRACKING_URI }}``: a Prefect
    deployment made while the variable was unset) and a ``${VAR}`` whose variable is
    unset, instead of creating a store named after the literal text."""
    if configured:
        uri, where = os.path.expandvars(configured), "run.tracking.uri"
    else:
        uri, where = os.environ.get("MLFLOW_TRACKING_URI", ""), "MLFLOW_TRACKING_URI"
    if _TEMPLATE.search(uri):
        raise ConfigError(f"{where} is the unfilled template {uri!r}: the deployment was made "
                          "while MLFLOW_TRACKING_URI was unset. Export it (e.g. "
                          "MLFLOW_TRACKING_URI=https://mlflow.example.org) and run `prefect "
                          "deploy` again, or set the deployment's job variable env."
                          "MLFLOW_TRACKING_URI.")
    if "${" in uri:
        raise ConfigError(f"{where} {uri!r} refers to an environment variable that is not "
                          "set here; export it before the run.")
    return uri or default_tracking_uri(run_dir)


def is_rank0() -> bool:
    return all(os.environ.get(k, "0") in ("0", "") for k in ("RANK", "LOCAL_RANK"))


def _tag(value: Any) -> str:
    """A tag value: credentials and token-shaped strings hidden, MLflow's size limit kept."""
    return redact_text(str(value))[:8000]


def redact_params(params: dict[str, Any]) -> dict[str, str]:
    return {k: redact(k, str(v))[:6000] for k, v in params.items()}


def redact_uri(uri: str) -> str:
    return redact_text(uri)


class RedactingFilter(logging.Filter):
    """Redacts a log record's message in place (what Prefect's log capture sends to its
    database and the console prints)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's problem
            return True
        clean = redact_text(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


_FILTER = RedactingFilter()
#: The loggers a flow's printed lines (``log_prints``) and Prefect's own messages go to.
REDACTED_LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "prefect", "mmemb")


def install_log_redaction() -> None:
    """Redact every record those loggers emit (idempotent)."""
    for name in REDACTED_LOGGERS:
        lg = logging.getLogger(name)
        if _FILTER not in lg.filters:
            lg.addFilter(_FILTER)


def folder_mb(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def _float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f == f and abs(f) != float("inf") else None


def _metric_key(k: str) -> str:
    """MLflow keys allow alphanumerics, ``_ - . space / :``; map anything else to ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-. /:]", "_", k)[:250]


def _summary_key(k: str) -> str:
    """A single-value metric's key without ``/``: the UI puts every such key in its one
    "Model metrics" section, below the curves, instead of a section per prefix."""
    return _metric_key(k.replace("/", "."))


def _curve_key(k: str) -> str:
    return _metric_key(k if k.startswith(CURVE_PREFIX) else CURVE_PREFIX + k)


@contextlib.contextmanager
def _fluent_uri(uri: str):
    """Point MLflow's fluent API (needed by ``log_model``) at ``uri`` for a moment.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``; left set, it would
    redirect every later run directory in this process to this store. Restore both.
    """
    import mlflow

    old_env = os.environ.get("MLFLOW_TRACKING_URI")
    old = mlflow.get_tracking_uri() if old_env else None
    old_reg = os.environ.get("MLFLOW_REGISTRY_URI")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old)
        mlflow.set_registry_uri(old_reg)
        for k, v in (("MLFLOW_TRACKING_URI", old_env), ("MLFLOW_REGISTRY_URI", old_reg)):
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --------------------------------------------------------------------------- the record

@dataclass
class StageRecord:
    """Everything one stage logs, as plain JSON: sent to MLflow or spooled to disk."""

    stage: str
    run_name: str
    parent_run_id: str | None = None
    run_id: str | None = None  # the child run, when it was created up-front
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    step_metrics: list[list] = field(default_factory=list)  # [[step, {k: v}], ...]
    steps_logged: int = 0  # step rows already sent live
    datasets: list[dict] = field(default_factory=list)  # {name, uri, digest, rows, ...}
    artifacts: list[list[str]] = field(default_factory=list)  # [[local path, artifact dir]]
    # [[local split-orient JSON, artifact path]]: previews shown as tables by the UI
    tables: list[list[str]] = field(default_factory=list)
    models: list[dict] = field(default_factory=list)  # {name, path, register_as}
    status: str = "FINISHED"
    error: str | None = None


def _schema_of(uri: str):
    """The mlflow Schema of a Parquet artifact (from its first part's footer), or None."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
        from mlflow.types import DataType
        from mlflow.types.schema import Array, ColSpec, Schema

        p = Path(uri)
        f = p if p.is_file() else next(iter(sorted(p.glob("*.parquet"))), None)
        if f is None:
            return None
        sch = pq.read_schema(f)

        def conv(t):
            if pa.types.is_list(t) or pa.types.is_large_list(t):
                inner = conv(t.value_type)
                return Array(inner) if inner is not None else None
            for test, dt in ((pa.types.is_string, DataType.string),
                             (pa.types.is_large_string, DataType.string),
                             (pa.types.is_int32, DataType.integer),
                             (pa.types.is_int64, DataType.long),
                             (pa.types.is_float32, DataType.float),
                             (pa.types.is_float64, DataType.double),
                             (pa.types.is_boolean, DataType.boolean)):
                if test(t):
                    return dt
            return None

        cols = [ColSpec(conv(f.type), f.name) for f in sch if conv(f.type) is not None]
        return Schema(cols) if cols else None
    except Exception:  # noqa: BLE001 - a schema is a nicety, never a failure
        return None


def _dataset_input(d: dict):
    """An MLflow dataset input for one artifact: its source, digest, rows and schema show
    in the run's Datasets panel (the data itself stays where it is)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    uri = d["uri"] if "://" in d["uri"] else str(Path(d["uri"]).resolve())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(uri)

    class _Parquet(MetaDataset):
        def to_dict(self):
            out = super().to_dict()
            out["profile"] = json.dumps({"num_rows": d.get("rows"),
                                         "schema_version": d.get("schema_version")})
            return out

    ds = _Parquet(source, name=d["name"], digest=(d.get("digest") or "")[:32] or None,
                  schema=_schema_of(d["uri"]))
    tags = [InputTag("mlflow.data.context", d.get("context", "input")),
            InputTag("mmemb.digest", d.get("digest") or ""),
            InputTag("mmemb.contract", d.get("contract") or "")]
    return DatasetInput(ds._to_mlflow_entity(), tags=tags)


def model_signature(checkpoint: Path):
    """The pyfunc signature of an mmemb checkpoint: the input columns, one float32 vector
    of the model's width per row, and the ``mode`` param.

    Given explicitly because MLflow cannot infer it from ``predict``'s type hints (it
    warns "Failed to infer model signature"), and because without a params schema the
    logged model ignores ``params={"mode": ...}``. No input example: validating one would
    load the whole checkpoint while logging."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    try:
        cfg = json.loads((Path(checkpoint) / "config.json").read_text())
        width = int((cfg.get("text_config") or cfg)["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError):
        width = -1
    return ModelSignature(
        inputs=Schema([ColSpec("string", "text"),
                       ColSpec("string", "instruction", required=False),
                       ColSpec("string", "image", required=False)]),  # a path; "" = none
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, width))]),
        params=ParamSchema([ParamSpec("mode", "string", "direct"),
                            ParamSpec("budget", "double", None),
                            ParamSpec("threshold", "double", None)]))


# --------------------------------------------------------------------------- the tracker

class TrackingUnavailable(RuntimeError):
    pass


class Tracker:
    """One tracking store. All methods swallow store failures (and say so), never raise."""

    def __init__(self, uri: str, experiment: str, run_dir: str | Path, *, enabled: bool = True,
                 log_models: str = "pyfunc", model_max_mb: float = 2048.0,
                 upload_max_mb: float = 50.0, quiet: bool = False):
        self.uri = uri
        self.experiment = experiment
        self.run_dir = Path(run_dir)
        self.enabled = enabled and is_rank0()
        self.log_models = log_models
        self.model_max_mb = model_max_mb
        self.upload_max_mb = upload_max_mb
        self.quiet = quiet
        self.offline_reason: str | None = None
        self._client = None
        self._experiment_id: str | None = None

    @classmethod
    def from_config(cls, tracking, run_dir: str | Path, **kw) -> Tracker:
        """From a :class:`mmemb.configs.pipeline.TrackingConfig`."""
        return cls(resolve_uri(tracking.uri, run_dir), tracking.experiment, run_dir,
                   enabled=tracking.enabled, log_models=tracking.log_models,
                   model_max_mb=tracking.model_max_mb, upload_max_mb=tracking.upload_max_mb,
                   **kw)

    # ------------------------------------------------------------------ connection
    @property
    def is_local(self) -> bool:
        return self.uri.startswith(("sqlite:", "file:")) or "://" not in self.uri

    def _say(self, msg: str) -> None:
        if not self.quiet:
            print(redact_text(msg), flush=True)

    def _go_offline(self, what: str, err: BaseException) -> None:
        if self.offline_reason is None:
            first = (str(err).splitlines() or [""])[0][:300]
            self.offline_reason = redact_text(f"{type(err).__name__}: {first}")
            self._say(f"[mlflow] tracking store {redact_uri(self.uri)} is unreachable while "
                      f"{what} ({self.offline_reason}). The stage goes on and its outputs are "
                      f"kept in {self.run_dir}; what it would have logged is spooled to "
                      f"{self.run_dir / SPOOL_DIR} and sent by `mmemb sync --run-dir "
                      f"{self.run_dir}` (or the next pipeline run) once the store is back.")

    def _check_reachable(self) -> None:
        if self.uri.startswith(("http://", "https://")):
            url = self.uri.rstrip("/") + "/health"
            try:
                with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - http(s) only
                    r.read()
            except Exception as e:  # noqa: BLE001
                raise TrackingUnavailable(f"{redact_uri(url)}: {e}") from e

    @property
    def client(self):
        """The MlflowClient, created (and the experiment ensured) on first use."""
        if self._client is None:
            from mlflow import MlflowClient

            self._check_reachable()
            client = MlflowClient(self.uri, registry_uri=self.uri)
            exp = client.get_experiment_by_name(self.experiment) if self.experiment else None
            if not self.experiment:
                pass  # logging into existing runs only (a launched rank)
            elif exp is None:
                loc = artifact_root(self.run_dir) if self.is_local else None
                try:
                    # a training experiment: the UI opens on its runs, not the GenAI overview
                    self._experiment_id = client.create_experiment(
                        self.experiment, loc, tags={EXPERIMENT_KIND: "custom_model_development"})
                except Exception:  # noqa: BLE001 - created concurrently by another process
                    self._experiment_id = client.get_experiment_by_name(
                        self.experiment).experiment_id
            else:
                self._experiment_id = exp.experiment_id
                if exp.tags.get(EXPERIMENT_KIND) != "custom_model_development":
                    with contextlib.suppress(Exception):  # a team server may refuse
                        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND,
                                                  "custom_model_development")
            self._client = client
        return self._client

    @property
    def active(self) -> bool:
        return self.enabled and self.offline_reason is None

    def _try(self, what: str, fn, *a, **kw):
        if not self.active:
            return None
        try:
            return fn(*a, **kw)
        except Exception as e:  # noqa: BLE001 - tracking must not fail a stage
            self._go_offline(what, e)
            return None

    @property
    def experiment_id(self) -> str | None:
        if self._experiment_id is None:
            self._try("opening the experiment", lambda: self.client)
        return self._experiment_id

    def ui_url(self, run_id: str | None = None) -> str:
        """The UI page of a run (or, without one, of the experiment's runs), opened in
        "Model training" mode (:data:`UI_QUERY`); the bare server URL when no experiment
        is known yet."""
        base = os.environ.get(ENV_UI) or (DEFAULT_UI if self.is_local else
                                          redact_uri(self.uri).rstrip("/"))
        if self._experiment_id is None:
            return base
        page = f"runs/{run_id}" if run_id else "runs"
        return f"{base}/#/experiments/{self._experiment_id}/{page}?{UI_QUERY}"

    # ------------------------------------------------------------------ runs
    def start_run(self, name: str, parent_run_id: str | None = None,
                  tags: dict[str, str] | None = None) -> str | None:
        """Create a run (RUNNING); returns its id, or None when tracking is off/unreachable."""
        def go():
            t = {"mlflow.runName": name, **(tags or {})}
            if parent_run_id and not parent_run_id.startswith("pending-"):
                t["mlflow.parentRunId"] = parent_run_id
            t = {k: _tag(v) for k, v in t.items()}
            return self.client.create_run(self.experiment_id, tags=t, run_name=name).info.run_id
        return self._try(f"creating run {name!r}", go)

    def set_tags(self, run_id: str | None, tags: dict[str, str]) -> None:
        if run_id:
            from mlflow.entities import RunTag

            self._try("setting tags", lambda: self.client.log_batch(
                run_id, tags=[RunTag(k, _tag(v)) for k, v in tags.items()]))

    def log_params(self, run_id: str | None, params: dict[str, Any]) -> None:
        if not run_id:
            return
        from mlflow.entities import Param

        items = list(redact_params(params).items())
        for i in range(0, len(items), 100):
            self._try("logging params", lambda chunk=items[i:i + 100]: self.client.log_batch(
                run_id, params=[Param(k[:250], v) for k, v in chunk]))

    def log_metrics(self, run_id: str | None, metrics: dict[str, Any], step: int = 0) -> bool:
        if not run_id:
            return False
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(_metric_key(k), f, ts, step) for k, v in metrics.items()
              if (f := _float(v)) is not None]
        ok = True
        for i in range(0, len(ms), 1000):
            r = self._try("logging metrics", lambda c=ms[i:i + 1000]: self.client.log_batch(
                run_id, metrics=c) or True)
            ok = ok and bool(r)
        return ok

    def end_run(self, run_id: str | None, status: str = "FINISHED") -> None:
        if run_id:
            self._try("closing the run", lambda: self.client.set_terminated(run_id, status))

    def step_logger(self, run_id: str | None, record: StageRecord | None = None):
        """A :data:`mmemb.stages.base.StepLogger` that sends each step live (rank 0)."""
        def log(step: int, metrics: dict[str, float]) -> None:
            curves = {_curve_key(k): v for k, v in metrics.items()}
            if self.log_metrics(run_id, curves, step=step) and record is not None:
                record.steps_logged += 1
        return log

    # ------------------------------------------------------------------ a stage's record
    def log_record(self, rec: StageRecord) -> str | None:
        """Send a whole stage record; on failure spool it. Returns the run id (or None)."""
        if not self.enabled:
            return None
        if self.active:
            try:
                return self._send(rec)
            except Exception as e:  # noqa: BLE001
                self._go_offline(f"logging stage {rec.stage!r}", e)
        self.spool(rec)
        return None

    def _send(self, rec: StageRecord) -> str:
        """Send ``rec`` whole (creating its run if it has none): tags, params, metrics and
        the steps not logged live, datasets, artifacts, models; then end the run. Raises
        when the store fails, so the caller can spool the record."""
        from mlflow.entities import Metric, Param, RunTag

        c = self.client
        run_id = rec.run_id
        if run_id is None:
            tags = {"mlflow.runName": rec.run_name, **rec.tags}
            if rec.parent_run_id and not rec.parent_run_id.startswith("pending-"):
                tags["mlflow.parentRunId"] = rec.parent_run_id
            run_id = c.create_run(self.experiment_id, run_name=rec.run_name,
                                  tags={k: _tag(v) for k, v in tags.items()}).info.run_id
            rec.run_id = run_id
            rec.steps_logged = 0
        else:
            # the run was created up-front under the plain stage name (so curves stream
            # live); the record's name carries the stage's key figure
            tags = {**rec.tags, "mlflow.runName": rec.run_name}
            c.log_batch(run_id, tags=[RunTag(k, _tag(v)) for k, v in tags.items()])
        params = list(redact_params(rec.params).items())
        for i in range(0, len(params), 100):
            c.log_batch(run_id, params=[Param(k[:250], v) for k, v in params[i:i + 100]])
        ts = int(time.time() * 1000)
        ms = [Metric(_summary_key(k), f, ts, 0) for k, v in rec.metrics.items()
              if (f := _float(v)) is not None]
        for step, m in rec.step_metrics[rec.steps_logged:]:
            ms += [Metric(_curve_key(k), f, ts, int(step)) for k, v in m.items()
                   if (f := _float(v)) is not None]
        for i in range(0, len(ms), 1000):
            c.log_batch(run_id, metrics=ms[i:i + 1000])
        rec.steps_logged = len(rec.step_metrics)
        if rec.datasets:
            c.log_inputs(run_id, datasets=[_dataset_input(d) for d in rec.datasets])
        for local, dest in rec.artifacts:
            p = Path(local)
            if p.is_dir():
                c.log_artifacts(run_id, str(p), dest)
            elif p.is_file():
                c.log_artifact(run_id, str(p), dest)
        self._log_tables(run_id, rec.tables)
        for m in rec.models:
            self._log_model(run_id, m)
        c.set_terminated(run_id, rec.status)
        return run_id

    def _log_tables(self, run_id: str, tables: list[list[str]]) -> None:
        """Upload split-orient JSON previews and list them in the run's
        :data:`LOGGED_ARTIFACTS` tag, so the artifact viewer opens them as tables.

        Not ``MlflowClient.log_table``: it appends to an existing file, so a record sent
        again (replayed from the spool) would duplicate rows; this overwrites and merges."""
        sent = []
        for local, dest in tables:
            p = Path(local)
            if p.is_file():
                folder = str(Path(dest).parent)
                self.client.log_artifact(run_id, str(p), None if folder == "." else folder)
                sent.append(str(Path(dest).parent / p.name))
        if not sent:
            return
        try:
            old = json.loads(self.client.get_run(run_id).data.tags.get(LOGGED_ARTIFACTS, "[]"))
        except (ValueError, TypeError):
            old = []
        known = {e.get("path") for e in old if isinstance(e, dict)}
        entries = old + [{"path": s, "type": "table"} for s in sent if s not in known]
        self.client.set_tag(run_id, LOGGED_ARTIFACTS, json.dumps(entries))

    def _log_model(self, run_id: str, m: dict) -> None:
        """A model of a run: its path always; its files (as artifacts, or as a pyfunc model,
        registered with aliases when asked) only when ``log_models`` and its size allow."""
        path = Path(m["path"])
        c = self.client
        c.set_tag(run_id, f"mmemb.model.{m['name']}.path", str(path.resolve()))
        if self.log_models == "none" or not path.is_dir():
            return
        size = folder_mb(path)
        if size > self.model_max_mb:
            c.set_tag(run_id, f"mmemb.model.{m['name']}.logged", f"by reference ({size:.0f} MB "
                      f"> model_max_mb {self.model_max_mb:.0f})")
            return
        if self.log_models == "artifacts":
            c.log_artifacts(run_id, str(path), f"models/{m['name']}")
            return
        import mlflow

        code = Path(__file__).with_name("mlflow_model.py")
        with _fluent_uri(self.uri), mlflow.start_run(run_id=run_id, nested=True), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = mlflow.pyfunc.log_model(
                name=m["name"], python_model=str(code), artifacts={"checkpoint": str(path)},
                pip_requirements=["mmemb"], tags={"mmemb.stage": m.get("stage", "")},
                signature=model_signature(path))
            c.set_tag(run_id, f"mmemb.model.{m['name']}.uri", info.model_uri)
            reg = m.get("register_as")
            if reg:
                mv = mlflow.register_model(info.model_uri, reg["name"])
                for alias in reg.get("aliases", []):
                    c.set_registered_model_alias(reg["name"], alias, mv.version)
                c.set_tag(run_id, f"mmemb.model.{m['name']}.registered",
                          f"{reg['name']} v{mv.version}")

    # ------------------------------------------------------------------ spool
    def spool(self, rec: StageRecord) -> Path:
        d = self.run_dir / SPOOL_DIR
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{time.time_ns()}-{rec.stage}-{uuid.uuid4().hex[:6]}.json"
        # Redacted before it touches the disk: params by key and shape, tags, errors.
        record = asdict(rec)
        record["params"] = redact_params(record["params"])
        body = redact_obj({"uri": redact_uri(self.uri), "experiment": self.experiment,
                           "record": record})
        atomic_write_json(path, body)
        self._say(f"[mlflow] {rec.stage}: tracking record spooled to {path}")
        return path

    def replay(self) -> tuple[int, int]:
        """Send spooled records (oldest first); returns (sent, left)."""
        d = self.run_dir / SPOOL_DIR
        files = sorted(d.glob("*.json")) if d.is_dir() else []
        if not files or not self.enabled:
            return 0, len(files)
        sent = 0
        parents: dict[str, str] = {}
        for f in files:
            try:
                body = json.loads(f.read_text())
                rec = StageRecord(**body["record"])
            except (OSError, json.JSONDecodeError, TypeError) as e:
                self._say(f"[mlflow] {f}: unreadable spool file ({e}); left in place")
                continue
            if rec.parent_run_id in parents:
                rec.parent_run_id = parents[rec.parent_run_id]
            old = rec.run_id
            if old is not None and self._try("checking a spooled run", self._exists, old) is False:
                rec.run_id = None
            if not self.active:
                break
            try:
                new = self._send(rec)
            except Exception as e:  # noqa: BLE001
                self._go_offline(f"replaying {f.name}", e)
                break
            if rec.tags.get("mmemb.kind") == "pipeline" and old:
                parents[old] = new
            if body["record"].get("tags", {}).get("mmemb.placeholder_id"):
                parents[body["record"]["tags"]["mmemb.placeholder_id"]] = new
            f.unlink()
            sent += 1
        left = len(list(d.glob("*.json")))
        if sent:
            self._say(f"[mlflow] replayed {sent} spooled record(s) to {redact_uri(self.uri)}"
                      + (f"; {left} left" if left else ""))
        return sent, left

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except Exception as e:  # noqa: BLE001
            if "RESOURCE_DOES_NOT_EXIST" in str(e) or "not found" in str(e).lower():
                return False
            raise


# --------------------------------------------------------------------------- building records

def dataset_entries(refs: Iterable[tuple[str, dict]], context: str) -> list[dict]:
    """[(name, ArtifactRef.to_dict()), ...] -> dataset dicts for :class:`StageRecord`."""
    out = []
    for name, r in refs:
        out.append({"name": f"{r.get('contract', name)}:{name}", "uri": r["uri"],
                    "digest": r.get("digest"), "rows": r.get("rows"),
                    "schema_version": r.get("schema_version"), "contract": r.get("contract"),
                    "context": context})
    return out


def artifact_entries(outputs: dict[str, dict], files: dict[str, str], upload_max_mb: float
                     ) -> tuple[list[list[str]], dict[str, str]]:
    """Which outputs/files to upload, and tags for those kept by reference only."""
    arts: list[list[str]] = []
    tags: dict[str, str] = {}
    for name, r in outputs.items():
        p = Path(r["uri"])
        tags[f"mmemb.output.{name}.uri"] = str(p.resolve())
        if p.exists() and folder_mb(p) <= upload_max_mb:
            arts.append([str(p), f"data/{name}"])
        else:
            tags[f"mmemb.output.{name}.logged"] = "by reference"
    for name, f in files.items():
        p = Path(f)
        if p.is_dir():
            arts.append([str(p), f"files/{name}"])
        elif p.is_file():
            arts.append([str(p), "files"])
    return arts, tags


# --------------------------------------------------------------------------- Prefect links

def prefect_tags() -> dict[str, str]:
    """The current Prefect flow run (and task run, inside one) as MLflow tags, so an MLflow
    run names the Prefect run that made it; empty outside Prefect."""
    from prefect.runtime import flow_run, task_run

    tags = {}
    for k, v in (("prefect.flow_run_id", flow_run.id), ("prefect.flow_run_name", flow_run.name),
                 ("prefect.task_run_id", task_run.id), ("prefect.flow_run_url", flow_run.ui_url),
                 ("prefect.api_url", flow_run.api_url)):
        if v and not str(v).startswith("None"):  # no URL without a Prefect server
            tags[k] = str(v)
    return tags


def link_in_prefect(tracker: Tracker, run_id: str | None, stage: str | None = None) -> None:
    """The other way round: a link artifact on the current Prefect flow run pointing at the
    MLflow run of ``stage``, or (``stage`` None) at the pipeline's parent run, whose ids
    also become the flow run's labels. A failed link is said, never raised."""
    from prefect.runtime import flow_run

    if not run_id or (stage is None and not flow_run.id):
        return
    try:
        from prefect.artifacts import create_link_artifact

        if stage is None:
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                client.update_flow_run_labels(flow_run.id, {
                    "mlflow.run_id": run_id, "mlflow.experiment_id": str(tracker.experiment_id),
                    "mlflow.tracking_uri": redact_uri(tracker.uri)})
        create_link_artifact(
            link=tracker.ui_url(run_id), key=f"mlflow-{stage or 'pipeline'}",
            link_text=f"MLflow run ({stage})" if stage else "MLflow parent run",
            description=f"MLflow run {run_id} " + (f"of stage {stage}" if stage
                                                   else "(all stages nest here)"))
    except Exception as e:  # noqa: BLE001 - a missing link must not fail the run
        print(f"[{stage or 'pipeline'}] could not link the Prefect run to MLflow: {e}",
              flush=True)
