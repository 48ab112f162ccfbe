"""The base of every stage config: strict pydantic models loaded from YAML.

Strict on purpose: an unknown key is almost always a typo (``lerning_rate``) that would
otherwise silently fall back to a default and cost a cluster run. Errors name the file,
the key path and what to write instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mmemb.model.images import DEFAULT_MAX_DECODE_PIXELS

T = TypeVar("T", bound="StageConfig")

#: What a field changes, declared on the field (``json_schema_extra={"effect": ...}``) and
#: read by every digest (the stage cache key, each stage's resume fingerprint):
#:   ``result`` (the default): what the stage computes;
#:   ``report``: only what it reports or where it writes (the eval set, the output folder,
#:     checkpoint cadence): part of the cache key, not of a resume fingerprint, so a run
#:     may continue across a change;
#:   ``none``: how it runs (threads, device, progress bars, batch size of a pure inference
#:     pass, the resume switch itself): in no digest.
Effect = Literal["result", "report", "none"]
EFFECT_KEY = "effect"


def runtime_field(default: Any = ..., **kw: Any) -> Any:
    """A ``Field`` that changes how a stage runs, never what it computes (effect ``none``):
    changing it neither recomputes the stage nor blocks resuming it."""
    return Field(default, json_schema_extra={EFFECT_KEY: "none"}, **kw)


def report_field(default: Any = ..., **kw: Any) -> Any:
    """A ``Field`` that changes what a stage reports or where it writes, not the state it
    computes (effect ``report``): the stage reruns, but may resume its partial work."""
    return Field(default, json_schema_extra={EFFECT_KEY: "report"}, **kw)


def field_effect(cls: type[BaseModel], name: str) -> Effect:
    """The declared effect of field ``name`` of config class ``cls``."""
    extra = cls.model_fields[name].json_schema_extra
    return (extra or {}).get(EFFECT_KEY, "result") if isinstance(extra, dict) else "result"


class ConfigError(ValueError):
    """A config file that cannot be used; the message says where and how to fix it."""


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file's mapping (an empty file is ``{}``); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
    return data


class StageConfig(BaseModel):
    """Common behaviour: forbid unknown keys, validate on assignment, YAML in and out.

    Floats are finite: ``.nan``/``.inf`` (YAML) or ``nan`` (an override) fail validation in
    every field of every section; ``lr=.inf`` would otherwise pass ``gt=0``, and a NaN
    ``margin`` compares false with everything.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @classmethod
    def from_yaml(cls: type[T], path: str | Path, section: str | None = None,
                  overrides: dict[str, Any] | None = None) -> T:
        """This class from a YAML mapping (or its ``section``) exactly as written: no
        wiring, no pipeline rule; a standalone stage run loads through
        :func:`mmemb.configs.pipeline.load_stage` instead."""
        data = read_yaml(path)
        if section is not None:
            data = data.get(section) or {}
        data = {**data, **(overrides or {})}
        return cls.from_dict(data, where=f"{path}" + (f" [{section}]" if section else ""))

    @classmethod
    def from_dict(cls: type[T], data: dict, where: str = "<config>") -> T:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, cls, where)) from None

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))

    def digest_view(self, purpose: Literal["cache", "resume"] = "cache") -> dict[str, Any]:
        """This config as JSON, keeping only the fields a digest for ``purpose`` covers.

        ``cache`` (the stage cache key) drops effect-``none`` fields; ``resume`` (may a
        partial output be continued?) keeps only effect-``result`` fields. Nested configs
        are filtered by their own declarations.
        """
        keep = {"cache": {"result", "report"}, "resume": {"result"}}[purpose]

        def view(obj: Any, dumped: Any) -> Any:  # dumped: obj.model_dump(mode="json")
            if isinstance(obj, BaseModel):
                return {k: view(getattr(obj, k), dumped[k]) for k in type(obj).model_fields
                        if field_effect(type(obj), k) in keep}
            if isinstance(obj, (list, tuple)):
                return [view(o, d) for o, d in zip(obj, dumped, strict=True)]
            if isinstance(obj, dict):
                return {k: view(obj[k], dumped[k]) for k in obj}
            return dumped

        return view(self, self.model_dump(mode="json"))

    def flat_params(self, prefix: str = "") -> dict[str, str]:
        """Flattened ``a.b.c -> value`` for experiment trackers (values stringified)."""
        out: dict[str, str] = {}

        def walk(obj, p):
            if isinstance(obj, dict):
                for k, v in obj.items():
                    walk(v, f"{p}.{k}" if p else k)
            elif isinstance(obj, list) and obj and isinstance(obj[0], dict):
                for i, v in enumerate(obj):
                    walk(v, f"{p}.{i}")
            else:
                out[p] = str(obj)

        walk(self.model_dump(mode="json"), prefix)
        return out


