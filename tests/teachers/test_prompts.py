"""Teacher prompts are the teacher checkpoint's own chat template (real Qwen-VL layouts)."""

from __future__ import annotations

import pytest

from mmemb.configs.generate import TeacherConfig
from mmemb.model.loading import load_processor
from mmemb.model.prompts import EmbedInput, teacher_prompt
from mmemb.teachers import PROMPT_TEMPLATES, GenRequest, make_teacher, start_engine, teacher_info

TEMPLATE = PROMPT_TEMPLATES["rationale-query-v1"]


def _request(image) -> GenRequest:
    return GenRequest("p", "query", EmbedInput(
        text="What is the total?", instruction="<|image_1|> Represent the given document",
        images=[str(image)]), None, 1)


@pytest.fixture
def request_(tmp_path) -> GenRequest:
    from PIL import Image

    Image.new("RGB", (300, 400), (240, 240, 240)).save(tmp_path / "page.png")
    return _request(tmp_path / "page.png")

#: What the request means, written out as chat messages by hand.
MESSAGES = [{"role": "user", "content": [
    {"type": "text", "text": "Here is a query for a retrieval system.\n"},
    {"type": "image"},
    {"type": "text", "text": "Represent the given document\nWhat is the total?\nThink step by "
                             "step about what the matching target must contain, and write "
                             "that reasoning in one or two short sentences. Do not answer "
                             "with anything else."}]}]
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.mark.parametrize("family,head", [("qwen2_vl", SYSTEM + "<|im_start|>user\n"),
                                         ("qwen3_vl", "<|im_start|>user\n")])
def test_hf_teacher_prompt_is_the_checkpoints_chat_template(real_layout, request_, family,
                                                           head):
    path = real_layout(family)
    expected = load_processor(path).apply_chat_template(MESSAGES, tokenize=False,
                                                        add_generation_prompt=True)
    assert expected.startswith(head)  # Qwen3-VL's template has no system turn
    assert expected.endswith("<|im_end|>\n<|im_start|>assistant\n")
    cfg = TeacherConfig(id="hf", backend="hf", model=str(path), k=1, device="cpu")
    teacher = make_teacher(cfg, 0, engine=start_engine(cfg, 0, log=lambda *a: None))
    assert teacher.budget.measure(request_, TEMPLATE).prompt == expected


@pytest.mark.vllm
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_vllm_teacher_renders_with_its_own_processor(real_layout, request_, family):
    from mmemb.teachers.vllm import VLLMTeacher

    path = real_layout(family)
    expected = load_processor(path).apply_chat_template(MESSAGES, tokenize=False,
                                                        add_generation_prompt=True)
    cfg = TeacherConfig(id="v", backend="vllm", model=str(path), k=1)
    teacher = VLLMTeacher(teacher_info(cfg, 0), cfg, llm=None)  # templating needs no engine
    assert teacher.budget.measure(request_, TEMPLATE).prompt == expected


def test_the_oracle_and_renderless_callers_keep_the_plain_format():
    req = _request("page.png")
    plain = teacher_prompt(req.inp, TEMPLATE)
    assert req.prompt(TEMPLATE) == plain
    assert plain.startswith(SYSTEM) and "<|vision_start|><|image_pad|><|vision_end|>" in plain
