"""``embed_engine: vllm``: vLLM's pooling runner (LAST pooling at ``<emb>``) gives the
Embedder's vectors on text, image and reasoning prompts, and stage 2 run on it gives the
same rows and deltas as on the Embedder."""

from __future__ import annotations

import time

import pytest
import torch

from data_contracts import io
from data_contracts.schemas import PAIRS, RATIONALES, SCORES
from mmemb.model.embedder import Embedder
from mmemb.model.prompts import EmbedInput

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def engine(tiny_model):
    """One pooling engine on the tiny checkpoint for the module (start-up ~30 s on CPU)."""
    from mmemb.model.vllm_embedder import VLLMEmbedder

    emb = VLLMEmbedder.from_pretrained(tiny_model)
    yield emb
    emb.close()


def _inputs(synth) -> list[EmbedInput]:
    """Text only, an image with MMEB's slot marker, an image without one, a long text."""
    root = synth["image_root"]
    img0 = str(root / "images/train/syn_qa_count/00000.png")
    img1 = str(root / "images/train/syn_qa_count/00001.png")
    return [EmbedInput("a red circle"),
            EmbedInput("there are 3 red circles. how many?", "<|image_1|> Count.", [img0]),
            EmbedInput("what colour is it", "Represent the image", [img1]),
            EmbedInput(" ".join(f"word{i}" for i in range(200)), "Represent the text")]


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)  # [B]


def test_pooling_engine_equals_the_embedder(engine, tiny_model, synth):
    hf = Embedder.from_pretrained(tiny_model)
    xs = _inputs(synth)
    reasoned = [EmbedInput(x.text, x.instruction, x.images, rationale=f"step {i}: it is red, "
                           "so the answer is three") for i, x in enumerate(xs)]
    for mode, batch in (("direct", xs), ("reason", reasoned)):
        want = hf.encode(batch, batch_size=2, mode=mode)
        got = engine.encode(batch, batch_size=2, mode=mode)
        assert got.embeddings.shape == (len(batch), hf.hidden_size)
        assert got.embeddings.dtype == torch.float32
        assert float(_cos(got.embeddings, want.embeddings).min()) >= 0.99999, mode
        assert got.embeddings.norm(dim=-1).tolist() == pytest.approx([1.0] * len(batch),
                                                                      abs=1e-5)
        assert got.n_tokens.tolist() == want.n_tokens.tolist()  # same prompt, same images
    # the reasoning prompt is another vector than the direct one (the rationale is read;
    # behind 1,300 tokens of text a random tiny model hardly moves, so the short ones)
    d, r = engine.encode(xs[:3], mode="direct"), engine.encode(reasoned[:3], mode="reason")
    assert float(_cos(d.embeddings, r.embeddings).max()) < 0.9999
    assert engine.hidden_size == hf.hidden_size
    assert engine.encode([]).embeddings.shape == (0, hf.hidden_size)
    with pytest.raises(ValueError, match="needs a rationale"):  # the Embedder's own rule
        engine.embed(xs[:1], mode="reason")


@pytest.fixture(scope="module")
def small(synth, tmp_path_factory) -> dict:
    """3 pairs per task with oracle rationales (K=2), one failed row, one malformed one."""
    from mmemb.configs.generate import GenerateConfig
    from mmemb.stages import generate

    root = tmp_path_factory.mktemp("vllm-score")
    pairs = [p for p in io.read(synth["pairs"], PAIRS).to_pylist()
             if int(p["pair_id"].rsplit("-", 1)[1]) < 3]
    pairs_uri = io.write(pairs, root / "pairs", PAIRS).uri
    res = generate.run(GenerateConfig.from_dict({
        "pairs": pairs_uri, "image_root": str(synth["image_root"]), "out": str(root / "gen"),
        "teachers": [{"id": "oracle", "backend": "oracle", "k": 2}]}))
    rows = io.read(res.outputs["rationales"].uri, RATIONALES).to_pylist()
    rows[0].update(status="error", text=None, error="engine died")
    rows[3].update(text=rows[3]["text"] + " <|image_pad|>")
    return {"pairs": pairs_uri, "rationales": io.write(rows, root / "rationales", RATIONALES).uri,
            "image_root": str(synth["image_root"])}


