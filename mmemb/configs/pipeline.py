"""The pipeline's config: one YAML with a section per stage, wired through one run directory.

A pipeline YAML looks like::

    run:        {name: demo, run_dir: runs/demo, seed: 0, tracking: {...}}
    prepare:    {...}          # mmemb.configs.prepare.PrepareConfig
    generate:   {...}          # mmemb.configs.generate.GenerateConfig
    ...
    launch:     {train: {launcher: torchrun, nproc_per_node: 8}}

Paths between stages are *wired*, not typed by hand: a stage field that connects it to the
run directory or to an upstream stage (``out``, ``pairs``, ``model``, ...) and that the YAML
leaves out is filled from :data:`WIRING`, e.g. ``gate.model = <run_dir>/train/student``.
A value the YAML does give wins, and ``{run_dir}`` inside any string is replaced, so a user
can point one stage elsewhere without touching the rest. Wiring happens before validation,
so the loaded config is complete and every stage's section also runs alone.

Loading has one home, here: :func:`read_yaml` reads every file, :func:`is_pipeline_yaml` is
the one rule for what a pipeline file is, :func:`parse_overrides` the one ``KEY.PATH=VALUE``
syntax, :func:`wire` the one wiring; :meth:`PipelineConfig.load` loads a whole run and
:func:`load_stage` one stage of it (or a stage-only file) for a standalone run.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from mmemb.configs.base import ConfigError, StageConfig, read_yaml
from mmemb.configs.evaluate import EvaluateConfig
from mmemb.configs.gate import GateConfig
from mmemb.configs.generate import GenerateConfig, TeacherConfig
from mmemb.configs.prepare import PrepareConfig
from mmemb.configs.score import ScoreConfig
from mmemb.configs.select import SelectConfig
from mmemb.configs.train import TrainConfig
from mmemb.model.images import DEFAULT_MAX_DECODE_PIXELS
from mmemb.redact import find_secrets

#: The stages, in pipeline order, with their config classes: the one place stage names are
#: written. ``prepare`` is stage 0 (base model + data), then the method's five stages
#: (generate, score, select, train, gate) and the evaluation.
CONFIG_CLASSES: dict[str, type[StageConfig]] = {
    "prepare": PrepareConfig, "generate": GenerateConfig, "score": ScoreConfig,
    "select": SelectConfig, "train": TrainConfig, "gate": GateConfig,
    "evaluate": EvaluateConfig,
}
STAGES: tuple[str, ...] = tuple(CONFIG_CLASSES)
StageName = Literal[STAGES]  # type: ignore[valid-type]  # the same names, as a type

#: stage -> {field: template}. Templates use ``{run_dir}`` and the prepare stage's outputs
#: ``{base_model}``, ``{pairs}``, ``{eval}``, ``{image_root}``. Only fields the stage's config
#: class declares are filled; a field whose template resolves to None is left alone.
WIRING: dict[str, dict[str, str]] = {
    "prepare": {"out": "{run_dir}/data", "model_out": "{run_dir}/base_model"},
    "generate": {"pairs": "{pairs}", "data": "{pairs}", "image_root": "{image_root}",
                 "out": "{run_dir}/generate"},
    "score": {"rationales": "{run_dir}/generate/rationales", "pairs": "{pairs}",
              "model": "{base_model}", "image_root": "{image_root}", "out": "{run_dir}/score"},
    "select": {"scores": "{run_dir}/score/scores",
               "rationales": "{run_dir}/generate/rationales", "pairs": "{pairs}",
               "out": "{run_dir}/select"},
    "train": {"model": "{base_model}", "data": "{run_dir}/select/selections",
              "image_root": "{image_root}", "eval": "{eval}", "out": "{run_dir}/train"},
    "gate": {"model": "{run_dir}/train/student", "data": "{run_dir}/select/selections",
             "image_root": "{image_root}", "eval": "{eval}", "out": "{run_dir}/gate"},
    "evaluate": {"model": "{run_dir}/gate/policy", "eval": "{eval}",
                 "image_root": "{image_root}", "out": "{run_dir}/evaluate"},
}

#: Fields that name what a stage writes (everything else wired is an input).
OUTPUT_FIELDS = frozenset({"out", "model_out"})


def config_class(stage: str) -> type[StageConfig]:
    """The stage's config class; an unknown name is a :class:`ConfigError` listing them."""
    try:
        return CONFIG_CLASSES[stage]
    except KeyError:
        raise ConfigError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}") from None


