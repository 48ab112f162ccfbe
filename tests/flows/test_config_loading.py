"""One config path: one pipeline-file rule, one override syntax, generated stage CLIs."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmemb.configs.base import ConfigError
from mmemb.configs.cli import parse_stage_args, stage_parser
from mmemb.configs.pipeline import (
    CONFIG_CLASSES,
    STAGES,
    PipelineConfig,
    RunSection,
    StageName,
    is_pipeline_yaml,
    load_stage,
)

REPO = Path(__file__).resolve().parents[2]

#: A pipeline YAML without ``run:`` (the measured bug): prepare, a train section, launch.
NO_RUN = {"prepare": {"size": "smoke"}, "train": {"steps": 3},
          "launch": {"train": {"launcher": "subprocess", "retries": 4}}}


def _yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_stage_names_are_written_once():
    from typing import get_args

    import flows.cli
    from mmemb.configs.pipeline import RunSection

    assert STAGES == tuple(CONFIG_CLASSES) == get_args(StageName)
    assert not hasattr(flows.cli, "STAGE_NAMES")
    assert RunSection().stages == list(STAGES)
    for stage in STAGES:
        assert CONFIG_CLASSES[stage].__module__ == f"mmemb.configs.{stage}"


@pytest.mark.parametrize("data, pipeline", [
    (NO_RUN, True),
    ({"run": {"run_dir": "R"}}, True),
    ({"launch": {"train": {}}, "train": {"model": "M"}}, True),
    ({"model": "M", "data": "D", "steps": 2}, False),  # a stage-only file
    ({"train": {"model": "M", "data": "D"}}, False),  # a stage-only file under its section
    ({"run": "not a mapping"}, False),
    (["a"], False),
])
def test_one_rule_for_a_pipeline_yaml(data, pipeline):
    assert is_pipeline_yaml(data, "train") is pipeline


def test_pipeline_yaml_without_run_loads_through_every_stage_command(tmp_path):
    """Measured: ``python -m mmemb.stages.train`` wired it, ``mmemb stage train`` refused it,
    and the ``launch:`` section was dropped."""
    from flows.stage import resolve_stage_inputs
    from tasks.stages import load_stage_config

    path = _yaml(tmp_path / "p.yaml", NO_RUN)
    config, run, launch = resolve_stage_inputs("train", config_path=str(path))
    assert (config.steps, config.model, config.data) == (
        3, "runs/demo/base_model", "runs/demo/select/selections")
    assert run == RunSection()
    assert (launch.launcher, launch.retries) == ("subprocess", 4)
    assert load_stage_config("train", path) == config  # the launched worker's loader
    assert parse_stage_args("train", ["--config", str(path)]) == config  # the stage CLI


def test_set_with_the_section_prefix_works_on_a_stage_only_yaml(tmp_path):
    """Measured: ``--set train.steps=5`` on a stage-only YAML failed although the help gives
    that form; both it and the bare ``steps=5`` now set the stage's field."""
    path = _yaml(tmp_path / "s.yaml", {"model": "M", "data": "D", "steps": 2})
    assert load_stage("train", path, overrides=["train.steps=5"]).config.steps == 5
    assert load_stage("train", path, overrides=["steps=6"]).config.steps == 6
    assert load_stage("train", path, overrides=["lora.r=4"]).config.lora.r == 4
    pipe = _yaml(tmp_path / "p.yaml", NO_RUN)
    assert load_stage("train", pipe, overrides=["train.steps=7"]).config.steps == 7
    assert load_stage("train", pipe, overrides=["steps=8"]).config.steps == 8
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        load_stage("train", path, overrides=["steps"])


def test_mmemb_stage_and_eval_take_section_keys_on_a_stage_only_yaml(tmp_path):
    from flows.stage import resolve_stage_inputs

    path = _yaml(tmp_path / "ev.yaml", {"model": "M", "eval": "E"})
    config, _, _ = resolve_stage_inputs("evaluate", config_path=str(path),
                                        overrides=["evaluate.modes=[direct]", "budget=8"])
    assert (config.modes, config.budget, config.model) == (["direct"], 8, "M")


def test_standalone_run_dir_and_section_of_a_pipeline_yaml(tmp_path):
    data = {**NO_RUN, "train_lora": {"steps": 9, "lora": {"r": 2}}}
    path = _yaml(tmp_path / "p.yaml", data)
    inputs = load_stage("train", path, section="train_lora", run_dir="R")
    assert (inputs.config.steps, inputs.config.lora.r, inputs.config.out) == (9, 2, "R/train")
    assert inputs.run.run_dir == "R"


def test_secrets_are_refused_by_the_stage_loader(tmp_path):
    path = _yaml(tmp_path / "p.yaml", {**NO_RUN, "run": {"tracking": {
        "uri": "postgresql://u:hunter2@db/mlflow"}}})
    with pytest.raises(ConfigError, match="holds a secret") as e:
        load_stage("train", path)
    assert "hunter2" not in str(e.value)


def test_base_config_does_not_import_the_pipeline():
    src = (REPO / "mmemb" / "configs" / "base.py").read_text()
    assert "configs.pipeline" not in src.replace("mmemb.configs.pipeline.load_stage", "")


