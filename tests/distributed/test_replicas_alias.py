"""``launch.<stage>.launcher: replicas`` is a thin alias of ``distributed.backend: ray``."""

from __future__ import annotations

import pytest

import tasks.launch as launch_mod
from mmemb.configs.base import ConfigError
from mmemb.configs.generate import GenerateConfig
from mmemb.configs.pipeline import LaunchConfig
from mmemb.configs.select import SelectConfig


def test_replicas_launcher_runs_one_process_with_a_ray_pool(monkeypatch, tmp_path):
    seen = {}

    def fake_launch(launch_cfg, stage, cfg, state_dir, env=None):
        seen.update(launcher=launch_cfg.launcher, nproc=launch_cfg.nproc_per_node, cfg=cfg)
        return "result", 0

    monkeypatch.setattr(launch_mod, "launch", fake_launch)
    cfg = GenerateConfig(pairs="p", teachers=[{"id": "o", "backend": "oracle"}])
    lc = LaunchConfig(launcher="replicas", nproc_per_node=2, gpus_per_replica=4)
    assert launch_mod.launch_replicas(lc, "generate", cfg, tmp_path) == ("result", 0)
    assert seen["launcher"] == "subprocess" and seen["nproc"] == 1
    d = seen["cfg"].distributed
    assert (d.backend, d.address, d.actors, d.gpus_per_actor) == ("ray", None, 2, 4.0)
    assert seen["cfg"].digest_view() == cfg.digest_view()  # the same cache key
    lc0 = LaunchConfig(launcher="replicas", nproc_per_node=3, gpus_per_replica=0)
    launch_mod.launch_replicas(lc0, "generate", cfg, tmp_path)
    assert seen["cfg"].distributed.gpus_per_actor is None  # 0: the stage's default


def test_replicas_launcher_refuses_a_stage_without_distributed_settings(tmp_path):
    cfg = SelectConfig(pairs="p", rationales="r", scores="s")
    with pytest.raises(ConfigError, match="no distributed settings"):
        launch_mod.launch_replicas(LaunchConfig(launcher="replicas"), "select", cfg, tmp_path)


def test_replicas_launcher_is_one_node_and_says_what_spans_nodes():
    with pytest.raises(ValueError, match="address: auto"):
        LaunchConfig(launcher="replicas", nnodes=2)