class TrackingConfig(StageConfig):
    """MLflow: where runs go and what is uploaded."""

    enabled: bool = True
    uri: str | None = Field(None, description="tracking URI; default: env MLFLOW_TRACKING_URI, "
                            "else sqlite:///<run_dir>/mlflow.db")
    experiment: str = "mmemb"
    upload_max_mb: float = Field(50.0, ge=0, description="Parquet artifacts up to this size "
                                 "are uploaded; larger ones are logged by reference")
    log_models: Literal["pyfunc", "artifacts", "none"] = Field(
        "pyfunc", description="pyfunc: an MLflow model (models-from-code, no pickle) with the "
        "checkpoint as its artifact; artifacts: the checkpoint folder only")
    model_max_mb: float = Field(2048.0, ge=0, description="bigger checkpoints are logged by "
                                "reference (path tag) instead of copied")
    register_models: bool = Field(True, description="register train/gate models with an "
                                  "alias")
    model_name: str = "mmemb"


class ResolutionConfig(StageConfig):
    """One image resolution for the whole run (teacher, embedder, evaluation): wired into
    every stage's and teacher's ``min_pixels``/``max_pixels`` that its section leaves out."""

    max_pixels: int = Field(1024 * 1024, ge=28 * 28, description="1 MP: ~1,300 image tokens "
                            "on Qwen2-VL, ~1,000 on Qwen3-VL (a 1700x2200 page is ~4,800 at "
                            "the hub processor's 12.8 MP limit)")
    min_pixels: int | None = Field(None, ge=1, description="None: the processor's own")


class ImagesConfig(StageConfig):
    """How image files from the data are opened, for the whole run: wired into every
    stage section that reads images and leaves the setting out."""

    allow_outside_root: bool = Field(False, description="read image paths that resolve "
                                     "outside the image root (absolute, '..', links out)")
    max_decode_pixels: int | None = Field(DEFAULT_MAX_DECODE_PIXELS, ge=1, description=""
                                          "refuse an image that would decode to more pixels "
                                          "(per row); None: PIL's own limit only")


class RunSection(StageConfig):
    """The run as a whole."""

    name: str = "demo"
    run_dir: str = "runs/demo"
    seed: int = Field(0, description="default seed of every stage whose section sets none")
    resolution: ResolutionConfig = ResolutionConfig()
    images: ImagesConfig = ImagesConfig()
    stages: list[StageName] = Field(default_factory=lambda: list(STAGES),
                                    description="stages this pipeline runs, in order")
    tracking: TrackingConfig = TrackingConfig()
    prefect_startup_timeout_s: int | None = Field(
        None, ge=1, description="seconds to wait for Prefect's temporary API server (no "
        "PREFECT_API_URL); unset: PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, else 600 "
        "(flows/startup.py)")