def _flags(help_text: str) -> set[str]:
    return set(re.findall(r"--[\w-]+(?:\.[\w-]+)*", help_text))


@pytest.mark.parametrize("stage", STAGES)
def test_stage_help_lists_every_field_of_its_config(stage):
    ap, _ = stage_parser(stage)
    text = ap.format_help()
    flags = _flags(text)
    cls = CONFIG_CLASSES[stage]
    for name, field in cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        assert flag in flags or any(f.startswith(flag + ".") for f in flags), (stage, name)
        assert field.description, f"{cls.__name__}.{name} has no description"
    # ... and nothing else: the fields, their nested fields and the shared options
    shared = {"--help", "--config", "--section", "--set", "--no-"}
    for f in flags - shared:
        top = f.removeprefix("--no-").removeprefix("--").split(".")[0].replace("-", "_")
        assert top in cls.model_fields, (stage, f)
    first_field = next(iter(cls.model_fields.values()))
    words = " ".join(first_field.description.split()[:3])
    assert words in " ".join(text.split()), (stage, words)


def test_every_stage_main_is_the_generated_one():
    for stage in STAGES:
        module = importlib.import_module(f"mmemb.stages.{stage}")
        src = Path(module.__file__).read_text()
        assert "argparse.ArgumentParser(" not in src, stage
        assert f'stage_main("{stage}"' in src, stage


def test_a_flag_overrides_the_yaml_value(tmp_path):
    path = _yaml(tmp_path / "g.yaml", {**NO_RUN, "gate": {"steps": 3, "budget": 16}})
    cfg = parse_stage_args("gate", ["--config", str(path), "--steps", "5", "--reward.w-hit",
                                    "2", "--set", "gate.budget=8", "--set", "gate.steps=4"])
    assert (cfg.steps, cfg.budget, cfg.reward.w_hit, cfg.model) == (
        5, 8, 2.0, "runs/demo/train/student")
    ev = parse_stage_args("evaluate", ["--model", "M", "--eval", "E", "--modes",
                                       "direct,reason", "--skip-missing", "--corpus", "null"])
    assert (ev.modes, ev.skip_missing, ev.corpus) == (["direct", "reason"], True, None)


def test_stage_section_defaults_to_the_stage_name_everywhere():
    for stage in STAGES:
        ap, _ = stage_parser(stage)
        assert ap.parse_args([]).section == stage


def test_generate_teacher_shorthands_use_the_config_defaults():
    from mmemb.configs.generate import SamplingConfig, TeacherConfig
    from mmemb.stages import generate

    cfg = parse_stage_args("generate", ["--pairs", "P", "--model", "M", "--oracle-k", "3"],
                           shorthands=generate._teacher_flags)
    vllm, oracle = cfg.teachers
    assert (vllm.backend, vllm.model) == ("vllm", "M")
    assert vllm.k == TeacherConfig.model_fields["k"].default
    assert vllm.sampling.max_tokens == SamplingConfig().max_tokens
    assert (oracle.backend, oracle.k) == ("oracle", 3)


def test_train_pairs_flag_is_a_direct_only_run(tmp_path):
    from mmemb.stages import train

    path = _yaml(tmp_path / "p.yaml", NO_RUN)
    cfg = parse_stage_args("train", ["--config", str(path), "--pairs", "P"],
                           shorthands=train._direct_only)
    assert (cfg.data, cfg.pairs) == (None, "P")


def test_stage_help_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "mmemb.stages.select", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "--max-rationale-tokens" in out and "over-long filter" in out
    assert "--config" in out and "--section" in out and "--set" in out


def test_pipeline_config_has_no_placeholder_sections():
    import mmemb.configs.pipeline as pipeline

    assert not hasattr(pipeline, "PendingSection")
    assert not hasattr(PipelineConfig, "available")
    for stage in STAGES[1:]:
        assert PipelineConfig.model_fields[stage].annotation == (CONFIG_CLASSES[stage] | None)


def test_mmemb_stage_passes_the_launch_of_a_pipeline_yaml_without_run(tmp_path, monkeypatch):
    """``mmemb stage train`` (flows/cli.py) on the measured file: accepted, launch kept."""
    from contextlib import nullcontext

    import flows.stage
    import flows.startup
    from flows.cli import main

    seen = {}

    def fake_flow(**kw):
        seen.update(kw)
        return {"stage": "train", "status": "ran", "summary": "stub"}

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))  # main() would set one
    monkeypatch.setattr(flows.startup, "prefect_startup", lambda *a, **k: nullcontext())
    monkeypatch.setattr(flows.stage, "make_stage_flow", lambda stage: fake_flow)
    path = _yaml(tmp_path / "p.yaml", NO_RUN)
    assert main(["stage", "train", str(path), "--set", "train.steps=5"]) == 0
    assert (seen["config"].steps, seen["config"].data) == (5, "runs/demo/select/selections")
    assert (seen["launch"].launcher, seen["launch"].retries) == ("subprocess", 4)
    stage_only = _yaml(tmp_path / "s.yaml", {"model": "M", "data": "D"})
    assert main(["stage", "train", str(stage_only), "--set", "train.steps=6"]) == 0
    assert seen["config"].steps == 6 and seen["launch"] is None