def test_stage2_on_the_pooling_engine_equals_the_embedder(tiny_model, small, tmp_path):
    from mmemb.configs.score import ScoreConfig
    from mmemb.procs import descendants
    from mmemb.stages import score

    before = descendants()
    out = {}
    for engine_name in ("embedder", "vllm"):
        cfg = ScoreConfig(**small, model=str(tiny_model), out=str(tmp_path / engine_name),
                          pool_size=4, tau=0.1, shard_size=8, progress=False, torch_threads=1,
                          embed_engine=engine_name)
        res = score.run(cfg)
        rows = io.read(res.outputs["scores"].uri, SCORES).to_pylist()
        out[engine_name] = {(r["pair_id"], r["teacher_id"], r["cand_idx"]): r for r in rows}
    a, b = out["embedder"], out["vllm"]
    assert a.keys() == b.keys() and len(a) == 2 * len({k[0] for k in a})
    assert [a[k]["status"] for k in a] == [b[k]["status"] for k in a]
    ok = [k for k in a if a[k]["status"] == "ok"]
    assert len(ok) == len(a) - 2  # the failed and the malformed rationale are skipped
    for col, tol in (("delta", 1e-3), ("s_with", 1e-3), ("s_without", 1e-3),
                     ("cos_with", 1e-4), ("cos_without", 1e-4)):
        got = torch.tensor([b[k][col] for k in ok], dtype=torch.float64)
        want = torch.tensor([a[k][col] for k in ok], dtype=torch.float64)
        assert torch.allclose(got, want, atol=tol, rtol=0), col
    assert any(abs(a[k]["delta"]) > 1e-2 for k in ok)  # the deltas compared are not all ~0
    # The stage's engine did not outlive it: its processes end with the embedder.
    # (multiprocessing's resource tracker lives as long as this process, by design.)
    import gc

    import psutil

    def left() -> dict[int, str]:
        gc.collect()
        out = {}
        for pid in descendants() - before:
            try:
                out[pid] = " ".join(psutil.Process(pid).cmdline())[:120]
            except psutil.NoSuchProcess:
                continue
        return {p: c for p, c in out.items() if "resource_tracker" not in c}

    deadline = time.monotonic() + 60
    while left() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left()


def test_evaluate_direct_on_the_pooling_engine_equals_the_embedder(tiny_model, synth,
                                                                     tmp_path):
    from data_contracts.schemas import EVAL_RESULTS
    from mmemb.configs.evaluate import EvaluateConfig
    from mmemb.stages import evaluate

    scores = {}
    for engine_name in ("embedder", "vllm"):
        cfg = EvaluateConfig(model=str(tiny_model), eval=str(synth["eval"]),
                             image_root=str(synth["image_root"]), modes=["direct"],
                             max_queries=8, out=str(tmp_path / engine_name),
                             embed_engine=engine_name)
        res = evaluate.run(cfg)
        rows = io.read(res.outputs["results"].uri, EVAL_RESULTS).to_pylist()
        scores[engine_name] = {(r["task"], r["mode"]): (r["score"], r["status"]) for r in rows}
    assert scores["vllm"] == scores["embedder"] and len(scores["vllm"]) >= 2


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_pooling_engine_equals_the_embedder_on_a_real_layout(real_layout, family, synth,
                                                            tmp_path):
    """The hub folders' own tokenizer, chat template and processor (prepared: the method's
    tokens added), through both paths."""
    from mmemb.model.vllm_embedder import VLLMEmbedder
    from mmemb.stages.prepare import prepare_base

    base = prepare_base(real_layout(family), tmp_path / family)[0]
    xs = _inputs(synth)[:3]
    reasoned = [EmbedInput(x.text, x.instruction, x.images, rationale="it is red, so three")
                for x in xs]
    hf = Embedder.from_pretrained(base)
    want = [hf.encode(xs), hf.encode(reasoned, mode="reason")]
    del hf
    with VLLMEmbedder.from_pretrained(base) as engine:
        got = [engine.encode(xs), engine.encode(reasoned, mode="reason")]
    for g, w in zip(got, want, strict=True):
        assert float(_cos(g.embeddings, w.embeddings).min()) >= 0.99999
        assert g.n_tokens.tolist() == w.n_tokens.tolist()