class LaunchConfig(StageConfig):
    """How a stage's process(es) start. ``inprocess`` runs it inside the Prefect task.

    ``subprocess``: one fresh Python process (isolates an engine's memory and threads).
    ``torchrun``: ``torchrun --nnodes N --nproc_per_node P`` with a c10d rendezvous at
    ``rdzv_endpoint`` (multi-node: start the same command on every node, e.g. via ``prefix:
    [srun]`` on Slurm). ``deepspeed``: the DeepSpeed launcher, which reaches the hosts of
    ``hostfile`` over ssh/pdsh from this one task. ``replicas``: an alias kept for older
    configs: one process running the stage with ``distributed: {backend: ray, actors:
    nproc_per_node, gpus_per_actor: gpus_per_replica}`` on a local Ray (generate, score,
    evaluate); set the stage's ``distributed`` block instead, which also reaches a cluster.
    """

    launcher: Literal["inprocess", "subprocess", "torchrun", "deepspeed", "replicas"] = \
        "inprocess"
    nnodes: int = Field(1, ge=1)
    nproc_per_node: int = Field(1, ge=1)
    hostfile: str | None = None
    rdzv_endpoint: str | None = Field(None, description="host:port of the c10d rendezvous")
    rdzv_id: str | None = None
    master_addr: str | None = None
    master_port: int | None = None
    prefix: list[str] = Field(default_factory=list, description="e.g. ['srun', '--nodes=2']")
    gpus_per_replica: int = Field(1, ge=0, description="replicas (alias): the Ray actors' "
                                  "gpus_per_actor (= the engine's tensor_parallel_size); 0 "
                                  "= the stage's default")
    env: dict[str, str] = Field(default_factory=dict)
    retries: int = Field(1, ge=0, description="retries after a transient failure only")
    retry_delay_s: float = Field(10.0, ge=0)
    timeout_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> LaunchConfig:
        if self.launcher == "deepspeed" and self.nnodes > 1 and not self.hostfile:
            raise ValueError("launcher='deepspeed' with nnodes > 1 needs a hostfile (one "
                             "'host slots=N' line per node); or use launcher='torchrun' with "
                             "rdzv_endpoint")
        if self.launcher == "torchrun" and self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("launcher='torchrun' with nnodes > 1 needs rdzv_endpoint "
                             "(host:port of node 0) so the nodes find each other")
        if self.launcher == "replicas" and self.nnodes > 1:
            raise ValueError("launcher='replicas' runs a local Ray on one node; for several "
                             "nodes use launcher 'subprocess' and the stage's distributed: "
                             "{backend: ray, address: auto, actors: N} on a Ray cluster "
                             "(docs/deploy.md)")
        if self.launcher in ("inprocess", "subprocess") and (self.nnodes > 1
                                                             or self.nproc_per_node > 1):
            raise ValueError(f"launcher={self.launcher!r} starts one process; for "
                             "nnodes/nproc_per_node > 1 use 'torchrun' or 'deepspeed'")
        return self


_PLACEHOLDER = re.compile(r"^\{(run_dir|base_model|pairs|eval|image_root)\}")


def _fmt(value: Any, vars_: dict[str, str | None]) -> Any:
    """Replace ``{run_dir}`` etc. in strings (nested), leaving other braces alone."""
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            v = vars_.get(m.group(1))
            return m.group(0) if v is None else str(v)
        return re.sub(r"\{(run_dir|base_model|pairs|eval|image_root)\}", sub, value)
    if isinstance(value, dict):
        return {k: _fmt(v, vars_) for k, v in value.items()}
    if isinstance(value, list):
        return [_fmt(v, vars_) for v in value]
    return value


def _wire_resolution(stage: str, raw: dict, fields: set[str], res: dict) -> None:
    """``run.resolution`` into the stage (and, for generate, each teacher) unless set."""
    full = {k: res.get(k, ResolutionConfig.model_fields[k].default)
            for k in ("max_pixels", "min_pixels")}
    targets = [raw] if "max_pixels" in fields else []
    if stage == "generate" and "max_pixels" in TeacherConfig.model_fields:
        targets += [t for t in raw.get("teachers") or [] if isinstance(t, dict)]
    for t in targets:
        for k, v in full.items():
            t.setdefault(k, v)


#: ``run.images`` key -> the stage field it fills.
_IMAGE_FIELDS = {"allow_outside_root": "allow_images_outside_root",
                 "max_decode_pixels": "max_decode_pixels"}


def _wire_images(raw: dict, fields: set[str], images: dict) -> None:
    """``run.images`` into the stage's own fields unless its section sets them."""
    for k, field in _IMAGE_FIELDS.items():
        if field in fields and k in images:
            raw.setdefault(field, images[k])


