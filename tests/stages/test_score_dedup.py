"""Stage 2 embeds each distinct input once (the vectors store), its shard process travels
to another process (pickle), and a query's image is decoded once for all its prompts."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from data_contracts import io
from data_contracts.schemas import PAIRS, RATIONALES, SCORES, VECTORS
from data_contracts.vectors import matrix
from mmemb.configs.generate import GenerateConfig
from mmemb.configs.score import ScoreConfig
from mmemb.model import images as images_mod
from mmemb.model.embedder import Embedder
from mmemb.model.prompts import EmbedInput
from mmemb.stages import generate, score


@pytest.fixture(scope="module")
def dup(synth, tmp_path_factory) -> dict:
    """3 pairs per task, oracle K=3, each pair's candidate 2 a copy of its candidate 0."""
    root = tmp_path_factory.mktemp("dedup")
    pairs = [p for p in io.read(synth["pairs"], PAIRS).to_pylist()
             if int(p["pair_id"].rsplit("-", 1)[1]) < 3]
    pairs_uri = io.write(pairs, root / "pairs", PAIRS).uri
    res = generate.run(GenerateConfig.from_dict({
        "pairs": pairs_uri, "image_root": str(synth["image_root"]), "out": str(root / "gen"),
        "teachers": [{"id": "oracle", "backend": "oracle", "k": 3}]}))
    rows = io.read(res.outputs["rationales"].uri, RATIONALES).to_pylist()
    first = {r["pair_id"]: r for r in rows if r["cand_idx"] == 0}
    for r in rows:
        if r["cand_idx"] == 2:
            r.update(text=first[r["pair_id"]]["text"], n_tokens=first[r["pair_id"]]["n_tokens"],
                     status="ok", finish_reason="stop")
    return {"pairs": pairs_uri, "rationales": io.write(rows, root / "rat", RATIONALES).uri,
            "image_root": str(synth["image_root"]), "n_pairs": len(pairs)}


def test_each_distinct_input_is_embedded_once(tiny_model, dup, tmp_path, monkeypatch):
    kw = {k: v for k, v in dup.items() if k != "n_pairs"}
    cfg = ScoreConfig(**kw, model=str(tiny_model), out=str(tmp_path / "s"), pool_size=4,
                      shard_size=6, progress=False, torch_threads=1)
    embedded: list[EmbedInput] = []
    real = score.embed_sorted

    def record(emb, inputs, *a, **k):
        embedded.extend(inputs)
        return real(emb, inputs, *a, **k)

    monkeypatch.setattr(score, "embed_sorted", record)
    res = score.run(cfg)
    keys = [(x.instruction, x.text, tuple(x.images), x.rationale) for x in embedded]
    assert len(keys) == len(set(keys)) == res.metrics["inputs_embedded"]
    n = dup["n_pairs"]
    # needed: 1 direct + 3 (q, r) per pair + distinct targets; a third of the (q, r) repeat
    assert res.metrics["inputs_needed"] - res.metrics["inputs_embedded"] >= n
    vectors = io.read(tmp_path / "s" / "vectors", VECTORS)
    assert vectors.num_rows == len(keys) and set(vectors.column("status").to_pylist()) == {"ok"}
    assert matrix(vectors.column("vector")).shape == (len(keys), 64)
    rows = io.read(res.outputs["scores"].uri, SCORES).to_pylist()
    assert len(rows) == 3 * n and all(r["status"] == "ok" for r in rows)
    by = {(r["pair_id"], r["cand_idx"]): r for r in rows}
    for pid in {r["pair_id"] for r in rows}:
        a, b = dict(by[(pid, 0)]), dict(by[(pid, 2)])
        a.pop("cand_idx"), b.pop("cand_idx")
        assert a == b  # the copy is scored from the same vector


def test_embed_shard_pickles_without_its_model(tiny_model, dup, tmp_path):
    """What run_sharded ships to a worker: the config, never the loaded embedder; the
    copy loads its own and writes the same rows."""
    kw = {k: v for k, v in dup.items() if k != "n_pairs"}
    cfg = ScoreConfig(**kw, model=str(tiny_model), out=str(tmp_path / "s"), pool_size=4,
                      progress=False, torch_threads=1)
    plan = score.plan_inputs(score.load_score_inputs(cfg), 6)
    items = plan.shards[0][1][:6]
    proc = score.EmbedShard(cfg)
    first = proc("00000", items)
    assert proc.emb is not None
    blob = pickle.dumps(proc)
    assert len(blob) < 10_000  # no weights inside
    copy = pickle.loads(blob)
    assert copy.emb is None
    again = copy("00000", items)
    assert again.column("key").to_pylist() == first.column("key").to_pylist()
    np.testing.assert_allclose(matrix(again.column("vector")), matrix(first.column("vector")),
                               atol=1e-6)


def test_a_query_image_is_decoded_once_for_all_its_prompts(tiny_model, synth, monkeypatch):
    emb = Embedder.from_pretrained(tiny_model)
    decodes = []
    real = images_mod.open_image

    def counting(path, **k):
        decodes.append(str(path))
        return real(path, **k)

    monkeypatch.setattr(images_mod, "open_image", counting)
    img = str(synth["image_root"] / "images/train/syn_qa_count/00000.png")
    q = EmbedInput("how many circles?", "<|image_1|> Answer the question.", [img])
    direct = emb.encode([q]).embeddings
    reasoned = emb.encode([EmbedInput(q.text, q.instruction, q.images, r)
                           for r in ("two red", "three blue", "none")], mode="reason")
    assert decodes == [img]  # 4 prompts, 1 decode and resize
    assert emb.image_cache.hits == 3 and emb.image_cache.misses == 1
    emb.image_cache.max_items = 0  # no cache: the same numbers, a decode per prompt
    emb.image_cache.clear()
    assert emb.encode([q]).embeddings.tolist() == direct.tolist()
    again = emb.encode([EmbedInput(q.text, q.instruction, q.images, r)
                        for r in ("two red", "three blue", "none")], mode="reason")
    assert again.embeddings.tolist() == reasoned.embeddings.tolist()
    assert len(decodes) == 5
    emb.image_cache.max_items = 8  # another resolution or a changed file is another entry
    emb.encode([q])
    emb.max_pixels //= 2
    emb.encode([q])
    st = os.stat(img)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:
        emb.encode([q])
    finally:
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert len(decodes) == 8 and len(emb.image_cache) == 3
