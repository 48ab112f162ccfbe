"""Every stage's command line, generated from its pydantic config by pydantic-settings.

``python -m mmemb.stages.X --help`` lists exactly the fields of X's config class (a nested
config's fields as ``--reward.lambda-cost``), each with its description and default, plus
the options every stage command shares:

    --config FILE    a pipeline YAML (its section, wired as the pipeline would) or a
                     stage-only YAML (see mmemb.configs.pipeline.is_pipeline_yaml)
    --section NAME   the section of the YAML to read (default: the stage's name)
    --set K.P=VALUE  an override in the pipeline's one syntax (repeatable, YAML values); in
                     a stage-only YAML ``train.steps=5`` and ``steps=5`` are the same

Field flags win over ``--set``, which wins over the file; without ``--config`` the flags and
overrides are the whole config. Lists are ``--modes direct,reason`` (or repeated, or JSON),
booleans ``--resume`` / ``--no-resume``, None is ``null``. Reading the fields from the
config class keeps the command line from drifting from what the pipeline validates.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from pydantic_settings import CliSettingsSource

from mmemb.configs.base import StageConfig
from mmemb.configs.pipeline import apply_overrides, config_class, load_stage, merge

#: A stage's own flags beyond its fields: adds them to the parser and returns the function
#: that turns their parsed values into field values (``(extra, fields) -> fields``).
Shorthands = Callable[[argparse.ArgumentParser], Callable[[dict, dict], dict]]

_SHARED = ("config", "section", "set", "local_rank")


def stage_parser(stage: str, description: str | None = None
                 ) -> tuple[argparse.ArgumentParser, CliSettingsSource]:
    """The parser of ``python -m mmemb.stages.<stage>`` and the source reading its fields."""
    ap = argparse.ArgumentParser(prog=f"python -m mmemb.stages.{stage}",
                                 description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="(required): the config needs the value, from its "
                                 "flag or from --config. Flags win over --set, --set over "
                                 "the file; lists: a,b; None: null.")
    ap.add_argument("--config", metavar="FILE", help="a pipeline YAML (its --section is used, "
                    "with the paths the pipeline wires) or a YAML of this stage's settings")
    ap.add_argument("--section", default=stage, metavar="NAME",
                    help=f"section of the YAML to read (default: {stage})")
    ap.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help=f"override a config value (YAML syntax, repeatable), e.g. --set "
                    f"{stage}.seed=1; flags below win over it")
    # torch.distributed / DeepSpeed launchers pass the rank's local index
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    src = CliSettingsSource(config_class(stage), root_parser=ap, cli_kebab_case=True,
                            cli_implicit_flags=True, cli_hide_none_type=True,
                            cli_avoid_json=True, cli_parse_none_str="null")
    return ap, src


def parse_stage_args(stage: str, argv: list[str] | None = None,
                     description: str | None = None,
                     shorthands: Shorthands | None = None) -> StageConfig:
    """The stage's config from its command line (``--config``, ``--set``, field flags)."""
    ap, src = stage_parser(stage, description)
    before = {a.dest for a in ap._actions}  # noqa: SLF001 - argparse has no public list
    expand = shorthands(ap) if shorthands else None
    added = {a.dest for a in ap._actions} - before  # noqa: SLF001
    parsed = vars(ap.parse_args(sys.argv[1:] if argv is None else argv))
    shared = {k: parsed.pop(k) for k in _SHARED}
    extra = {k: parsed.pop(k) for k in added if k in parsed}
    fields: dict[str, Any] = src(parsed_args=parsed)()
    if expand is not None:
        fields = expand(extra, fields)
    if shared["config"]:
        return load_stage(stage, shared["config"], section=shared["section"],
                          overrides=shared["set"], fields=fields).config
    prefix = f"{stage}."
    sets = [s.removeprefix(prefix) for s in shared["set"]]
    return config_class(stage).from_dict(merge(apply_overrides({}, sets), fields),
                                         where="command line")


def stage_main(stage: str, run: Callable[[StageConfig], Any], argv: list[str] | None = None,
               shorthands: Shorthands | None = None) -> Any:
    """Parse the command line, run the stage, print its result as JSON (rank 0 only, when
    a launcher started several ranks)."""
    doc = sys.modules[run.__module__].__doc__ or ""
    cfg = parse_stage_args(stage, argv, doc.split("\n\n")[0], shorthands)
    res = run(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(res.to_dict(), indent=2, default=str))
    return res