def wire(data: dict[str, Any]) -> dict[str, Any]:
    """Fill the stage fields the YAML leaves out from the run dir and upstream outputs."""
    data = copy.deepcopy(data)
    run = dict(data.get("run") or {})
    run_dir = str(run.get("run_dir") or RunSection.model_fields["run_dir"].default)
    seed = run.get("seed", 0)
    res = dict(run.get("resolution") or {})
    vars_: dict[str, str | None] = {"run_dir": run_dir}
    prep_raw = _fmt(dict(data.get("prepare") or {}), vars_)
    for k, t in WIRING["prepare"].items():
        prep_raw.setdefault(k, t.format(run_dir=run_dir))
    prep_raw.setdefault("seed", seed)
    data["prepare"] = prep_raw
    try:
        prep = PrepareConfig.model_validate(prep_raw)
    except Exception:  # noqa: BLE001 - reported by the section's own validation below
        return data
    vars_.update(base_model=prep.model_path, pairs=prep.pairs_path, eval=prep.eval_path,
                 image_root=prep.image_root_path)
    stages = run.get("stages") or STAGES
    for stage in STAGES[1:]:
        if data.get(stage) is None and stage not in stages:
            data[stage] = None
            continue
        raw = _fmt(dict(data.get(stage) or {}), vars_)
        fields = set(CONFIG_CLASSES[stage].model_fields)
        for k, template in WIRING[stage].items():
            if k in fields and k not in raw:
                val = _fmt(template, vars_)
                if val is not None and "{" not in val:
                    raw[k] = val
        if "seed" in fields and "seed" not in raw:
            raw["seed"] = seed
        _wire_resolution(stage, raw, fields, res)
        _wire_images(raw, fields, dict(run.get("images") or {}))
        data[stage] = raw
    gate, train = data.get("gate"), data.get("train")
    if isinstance(gate, dict) and isinstance(train, dict):
        # stage 5's anchor is stage 4's objective: the same alpha and tau unless set
        for a, b in (("anchor_alpha", "alpha"), ("anchor_tau", "tau")):
            if a not in gate and b in train:
                gate[a] = train[b]
    return data


class PipelineConfig(StageConfig):
    """All stages of one run: the parameter model of the pipeline flow."""

    run: RunSection = RunSection()
    prepare: PrepareConfig = PrepareConfig()
    # None: the stage is not in run.stages and the YAML has no section for it.
    generate: GenerateConfig | None = None
    score: ScoreConfig | None = None
    select: SelectConfig | None = None
    train: TrainConfig | None = None
    gate: GateConfig | None = None
    evaluate: EvaluateConfig | None = None
    launch: dict[StageName, LaunchConfig] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _wire(cls, data: Any) -> Any:
        return wire(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _no_secrets(self) -> PipelineConfig:
        """A config is the flow's parameters (stored in Prefect's database) and MLflow's
        params: it may name the environment variable that holds a secret, never hold one.
        (:meth:`from_dict` checks first, so its message never quotes the value.)"""
        bad = find_secrets(self.model_dump(mode="json"))
        if bad:
            raise ValueError(_secrets_message(bad))
        return self

    @classmethod
    def from_dict(cls, data: dict, where: str = "<config>") -> PipelineConfig:
        refuse_secrets(data, where)
        try:
            return super().from_dict(data, where)
        except ConfigError as e:
            hint = _unwired_hint(str(e), data) if isinstance(data, dict) else ""
            if not hint:
                raise
            raise ConfigError(f"{e}\n{hint}") from None

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, run_dir: str | None = None,
             overrides: list[str] | dict[str, Any] | None = None) -> PipelineConfig:
        """Load a pipeline YAML; ``run_dir`` and ``key.path=value`` overrides win over it."""
        data = apply_overrides(read_yaml(path), overrides or {})
        if run_dir is not None:
            data.setdefault("run", {})["run_dir"] = str(run_dir)
        return cls.from_dict(data, where=str(path))

    # ------------------------------------------------------------------ access
    @property
    def run_dir(self) -> Path:
        return Path(self.run.run_dir)

    def section(self, stage: str) -> StageConfig:
        sec = getattr(self, stage)
        if sec is None:
            raise ConfigError(f"the config has no '{stage}' section and run.stages does not "
                              f"include it; add a '{stage}:' section (it may be empty)")
        return sec

    def launch_for(self, stage: str) -> LaunchConfig:
        return self.launch.get(stage) or LaunchConfig()


