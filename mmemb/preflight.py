"""The preflight: what can be checked in seconds, checked before any stage starts.

A pipeline run that fails in stage 4 because stage 1's image folder was mistyped has cost
an engine start, a generation pass and a scoring pass; one that fails on the first of five
mistakes is restarted five times. So ``mmemb run`` first checks, for every stage it will
run, what needs no compute, and refuses with *one* message that lists every problem, each
with the config key to change (:class:`PreflightError`):

* **models**: every checkpoint a stage reads and no earlier stage of this run writes (the
  prepare source, the teachers', a stage's ``model`` when its producer is not in the run)
  exists, or is a hub id in the local HF cache (``HF_HUB_OFFLINE=1``), has weights, and its
  ``config.json``, tokenizer and processor load;
* **the method's tokens**: the student base has ``<think>``, ``</think>``, ``<emb>``, or
  the prepare stage of this run writes a base that has them;
* **input contracts**: pairs, eval rows and the other artifacts a stage reads have the
  contract's columns (manifests and Parquet footers only, never the rows); image roots are
  folders;
* **the teacher prompt budget**: the worst-case image at the run's resolution plus the
  template's text plus ``sampling.max_tokens`` fits ``max_model_len`` (per-row overruns are
  the generate stage's business at run time);
* **output folders** are writable (a probe file in the nearest existing parent).

Paths that an earlier stage of this run writes are not checked: they do not exist yet.
No Prefect, MLflow, vLLM or DeepSpeed here and no model is built; transformers only loads
configs, tokenizers and processors (about a second for a real Qwen tokenizer, after
transformers' own first-use imports).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmemb.configs.base import ConfigError
from mmemb.configs.pipeline import OUTPUT_FIELDS, STAGES, WIRING

#: Stages whose ``model`` is trained with the method's tokens: a base without them there is
#: the student base the prepare stage should have written (evaluate may read a raw base on
#: purpose, as a baseline).
TOKEN_STAGES = ("score", "train", "gate")
#: Input field -> the contracts its artifact may hold (the first is the one a plain Parquet
#: file is checked against).
FIELD_CONTRACTS = {"pairs": ("pairs",), "eval": ("eval_rows",), "rationales": ("rationales",),
                   "scores": ("scores",), "data": ("selections", "pairs"),
                   "corpus": ("eval_corpus",)}
#: Inputs that may also be a plain folder the stage reads by its layout (an MMEB-V2 download).
LAYOUT_FOLDERS = frozenset({"eval"})
#: The placeholder a chat template writes once per image (expanded to the image's tokens).
IMAGE_PAD = "<|image_pad|>"
#: prepare's settings that its outputs are wired from: stage field -> prepare key.
PREPARE_SOURCES = {"pairs": "pairs", "eval": "eval", "image_root": "image_root",
                   "model": "model"}


@dataclass(frozen=True)
class Problem:
    """One thing that would fail later: the stage it concerns, what is wrong, the fix."""

    stage: str
    what: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.stage}] {self.what}\n     fix: {self.fix}"


class PreflightError(ConfigError):
    """Every problem the preflight found, numbered, in one message."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        n = len(self.problems)
        lines = [f"preflight found {n} problem{'s' * (n != 1)}; no stage was started:"]
        lines += [f"  {i}. {p}" for i, p in enumerate(self.problems, 1)]
        lines.append("Fix them and rerun (--skip-preflight runs without these checks).")
        super().__init__("\n".join(lines))


def check(config, stages: Iterable[str]) -> None:
    """Raise :class:`PreflightError` when :func:`preflight` finds anything."""
    problems = preflight(config, stages)
    if problems:
        raise PreflightError(problems)


def preflight(config, stages: Iterable[str]) -> list[Problem]:
    """The problems of running ``stages`` (names, e.g. from ``flows.pipeline.plan``) of a
    :class:`~mmemb.configs.pipeline.PipelineConfig`; empty when nothing was found."""
    return _Preflight(config, stages).run()


# --------------------------------------------------------------------------- helpers

