"""PipelineConfig: wiring of paths between stages, overrides, strictness, launch rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmemb.configs.base import ConfigError
from mmemb.configs.pipeline import (
    STAGES,
    LaunchConfig,
    PipelineConfig,
    apply_overrides,
    config_class,
)

REPO = Path(__file__).resolve().parents[2]


def test_wiring_fills_paths_from_run_dir_and_prepare():
    c = PipelineConfig.from_dict({"run": {"run_dir": "R", "stages": ["prepare", "gate"]}})
    assert c.prepare.out == "R/data"
    assert c.prepare.model_out == "R/base_model"
    assert c.prepare.pairs_path == "R/data/pairs"
    # gate (landed) reads the stage-4 model, the selections and the eval rows of prepare
    assert c.gate.model == "R/train/student"
    assert c.gate.data == "R/select/selections"
    assert c.gate.eval == "R/data/eval"
    assert c.gate.image_root == "R/data"
    assert c.gate.out == "R/gate"


def test_explicit_values_win_and_run_dir_placeholder_is_replaced():
    c = PipelineConfig.from_dict({"run": {"run_dir": "R", "seed": 7, "stages": ["gate"]},
                                  "gate": {"model": "{run_dir}/other", "steps": 3}})
    assert c.gate.model == "R/other"
    assert c.gate.steps == 3
    assert c.gate.seed == 7  # run.seed is every stage's default seed
    assert c.prepare.seed == 7


def test_existing_source_wires_real_paths():
    c = PipelineConfig.from_dict({"run": {"run_dir": "R", "stages": ["gate"]}, "prepare": {
        "source": "existing", "model": "/ckpt/qwen", "pairs": "/data/train.parquet",
        "eval": "/data/eval", "image_root": "/data/images"}})
    assert c.gate.eval == "/data/eval"
    assert c.gate.image_root == "/data/images"
    # the student base is prepared once into the run dir (tokens added), then wired on
    assert c.prepare.model_path == "R/base_model"
    assert c.gate.model == "R/train/student"
    off = PipelineConfig.from_dict({"run": {"run_dir": "R", "stages": ["score", "train"]},
                                    "prepare": {
        "source": "existing", "model": "/ckpt/qwen", "pairs": "/p.parquet",
        "prepare_base": False}})
    assert off.prepare.model_path == off.score.model == off.train.model == "/ckpt/qwen"


def test_stage_not_in_run_stages_needs_no_section():
    c = PipelineConfig.from_dict({"run": {"run_dir": "R", "stages": ["prepare"]}})
    assert c.gate is None
    with pytest.raises(ConfigError, match="no 'gate' section"):
        c.section("gate")


def test_unknown_key_is_refused_with_the_known_keys():
    with pytest.raises(ConfigError) as e:
        PipelineConfig.from_dict({"run": {"run_dir": "R", "sed": 1}})
    assert "run.sed" in str(e.value) and "unknown key" in str(e.value)
    with pytest.raises(ConfigError, match="source='existing' needs"):
        PipelineConfig.from_dict({"prepare": {"source": "existing"}})


def test_overrides_are_yaml_typed_and_nested():
    d = apply_overrides({"gate": {"steps": 1}}, ["gate.steps=5", "run.stages=[prepare,gate]",
                                                  "gate.reward.lambda_cost=0.5"])
    assert d == {"gate": {"steps": 5, "reward": {"lambda_cost": 0.5}},
                 "run": {"stages": ["prepare", "gate"]}}
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        apply_overrides({}, ["gate.steps"])


def test_launch_rules_explain_the_fix():
    with pytest.raises(ValueError, match="hostfile"):
        LaunchConfig(launcher="deepspeed", nnodes=2)
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        LaunchConfig(launcher="torchrun", nnodes=2)
    with pytest.raises(ValueError, match="starts one process"):
        LaunchConfig(launcher="inprocess", nproc_per_node=2)
    assert LaunchConfig(launcher="torchrun", nnodes=2, rdzv_endpoint="n0:29400").nnodes == 2


@pytest.mark.parametrize("name", ["demo.yaml", "single_gpu.yaml", "cluster.yaml"])
def test_shipped_configs_load_and_say_their_command(name):
    path = REPO / "configs" / name
    head = path.read_text().splitlines()[:6]
    assert any("flows.cli run" in line or "mmemb run" in line for line in head), head
    c = PipelineConfig.load(path, run_dir="runs/x")
    assert c.run_dir == Path("runs/x")
    assert set(c.run.stages) <= set(STAGES)
    for s in c.run.stages:
        assert type(c.section(s)) is config_class(s), s
        out = c.section(s).out  # every section wires its output folder under the run dir
        assert out == f"runs/x/{s}" or (s == "prepare" and out == "runs/x/data"), (s, out)


def test_gate_anchor_takes_stage4_alpha_and_tau_unless_set():
    from mmemb.configs.pipeline import wire

    w = wire({"run": {"run_dir": "R"}, "train": {"alpha": 0.0, "tau": 0.05}, "gate": {}})
    assert w["gate"]["anchor_alpha"] == 0.0 and w["gate"]["anchor_tau"] == 0.05
    w = wire({"run": {"run_dir": "R"}, "train": {"alpha": 0.0}, "gate": {"anchor_alpha": 1.0}})
    assert w["gate"]["anchor_alpha"] == 1.0


def test_stage_yaml_loading_errors_name_the_file(tmp_path):
    from mmemb.configs.base import ConfigError
    from mmemb.configs.cli import parse_stage_args
    from mmemb.configs.pipeline import load_stage_config
    from mmemb.configs.select import SelectConfig

    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping of keys, got list"):
        load_stage_config("select", bad)
    stage_only = tmp_path / "sel.yaml"
    stage_only.write_text("pairs: P\nrationales: R\nscores: S\nmargin: 0.3\n")
    cfg = load_stage_config("select", stage_only, fields={"out": "O"})
    assert isinstance(cfg, SelectConfig)
    assert (cfg.margin, cfg.out, cfg.pairs) == (0.3, "O", "P")
    with pytest.raises(ConfigError, match="command line"):
        parse_stage_args("select", ["--pairs", "P", "--rationales", "R", "--scores", "S",
                                    "--margin", "x"])
