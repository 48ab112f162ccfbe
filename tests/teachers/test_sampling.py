"""Sampling is passed explicitly: a checkpoint's generation_config.json cannot override it.

Qwen2-VL's generation_config.json holds ``top_k: 1, top_p: 0.001, temperature: 0.01``; a
``generate`` call that leaves top_k out samples greedily, and K candidates are one.
"""

from __future__ import annotations

import pytest

from mmemb.configs.base import ConfigError
from mmemb.configs.generate import GenerateConfig, SamplingConfig, TeacherConfig
from mmemb.model.prompts import EmbedInput
from mmemb.teachers import PROMPT_TEMPLATES, GenRequest, make_teacher, start_engine, teacher_info
from mmemb.teachers.hf import generation_config

TEMPLATE = PROMPT_TEMPLATES["rationale-query-v1"]


def _cfg(model, **kw) -> TeacherConfig:
    sampling = {"temperature": 1.0, "max_tokens": 8, **kw.pop("sampling", {})}
    return TeacherConfig(id="hf", backend="hf", model=str(model), k=4, device="cpu",
                         batch_size=4, sampling=sampling, **kw)


@pytest.fixture(scope="module")
def qwen2_engine(real_layout):
    cfg = _cfg(real_layout("qwen2_vl"))
    return cfg, start_engine(cfg, 0)


def test_sampling_fields_are_validated():
    s = SamplingConfig()
    assert (s.top_k, s.min_p, s.repetition_penalty) == (0, 0.0, 1.0)
    for bad in ({"top_k": -1}, {"min_p": 1.5}, {"repetition_penalty": 0}):
        with pytest.raises(ConfigError):
            GenerateConfig.from_dict({"pairs": "p", "teachers": [
                {"id": "o", "backend": "oracle", "sampling": bad}]})


def test_every_sampling_value_is_recorded_per_row(tmp_path):
    cfg = _cfg(tmp_path, sampling={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1})
    s = teacher_info(cfg, 3).sampling
    assert s == {"n": 4, "temperature": 1.0, "top_p": 0.95, "top_k": 20, "min_p": 0.05,
                 "repetition_penalty": 1.1, "max_tokens": 8, "stop": [], "seed": 3,
                 "think_output": "answer"}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_the_checkpoints_generation_defaults_are_not_merged_back(real_layout, family):
    """transformers fills only the values a passed config leaves unset from the checkpoint:
    values equal to the library defaults (temperature 1, repetition_penalty 1) survive."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(real_layout(family))
    own = model.generation_config
    assert own.top_k in (1, 20) and own.temperature < 1  # the checkpoint's sampling defaults
    s = SamplingConfig(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0)
    eff, _ = model._prepare_generation_config(generation_config(s, 4, [151645], 151643))
    assert (eff.do_sample, eff.temperature, eff.top_p, eff.top_k, eff.min_p,
            eff.repetition_penalty, eff.num_return_sequences) == (True, 1.0, 1.0, 0, 0.0, 1.0, 4)
    # The old call (keyword arguments, top_k left out) took the checkpoint's top_k.
    old, _ = model._prepare_generation_config(None, do_sample=True, temperature=1.0,
                                              top_p=0.95)
    assert old.top_k == own.top_k


def test_k_samples_on_qwen2_vl_are_distinct(qwen2_engine):
    """With the checkpoint's top_k 1 merged in (the old code) all four were the same text."""
    cfg, engine = qwen2_engine
    teacher = make_teacher(cfg, 0, engine=engine, log=lambda *a: None)
    reqs = [GenRequest("p1", "query", EmbedInput(text="What does the chart show?"), None, 11),
            GenRequest("p2", "query", EmbedInput(text="Find the red car."), None, 12)]
    out = teacher.generate(reqs, TEMPLATE)
    for cands in out:
        texts = [c.text for c in cands]
        assert len(texts) == 4 and all(texts)
        assert len(set(texts)) == 4, texts
    assert out == teacher.generate(reqs, TEMPLATE)  # seeded: the same samples again


def test_greedy_gives_k_equal_samples(qwen2_engine):
    """temperature 0: one greedy decode repeated K times (transformers refuses K return
    sequences without sampling)."""
    cfg, engine = qwen2_engine
    teacher = make_teacher(cfg.model_copy(update={"sampling": SamplingConfig(
        temperature=0, max_tokens=6)}), 0, engine=engine, log=lambda *a: None)
    cands = teacher.generate([GenRequest("p", "query", EmbedInput(text="x"), None, 1)],
                             TEMPLATE)[0]
    assert len(cands) == 4 and len({c.text for c in cands}) == 1 and cands[0].text


@pytest.mark.vllm
def test_vllm_sampling_params_carry_every_field(real_layout):
    from mmemb.teachers.vllm import VLLMTeacher

    cfg = TeacherConfig(id="v", backend="vllm", model=str(real_layout("qwen2_vl")), k=3,
                        sampling={"temperature": 0.8, "top_p": 0.9, "top_k": 0, "min_p": 0.05,
                                  "repetition_penalty": 1.1, "max_tokens": 7, "stop": ["\n"]})
    teacher = VLLMTeacher(teacher_info(cfg, 0), cfg, llm=None)  # no engine: params only
    p = teacher._params(GenRequest("p", "query", EmbedInput(text="x"), None, 5))
    assert (p.n, p.seed, p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty,
            p.max_tokens, p.stop) == (3, 5, 0.8, 0.9, 0, 0.05, 1.1, 7, ["\n"])