_WIRED_FROM_PREPARE = re.compile(r"^\{(base_model|pairs|eval|image_root)\}$")


def _unwired_hint(message: str, data: dict) -> str:
    """When a stage misses a key that prepare would have wired (no eval set, say): what to
    set, or which run.stages leave that stage out."""
    missing: dict[str, list[str]] = {}
    for stage in STAGES[1:]:
        for field, template in WIRING[stage].items():
            m = _WIRED_FROM_PREPARE.match(template)
            if m and f"  - {stage}.{field}: required key is missing" in message:
                missing.setdefault(stage, []).append(f"{field} (prepare's {m.group(1)})")
    if not missing:
        return ""
    run = data.get("run") if isinstance(data.get("run"), dict) else {}
    stages = [s for s in (run.get("stages") or STAGES) if s not in missing]
    what = "; ".join(f"{s}.{', '.join(f)}" for s, f in missing.items())
    prep = sorted({f.split("'s ")[1].rstrip(")") for fs in missing.values() for f in fs})
    # a section that is present is validated even when run.stages leaves its stage out
    drop = [s for s in missing if data.get(s) is not None]
    yaml_drop = f" and no '{drop[0]}:' section" if len(drop) == 1 else (
        f" and no {', '.join(drop)} sections" if drop else "")
    cli_drop = "".join(f" --set {s}=null" for s in drop)
    return (f"  hint: {what} comes from the prepare stage, and prepare.{'/'.join(prep)} is "
            f"not set. Set prepare.{prep[0]} (or the key itself), or run without "
            f"{', '.join(missing)}: run.stages=[{', '.join(stages)}]{yaml_drop} in the "
            f"config, or on the command line --stages {','.join(stages)}{cli_drop} "
            f"(mmemb run; mmemb config: --set 'run.stages=[{','.join(stages)}]'{cli_drop}).")


def refuse_secrets(data: Any, where: str = "<config>") -> None:
    """Raise :class:`ConfigError` naming the keys of ``data`` (a config mapping) that hold a
    secret; the message never quotes the values."""
    bad = find_secrets(data) if isinstance(data, dict) else []
    if bad:
        raise ConfigError(f"{where}: {_secrets_message(bad)}")


def _secrets_message(keys: list[str]) -> str:
    return (f"{', '.join(keys)}: holds a secret (a password or token in a URL, a connection "
            "string, a *_KEY/*_TOKEN value or a token; the value is not repeated here). "
            "Configs become Prefect flow parameters and MLflow params, so keep the value in "
            "the environment: write ${NAME} for launch.<stage>.env values and "
            "run.tracking.uri (expanded at run time), or leave run.tracking.uri unset and "
            "export MLFLOW_TRACKING_URI (or MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD)")


Overrides = list[str] | tuple[str, ...] | dict[str, Any]


def parse_overrides(overrides: Overrides | None) -> list[tuple[str, Any]]:
    """The one override syntax: ``KEY.PATH=VALUE`` (``train.lr=1e-4``,
    ``run.stages=[prepare,gate]``), the value read as YAML; a mapping is taken as parsed."""
    if isinstance(overrides, dict):
        return list(overrides.items())
    pairs = []
    for o in overrides or ():
        if "=" not in o:
            raise ConfigError(f"override {o!r}: write KEY.PATH=VALUE, e.g. train.lr=1e-4")
        k, v = o.split("=", 1)
        # "{run_dir}/x" is a placeholder string, not a YAML flow mapping
        pairs.append((k.strip(), v if _PLACEHOLDER.match(v.strip()) else yaml.safe_load(v)))
    return pairs