def _abs(path: str | Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _keys(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


def looks_like_hub_id(value: str) -> bool:
    """``org/name``: one slash, not absolute, not relative-looking (``./x``, ``~/x``)."""
    return (value.count("/") == 1 and not value.startswith(("/", ".", "~"))
            and all(part and not part.startswith(".") for part in value.split("/")))


def writable_probe(path: str | Path) -> tuple[Path, str | None]:
    """(nearest existing folder of ``path``, None or why nothing can be written there).

    Creates and removes a probe file there, as the stage will: permission bits alone
    miss ACLs and read-only mounts. ``path`` itself, when it exists, must be a folder."""
    p = _abs(path)
    if p.exists() and not p.is_dir():
        return p, "exists and is not a folder"
    base = p
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        return base, f"{base} is a file, so no folder can be made under it"
    try:
        fd, name = tempfile.mkstemp(prefix=".mmemb-preflight-", dir=base)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        return base, f"cannot write in {base} ({e.strerror or e})"
    return base, None


class _Model:
    """What loading a checkpoint gave: its processor (None when it did not load)."""

    def __init__(self, processor: Any = None):
        self.processor = processor

    @property
    def ok(self) -> bool:
        return self.processor is not None

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)


@dataclass
class _Use:
    """One path and every config key that names it: checked once, reported once."""

    stage: str
    path: str
    keys: list[str]

    def add_key(self, key: str) -> None:
        if key not in self.keys:
            self.keys.append(key)

    @property
    def fix_key(self) -> str:
        """The key to change: prepare's when the stages' values are wired from it."""
        return next((k for k in self.keys if k.startswith("prepare.")), self.keys[0])

    @property
    def names(self) -> str:
        return _keys([self.fix_key] + [k for k in self.keys if k != self.fix_key])


class _Preflight:
    def __init__(self, config, stages: Iterable[str]):
        self.cfg = config
        self.prep = config.prepare
        wanted = set(stages)
        self.stages = [s for s in STAGES if s in wanted]
        self.problems: list[Problem] = []
        self.models: dict[Path | str, _Use] = {}
        self.folders: dict[Path, _Use] = {}
        self.artifacts: dict[tuple[str, Path], _Use] = {}
        self.teachers: list[tuple[int, Any, str | None]] = []  # (index, config, stand-in)
        self.loaded: dict[Path | str, _Model] = {}

    def run(self) -> list[Problem]:
        """Every check, cheapest first, collecting problems instead of stopping at the
        first: a user fixes a config in one round, not one error per run."""
        self.outputs_writable()
        for stage in self.stages:
            if stage == "prepare":
                self.gather_prepare()
            else:
                self.gather_inputs(stage)
        if "generate" in self.stages:
            self.gather_teachers()
        for use in self.models.values():
            self.check_model(use)
        for use in self.folders.values():
            self.check_folder(use)
        for (field, _), use in self.artifacts.items():
            self.check_artifact(field, use)
        self.check_tokens()
        for i, t, stand_in in self.teachers:
            m = self.loaded.get(_model_key(stand_in))
            if m is not None and m.ok:
                self.check_budget(i, t, m)
        order = {s: i for i, s in enumerate(("run", *STAGES))}
        return sorted(self.problems, key=lambda p: order.get(p.stage, len(order)))

    def add(self, stage: str, what: str, fix: str) -> None:
        p = Problem(stage, what, fix)
        if p not in self.problems:
            self.problems.append(p)

    # ------------------------------------------------------------------ the run's outputs
    @property
    def prepare_writes_base(self) -> bool:
        """True when this run's prepare stage writes the student base (with the tokens)."""
        return "prepare" in self.stages and (self.prep.source == "tiny"
                                             or self.prep.prepare_base)

    def outputs_of(self, stage: str) -> list[Path]:
        """Folders ``stage`` writes (whether or not it runs)."""
        if stage == "prepare":
            if self.prep.source == "tiny":
                return [_abs(self.prep.out), _abs(self.prep.model_out)]
            return [_abs(self.prep.model_out)] if self.prep.prepare_base else []
        out = getattr(getattr(self.cfg, stage, None), "out", None)
        return [_abs(out)] if isinstance(out, str) else []

    def produced(self, path: str, consumer: str) -> bool:
        """True when a stage of this run before ``consumer`` writes ``path``."""
        p = _abs(path)
        for s in self.stages:
            if s == consumer:
                break
            if any(_inside(p, o) for o in self.outputs_of(s)):
                return True
        return False

    def producer(self, path: str, consumer: str) -> str | None:
        """The stage (in this run or not) whose output folder holds ``path``."""
        p = _abs(path)
        return next((s for s in STAGES if s != consumer
                     and any(_inside(p, o) for o in self.outputs_of(s))), None)

    def missing_fix(self, use: _Use, what: str) -> str:
        up = self.producer(use.path, use.stage)
        if up is not None:
            return (f"run the {up} stage first (it writes {use.path}): add it to run.stages "
                    f"or run `mmemb run CONFIG --only {up}`; or set {use.fix_key} to an "
                    f"existing {what}")
        return f"set {use.fix_key} to an existing {what}"

    def outputs_writable(self) -> None:
        """Each output folder the selected stages will write can be created and written,
        found before hours of upstream work rather than at the end."""
        outs: list[tuple[str, str, str]] = [("run", "run.run_dir", self.cfg.run.run_dir)]
        for s in self.stages:
            if s == "prepare":
                if self.prep.source == "tiny":
                    outs.append((s, "prepare.out", self.prep.out))
                if self.prep.source == "tiny" or self.prep.prepare_base:
                    outs.append((s, "prepare.model_out", self.prep.model_out))
                continue
            out = getattr(getattr(self.cfg, s), "out", None)
            if isinstance(out, str):
                outs.append((s, f"{s}.out", out))
        bad: dict[tuple[Path, str], list[tuple[str, str, str]]] = {}
        for stage, key, path in outs:
            base, why = writable_probe(path)
            if why is not None:
                bad.setdefault((base, why), []).append((stage, key, path))
        for (base, why), items in bad.items():
            keys = [k for _, k, _ in items]
            paths = ", ".join(dict.fromkeys(p for _, _, p in items))
            fix = (f"make {base} writable for this user (e.g. chmod u+w {base}) or set "
                   f"{_keys(keys)} to a writable place"
                   + (" (--run-dir)" if "run.run_dir" in keys else ""))
            self.add(items[0][0], f"output {_keys(keys)} ({paths}): {why}", fix)

    # ------------------------------------------------------------------ what is read
    def use(self, table: dict, key_: Any, stage: str, path: str, keys: list[str]) -> None:
        if key_ in table:
            for k in keys:
                table[key_].add_key(k)
        else:
            table[key_] = _Use(stage, path, list(dict.fromkeys(keys)))

    def wired_from_prepare(self, stage: str, field: str, value: str) -> str | None:
        """``prepare.<key>`` when a stage's value is the one wired from prepare's settings
        (change it there: every stage takes it unless its section sets its own)."""
        if self.prep.source != "existing" or field not in PREPARE_SOURCES:
            return None
        wired = {"pairs": self.prep.pairs_path, "eval": self.prep.eval_path,
                 "image_root": self.prep.image_root_path, "model": self.prep.model_path}
        if not wired.get(field) or _abs(wired[field]) != _abs(value):
            return None
        if field == "model" and self.prep.prepare_base:
            return None  # the prepared base: written by the prepare stage, not a setting
        return f"prepare.{PREPARE_SOURCES[field]}"

    def gather_prepare(self) -> None:
        if self.prep.source != "existing":
            return  # tiny: built under the run dir (checked writable above)
        self.use(self.models, _model_key(self.prep.model), "prepare", self.prep.model,
                 ["prepare.model"])
        self.use(self.artifacts, ("pairs", _abs(self.prep.pairs)), "prepare", self.prep.pairs,
                 ["prepare.pairs"])
        if self.prep.eval:
            self.use(self.artifacts, ("eval", _abs(self.prep.eval)), "prepare",
                     self.prep.eval, ["prepare.eval"])
        if self.prep.image_root:
            self.use(self.folders, _abs(self.prep.image_root), "prepare",
                     self.prep.image_root, ["prepare.image_root"])

    def gather_inputs(self, stage: str) -> None:
        """The stage's wired inputs (and an evaluate corpus) no earlier stage writes."""
        sec = getattr(self.cfg, stage)
        fields = [k for k in WIRING.get(stage, {}) if k not in OUTPUT_FIELDS] + ["corpus"]
        for field in dict.fromkeys(fields):
            value = getattr(sec, field, None)
            if not isinstance(value, str) or not value or self.produced(value, stage):
                continue
            keys = [f"{stage}.{field}"]
            src = self.wired_from_prepare(stage, field, value)
            if src:
                keys.insert(0, src)
            if field == "model":
                self.use(self.models, _model_key(value), stage, value, keys)
            elif field == "image_root":
                self.use(self.folders, _abs(value), stage, value, keys)
            elif field in FIELD_CONTRACTS:
                self.use(self.artifacts, (field, _abs(value)), stage, value, keys)

    def gather_teachers(self) -> None:
        for i, t in enumerate(self.cfg.generate.teachers):
            if not t.model:
                continue
            if not self.produced(t.model, "generate"):
                key = f"generate.teachers[{i}].model"
                self.use(self.models, _model_key(t.model), "generate", t.model, [key])
                stand_in = t.model
            elif self.prepare_writes_base and self.prep.source == "existing" and \
                    _abs(t.model) == _abs(self.prep.model_out):
                # the prepared base is its source plus three tokens: the same tokenizer
                # and processor, so the source stands in for the budget
                stand_in = self.prep.model
            else:
                stand_in = None  # built by this run (tiny): nothing to read yet
            if t.backend in ("vllm", "hf") and stand_in is not None:
                self.teachers.append((i, t, stand_in))

    # ------------------------------------------------------------------ models
    def check_model(self, use: _Use) -> None:
        """A checkpoint a stage reads: there (or cached), with weights, and it loads."""
        k = _model_key(use.path)
        where = f"model {use.path} ({use.names})"
        p = _abs(use.path)
        self.loaded[k] = _Model()
        if not p.exists():
            if looks_like_hub_id(use.path) and self.producer(use.path, use.stage) is None:
                if not _in_hf_cache(use.path):
                    self.add(use.stage, f"{where}: no such folder, and hub id {use.path!r} is "
                             "not in the local Hugging Face cache (HF_HUB_OFFLINE=1: nothing "
                             "is downloaded)",
                             f"download it once where there is network (`hf download "
                             f"{use.path}` into this HF_HOME), or set {use.fix_key} to a "
                             "checkpoint folder")
                    return
                self.loaded[k] = self.load(use, where)
                return
            self.add(use.stage, f"{where}: does not exist",
                     self.missing_fix(use, "checkpoint folder or cached hub id"))
            return
        if not p.is_dir():
            self.add(use.stage, f"{where}: a file, not a checkpoint folder",
                     f"set {use.fix_key} to the checkpoint folder (config.json, weights, "
                     "tokenizer)")
            return
        weights = sorted(p.glob("*.safetensors"))
        if not weights and not any(p.glob("*.bin")):
            self.add(use.stage, f"{where}: has no weights (*.safetensors, *.bin)",
                     f"finish the download or export, or set {use.fix_key} to a complete "
                     "checkpoint")
            return
        bad = _bad_weights(weights)
        if bad:
            self.add(use.stage, f"{where}: {bad}", f"re-download or re-export the checkpoint, "
                     f"or set {use.fix_key} to another one")
            return
        self.loaded[k] = self.load(use, where)

    def load(self, use: _Use, where: str) -> _Model:
        """config.json, then the processor (tokenizer included), as the stages load them."""
        from transformers import AutoConfig

        from mmemb.model.loading import load_processor, loadable_dir

        try:
            AutoConfig.from_pretrained(loadable_dir(use.path))
        except Exception as e:  # noqa: BLE001 - transformers raises many types
            self.add(use.stage, f"{where}: config.json does not load ({type(e).__name__}: "
                     f"{_short(e)})", f"fix or re-export the checkpoint, or set {use.fix_key} "
                     "to another one")
            return _Model()
        try:
            proc = load_processor(use.path)
        except Exception as e:  # noqa: BLE001
            self.add(use.stage, f"{where}: the tokenizer/processor does not load "
                     f"({type(e).__name__}: {_short(e)})", "add the tokenizer and "
                     f"preprocessor files, or set {use.fix_key} to a complete checkpoint")
            return _Model()
        return _Model(proc)

    def check_tokens(self) -> None:
        """The student base has the method's tokens, unless this run's prepare writes it."""
        if self.prepare_writes_base:
            return
        from mmemb.model.loading import missing_tokens

        by_model: dict[Path | str, _Use] = {}
        for stage in TOKEN_STAGES:
            value = getattr(getattr(self.cfg, stage, None), "model", None)
            if stage not in self.stages or not isinstance(value, str) or \
                    self.produced(value, stage):
                continue
            keys = [f"{stage}.model"]
            src = self.wired_from_prepare(stage, "model", value)
            self.use(by_model, _model_key(value), stage, value, ([src] if src else []) + keys)
        for k, use in by_model.items():
            m = self.loaded.get(k)
            if m is None or not m.ok:
                continue  # missing or not loadable: reported already
            missing = missing_tokens(m.tokenizer)
            if not missing:
                continue
            if self.prep.source == "existing" and not self.prep.prepare_base:
                how = ("set prepare.prepare_base: true and run the prepare stage "
                       "(prepare.source: existing), which writes the base with the tokens")
            else:
                how = ("run the prepare stage with prepare.source: existing (prepare_base: "
                       "true), which writes the base with the tokens")
            stages = [k.split(".")[0] for k in use.keys if not k.startswith("prepare.")]
            self.add(use.stage, f"base {use.path} lacks {missing}, the method's tokens, and no "
                     "prepare stage of this run adds them (the student base of "
                     f"{_keys(stages)})",
                     f"{how}; or point {_keys([k for k in use.keys if '.model' in k])} to a "
                     "prepared base")

    # ------------------------------------------------------------------ data
    def check_folder(self, use: _Use) -> None:
        p = _abs(use.path)
        if p.is_dir():
            return
        what = "does not exist" if not p.exists() else "is a file, not a folder"
        fix = f"set {use.fix_key} to the folder the image paths are relative to"
        if self.producer(use.path, use.stage):
            fix = self.missing_fix(use, "image folder")
        self.add(use.stage, f"image root {use.path} ({use.names}) {what}", fix)

    def check_artifact(self, field: str, use: _Use) -> None:
        """An input artifact: there, and its manifest and Parquet footers fit the contract."""
        from data_contracts import schemas

        names = FIELD_CONTRACTS[field]
        where = f"{use.names} = {use.path}"
        p = _abs(use.path)
        if not p.exists():
            self.add(use.stage, f"{where}: does not exist",
                     self.missing_fix(use, f"'{names[0]}' artifact folder or .parquet file"))
            return
        contracts = {c.name: c for c in vars(schemas).values()
                     if isinstance(c, schemas.Contract)}
        if not p.is_dir():
            self.columns(use, where, [p], contracts[names[0]])
            return
        mpath = p / "_manifest.json"
        if not mpath.is_file():
            if field not in LAYOUT_FOLDERS:  # else an MMEB-V2 download, read by its layout
                self.add(use.stage, f"{where}: a folder without _manifest.json (a writer was "
                         "interrupted, or it is not an artifact)",
                         self.missing_fix(use, f"'{names[0]}' artifact"))
            return
        try:
            m = json.loads(mpath.read_text())
        except (OSError, ValueError) as e:
            self.add(use.stage, f"{where}: _manifest.json does not read ({_short(e)})",
                     f"rerun the stage that wrote it, or set {use.fix_key} to another "
                     "artifact")
            return
        if m.get("contract") not in names:
            self.add(use.stage, f"{where}: holds contract {m.get('contract')!r}, expected "
                     f"{' or '.join(repr(n) for n in names)}",
                     f"set {use.fix_key} to a '{names[0]}' artifact")
            return
        self.columns(use, where, [p / part["file"] for part in m.get("parts") or []],
                     contracts[m["contract"]])

    def columns(self, use: _Use, where: str, files: list[Path], contract) -> None:
        """The contract's columns and types, from the Parquet footers only."""
        import pyarrow.parquet as pq

        from data_contracts.io import ContractError, check_columns

        for f in files:
            try:
                schema = pq.read_schema(f)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types
                self.add(use.stage, f"{where}: {f.name} is not a readable Parquet file "
                         f"({type(e).__name__}: {_short(e)})",
                         f"regenerate it, or set {use.fix_key} to a '{contract.name}' "
                         "Parquet file or artifact folder")
                return
            try:
                check_columns(schema, contract, str(f))
            except ContractError as e:
                self.add(use.stage, f"{where}: {str(e).split(' Fix: ')[0]}",
                         f"{e.fix or 'rewrite it to the contract'} (contract "
                         f"'{contract.name}', data_contracts/schemas.py); or set "
                         f"{use.fix_key} to a file that fits it")
                return

    # ------------------------------------------------------------------ teacher budget
    def check_budget(self, i: int, t, m: _Model) -> None:
        """Worst-case image + template text + max_tokens within the engine's context."""
        import math
        from types import SimpleNamespace

        from mmemb.model.prompts import EmbedInput
        from mmemb.model.resolution import Grid
        from mmemb.teachers.base import PROMPT_TEMPLATES, GenRequest, PromptBudget

        grid = Grid.of(m.processor)
        max_px, min_px = getattr(t, "max_pixels", None), getattr(t, "min_pixels", None)
        hi = min(grid.max_pixels, max_px or grid.max_pixels)
        img = _square_tokens(hi, grid, max_px, min_px)
        # the prompt as the model teachers build and count it, through the same counter
        budget = PromptBudget(m.processor, t.max_model_len, max_px, min_px)
        side = math.isqrt(int(hi))
        text = 0
        for side_name in self.cfg.generate.sides:
            req = GenRequest("preflight", side_name, EmbedInput(images=["image"]))
            prompt = req.prompt(PROMPT_TEMPLATES[t.template_version(side_name)],
                                render=budget.render)
            worst = budget.count(prompt, [SimpleNamespace(size=(side, side))])
            text = max(text, worst - img)
        out = t.sampling.max_tokens
        need = img + text + out
        if need <= t.max_model_len:
            return
        key = f"generate.teachers[{i}]"
        room = t.max_model_len - text - out
        fixes = [f"raise {key}.max_model_len to {need} or more"]
        if room >= 1:
            unit = grid.factor ** 2
            px = room * unit
            while px > unit and _square_tokens(px, grid, px, min_px) > room:
                px -= unit
            if "max_pixels" in type(t).model_fields:
                fixes.insert(0, f"lower {key}.max_pixels (or run.resolution.max_pixels) to "
                             f"{px} or less")
            else:
                fixes.append(f"lower the teacher processor's max_pixels "
                             f"(preprocessor_config.json) to {px} or less")
        else:
            fixes.append(f"lower {key}.sampling.max_tokens (the text alone needs {text})")
        res = (f"max_pixels {hi}" if max_px and max_px <= grid.max_pixels
               else f"the processor's max_pixels {hi}")
        self.add("generate", f"teacher {t.id!r} ({t.model}): a prompt needs up to {need} "
                 f"tokens ({img} for one image at {res}, {text} of template text, {out} of "
                 f"sampling.max_tokens) but {key}.max_model_len is {t.max_model_len}",
                 ", or ".join(fixes))


def _model_key(path: str) -> Path | str:
    """One key per checkpoint: the absolute folder, or the hub id."""
    p = _abs(path)
    return path if not p.exists() and looks_like_hub_id(path) else p


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an invalid repo id
        return False


def _bad_weights(files: list[Path]) -> str | None:
    """The first ``*.safetensors`` whose header does not read (a truncated copy)."""
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="np") as h:
                h.keys()
        except Exception as e:  # noqa: BLE001 - safetensors raises its own type
            return f"{f.name} does not read ({_short(e)}): truncated or not safetensors"
    return None


def _square_tokens(pixels: int, grid, max_px: int | None, min_px: int | None) -> int:
    """Image tokens of a square image of ``pixels`` pixels: the most any image costs under
    these limits (every image is resized to at most ``max_pixels``)."""
    import math

    from mmemb.model.resolution import image_tokens

    side = max(1, math.isqrt(int(pixels)))
    return image_tokens(side, side, grid, max_px, min_px)


def _short(e: BaseException, n: int = 300) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= n else s[: n - 3] + "..."


__all__ = ["PreflightError", "Problem", "check", "preflight", "writable_probe"]
