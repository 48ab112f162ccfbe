"""Stage 2 on Ray Data (local Ray, 2 actors): the same score rows and statuses as in this
process, the float columns allclose."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_contracts import io
from data_contracts.schemas import PAIRS, RATIONALES, SCORES, VECTORS
from data_contracts.vectors import matrix
from mmemb.configs.generate import GenerateConfig
from mmemb.configs.score import ScoreConfig
from mmemb.sharding import RUN_FILE
from mmemb.stages import generate, score

N_PAIRS = 12
FLOATS = ("cos_with", "cos_without", "s_with", "s_without", "delta")


@pytest.fixture(scope="module")
def score_inputs(synth, tmp_path_factory) -> tuple[Path, Path]:
    """The first pairs of the smoke world and their oracle rationales (K=2), one of them
    marked failed so its 'skipped' row must survive the trip through the actors."""
    root = tmp_path_factory.mktemp("ray_score")
    pairs = io.read(synth["pairs"], PAIRS).to_pylist()[:N_PAIRS]
    io.write(pairs, root / "pairs", PAIRS)
    g = generate.run(GenerateConfig(pairs=str(root / "pairs"), out=str(root / "gen"),
                                    image_root=str(synth["image_root"]),
                                    teachers=[{"id": "oracle", "backend": "oracle", "k": 2}]))
    rats = io.read(g.outputs["rationales"].uri, RATIONALES).to_pylist()
    rats[3] = {**rats[3], "status": "error", "error": "teacher failed (test)"}
    io.write(rats, root / "rationales", RATIONALES)
    return root / "pairs", root / "rationales"


def test_two_ray_actors_give_the_in_process_scores(local_ray, tiny_model, synth,
                                                   score_inputs, tmp_path):
    pairs, rats = score_inputs
    base = {"pairs": str(pairs), "rationales": str(rats), "model": str(tiny_model),
            "image_root": str(synth["image_root"]), "shard_size": 4, "progress": False,
            "torch_threads": 1}
    here = score.run(ScoreConfig(**base, out=str(tmp_path / "here")))
    ray = score.run(ScoreConfig(**base, out=str(tmp_path / "ray"),
                                distributed={"backend": "ray", "actors": 2}))
    a = io.read(here.outputs["scores"].uri, SCORES).to_pylist()
    b = io.read(ray.outputs["scores"].uri, SCORES).to_pylist()
    assert len(a) == N_PAIRS * 2 and len(b) == len(a)
    for ra, rb in zip(a, b, strict=True):
        assert {k: v for k, v in ra.items() if k not in FLOATS} == \
            {k: v for k, v in rb.items() if k not in FLOATS}  # keys, ranks, statuses
        for k in FLOATS:
            if ra[k] is None:
                assert rb[k] is None
            else:
                np.testing.assert_allclose(rb[k], ra[k], rtol=1e-4, atol=1e-5)
    assert sum(r["status"] == "skipped" for r in b) == 1
    # the embedding pass ran on the actors (the scoring math after it is this process's)
    run = json.loads((tmp_path / "ray" / "vectors" / RUN_FILE).read_text())
    assert run["backend"] == "ray" and run["actors"] == 2
    vec_a = io.read(tmp_path / "here" / "vectors", VECTORS)
    vec_b = io.read(tmp_path / "ray" / "vectors", VECTORS)
    assert vec_b.column("key").to_pylist() == vec_a.column("key").to_pylist()
    np.testing.assert_allclose(matrix(vec_b.column("vector")), matrix(vec_a.column("vector")),
                               rtol=1e-4, atol=1e-5)