def apply_overrides(data: dict[str, Any], overrides: Overrides | None) -> dict[str, Any]:
    """``data`` with each override set at its dotted key path (missing levels created)."""
    data = copy.deepcopy(data)
    for key, value in parse_overrides(overrides):
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return data


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, mapping into mapping (a nested flag keeps its siblings)."""
    out = dict(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


#: The top-level keys that place a run: its directory, its launchers, its data and model.
PIPELINE_KEYS = frozenset({"run", "launch", "prepare"})


def is_pipeline_yaml(data: Any, stage: str | None = None) -> bool:
    """The one rule for "is this a pipeline YAML?".

    A pipeline YAML is a mapping with a top-level ``run``, ``launch`` or ``prepare`` key
    holding a mapping: what wiring needs (the run directory, prepare's outputs) or what only
    a pipeline has (launchers); for ``stage``, a file whose keys are all fields of that
    stage's config is that stage's own file however its keys are named. Anything else is a
    stage-only YAML: the stage's fields at the top, or under one section key (``train:``),
    used as written. Its paths are not wired, since it does not say where the run is.
    """
    if not isinstance(data, dict):
        return False
    if stage is not None and set(data) <= set(config_class(stage).model_fields):
        return False
    return any(k in PIPELINE_KEYS and isinstance(v, dict) for k, v in data.items())


@dataclass(frozen=True)
class StageInputs:
    """What a standalone stage run is given: its config, the run, its launcher (if set)."""

    config: StageConfig
    run: RunSection
    launch: LaunchConfig | None = None


def _section_key(key: str, stage: str, section: str, pipeline: bool) -> str:
    """An override's key in the file: in a pipeline YAML a bare ``steps`` is
    ``<section>.steps``; in a stage-only YAML ``train.steps`` and ``steps`` are both the
    stage's ``steps``."""
    head, _, rest = key.partition(".")
    if pipeline:
        return key if head in {*PIPELINE_KEYS, *STAGES, section} else f"{section}.{key}"
    return rest if head in (stage, section) and rest else key


def load_stage(stage: str, path: str | Path, *, section: str | None = None,
               overrides: Overrides | None = None, fields: dict[str, Any] | None = None,
               run_dir: str | None = None) -> StageInputs:
    """One stage's config for a standalone run (a stage command, a stage flow, a worker).

    ``path`` is a pipeline YAML (:func:`is_pipeline_yaml`): its ``section`` (default: the
    stage's name) is wired exactly as the pipeline would, and its ``run`` and
    ``launch.<stage>`` come along; only those are validated, so an unrelated broken section
    cannot block the run. Or it is a stage-only YAML, read as written with the default run
    section. ``overrides`` (``KEY.PATH=VALUE``, see :func:`_section_key` for the stage's own
    keys), then ``fields`` (command-line flags, nested per config) win over the file;
    ``run_dir`` over ``run.run_dir``. Secrets are refused before anything else sees them.
    """
    cls, section = config_class(stage), section or stage
    data = read_yaml(path)
    pipeline = is_pipeline_yaml(data, stage)
    keyed = [(_section_key(k, stage, section, pipeline), v)
             for k, v in parse_overrides(overrides)]
    where = f"{path} [{section}]"
    if not pipeline:
        nested = isinstance(data.get(section), dict) and section not in cls.model_fields
        body = merge(apply_overrides(data[section] if nested else data, dict(keyed)), fields or {})
        refuse_secrets(body, str(path))
        run = RunSection(run_dir=run_dir) if run_dir else RunSection()
        return StageInputs(cls.from_dict(body, where=where if nested else str(path)), run)
    data = apply_overrides(data, dict(keyed))
    if run_dir is not None:
        data["run"] = {**(data.get("run") or {}), "run_dir": str(run_dir)}
    refuse_secrets(data, str(path))
    data[stage] = merge(data.get(section) or {}, fields or {})
    wired = wire(data)
    launch = (wired.get("launch") or {}).get(stage)
    return StageInputs(
        cls.from_dict(wired[stage], where=where),
        RunSection.from_dict(wired.get("run") or {}, where=f"{path} [run]"),
        None if launch is None else LaunchConfig.from_dict(launch,
                                                           where=f"{path} [launch.{stage}]"))


def load_stage_config(stage: str, path: str | Path, run_dir: str | None = None,
                      overrides: Overrides | None = None, *, section: str | None = None,
                      fields: dict[str, Any] | None = None) -> StageConfig:
    """The stage config alone of :func:`load_stage`."""
    return load_stage(stage, path, section=section, overrides=overrides, fields=fields,
                      run_dir=run_dir).config