def _is_model(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _as_model(tp) -> type | None:
    """``tp`` itself, or the one config class of an optional/union type."""
    import typing

    if _is_model(tp):
        return tp
    ms = [a for a in typing.get_args(tp) if _is_model(a)]
    return ms[0] if len(ms) == 1 else None


def _child(tp, key):
    """The type of ``key`` inside ``tp``: a field of a config class, a member of a union
    (pydantic names the member it tried), an item of a list, a value of a dict."""
    import typing

    if _is_model(tp):
        f = tp.model_fields.get(key) if isinstance(key, str) else None
        return f.annotation if f is not None else None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, set, frozenset) and args:
        return args[0]
    if origin is tuple and args:
        return args[0] if len(args) == 2 and args[1] is Ellipsis else (
            args[key] if isinstance(key, int) and key < len(args) else None)
    if origin is dict and len(args) == 2:
        return args[1]
    named = [a for a in args if getattr(a, "__name__", None) == key]
    if named:
        return named[0]
    for a in args:  # Optional[X] / X | Y: the first member that has the key
        c = _child(a, key) if a is not type(None) else None
        if c is not None:
            return c
    return None


def _model_at(cls: type, loc: tuple) -> type | None:
    """The config class that holds the key at ``loc`` (its last element)."""
    tp = cls
    for key in loc[:-1]:
        tp = _child(tp, key)
        if tp is None:
            return None
    return _as_model(tp)


def format_validation_error(e: ValidationError, cls: type, where: str) -> str:
    lines = [f"{where}: invalid {cls.__name__}:"]
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            here = _model_at(cls, tuple(err["loc"])) or cls
            known = ", ".join(sorted(here.model_fields))
            msg = f"unknown key (a typo?). Known keys here: {known}"
        elif err["type"] == "missing":
            msg = "required key is missing; add it"
        lines.append(f"  - {loc}: {msg}" + (f" (got {err['input']!r})"
                                            if err["type"] not in ("missing", "extra_forbidden")
                                            and "input" in err else ""))
    return "\n".join(lines)


class ImageResolution(StageConfig):
    """The image resolution a stage embeds at: one setting per run (``run.resolution``,
    wired into every stage unless a section sets its own), shared by teacher, embedder and
    evaluation so each sees the same pixels (:mod:`mmemb.model.resolution`)."""

    max_pixels: int = Field(1024 * 1024, ge=28 * 28, description="images are resized onto "
                            "the processor grid within [min_pixels, max_pixels] (1 MP ~ 1,300 "
                            "image tokens on Qwen2-VL); the processor's own limits still apply")
    min_pixels: int | None = Field(None, ge=1, description="None: the processor's own minimum")
    max_decode_pixels: int | None = Field(
        DEFAULT_MAX_DECODE_PIXELS, ge=1, description="an image that would decode to more "
        "pixels is refused (a per-row error); JPEGs decode reduced first. None: no limit "
        "but PIL's own (179 MP)")
    allow_images_outside_root: bool = Field(
        False, description="read image paths that resolve outside image_root (absolute, "
        "'..', links out of it); off: such a row is refused, naming file, column and row")
