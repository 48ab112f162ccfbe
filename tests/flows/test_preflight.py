"""The preflight: every problem a config has, found in seconds before any stage, in one
message (mmemb/preflight.py). Nothing here asserts on timings; the CLI test prints its
wall time (``-s``) and records it as a test property."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from mmemb.configs.pipeline import STAGES, PipelineConfig
from mmemb.preflight import PreflightError, Problem, preflight

ROOT = Path(__file__).resolve().parents[2]
ORACLE = {"id": "oracle", "backend": "oracle", "k": 2}


def existing(tmp_path: Path, model, synth, *, stages=("prepare",), **prepare) -> dict:
    """A pipeline config (as a dict) on a real checkpoint and the smoke pairs."""
    prep = {"source": "existing", "model": str(model), "pairs": str(synth["pairs"]),
            "image_root": str(synth["image_root"]), "prepare_base": False, **prepare}
    return {"run": {"name": "t", "run_dir": str(tmp_path / "run"), "stages": list(stages),
                    "tracking": {"enabled": False}},
            "prepare": prep, "generate": {"teachers": [ORACLE]}, "score": {}}


def problems_of(data: dict, stages=None) -> list[Problem]:
    cfg = PipelineConfig.from_dict(data)
    return preflight(cfg, stages or cfg.run.stages)


# --------------------------------------------------------------------------- the CLI


def test_run_refuses_before_stage_1_naming_every_problem(real_layout, synth, tmp_path,
                                                        record_property):
    """The issue's case: a real-layout base without <emb>, no prepare stage to add it, and
    an image root that does not exist: one refusal with both, exit 2, nothing written."""
    base = real_layout("qwen2_vl")
    run_dir = tmp_path / "run"
    data = existing(tmp_path, base, synth, stages=("generate", "score"),
                    image_root=str(tmp_path / "no-such-images"))
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump(data))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(cfg), "--run-dir",
                          str(run_dir)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    record_property("preflight_refusal_wall_s", round(wall, 1))
    print(f"\nmmemb run -> preflight refusal: {wall:.1f}s wall (process start included)")
    assert out.returncode == 2, out.stdout + out.stderr
    err = out.stderr
    assert "Traceback" not in err and "Traceback" not in out.stdout, err
    assert "preflight found 2 problems; no stage was started" in err, err
    assert re.search(r"^  1\. ", err, re.M) and re.search(r"^  2\. ", err, re.M), err
    assert "lacks ['<think>', '</think>', '<emb>']" in err and str(base) in err
    assert "prepare.prepare_base: true" in err  # the fix names the key
    assert str(tmp_path / "no-such-images") in err and "set prepare.image_root" in err
    assert "[generate]" not in out.stdout  # no stage started
    made = [p.name for p in run_dir.iterdir()] if run_dir.exists() else []
    assert not set(made) & {*STAGES, "data", "base_model"}, made


def test_skip_preflight_goes_straight_to_the_pipeline(tmp_path, monkeypatch, capsys):
    import flows.pipeline
    from flows.cli import main

    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"run_dir": str(tmp_path / "run"),
                                           "stages": ["prepare"]},
                                   "prepare": {"source": "existing",
                                               "model": str(tmp_path / "nope"),
                                               "pairs": str(tmp_path / "nope.parquet")}}))
    called = []
    monkeypatch.setattr(flows.pipeline, "pipeline",
                        lambda *a, **k: called.append(k) or {"summary": "stub"})
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "preflight found 2 problems" in err and not called
    assert main(["run", str(cfg), "--skip-preflight"]) == 0
    assert len(called) == 1 and "stub" in capsys.readouterr().out
    # a clean config: the preflight says so, then the pipeline starts
    assert main(["run", str(ROOT / "configs" / "demo.yaml"), "--run-dir",
                 str(tmp_path / "demo")]) == 0
    assert len(called) == 2
    assert "[preflight] prepare -> generate -> score -> select -> train -> gate -> evaluate: ok" \
        in capsys.readouterr().out


# --------------------------------------------------------------------------- preflight()


def test_demo_config_is_clean(tmp_path):
    from flows.pipeline import plan

    cfg = PipelineConfig.load(ROOT / "configs" / "demo.yaml", run_dir=str(tmp_path / "run"))
    assert preflight(cfg, [s for s, _ in plan(cfg)]) == []
    assert not (tmp_path / "run").exists()  # probes leave nothing behind


def test_missing_model_folder(synth, tmp_path):
    ps = problems_of(existing(tmp_path, tmp_path / "no-model", synth))
    assert len(ps) == 1 and ps[0].stage == "prepare"
    assert f"model {tmp_path / 'no-model'} (prepare.model): does not exist" in ps[0].what
    assert "set prepare.model" in ps[0].fix


def test_a_missing_student_base_names_the_stage_that_writes_it(tiny_model, synth, tmp_path):
    """prepare_base without the prepare stage: <run_dir>/base_model was never written."""
    data = existing(tmp_path, tiny_model, synth, stages=("score",), prepare_base=True)
    ps = problems_of(data)
    assert any("base_model" in p.what and "does not exist" in p.what
               and "run the prepare stage first" in p.fix for p in ps), ps


def test_hub_id_not_in_the_local_cache(synth, tmp_path):
    ps = problems_of(existing(tmp_path, "acme-nonexistent/model-x", synth))
    assert len(ps) == 1 and "not in the local Hugging Face cache" in ps[0].what, ps


def test_teacher_budget_too_small_says_the_numbers(real_layout, synth, tmp_path):
    from mmemb.model.resolution import Grid, image_tokens

    base = real_layout("qwen2_vl")
    data = existing(tmp_path, base, synth, stages=("generate",))
    data["generate"] = {"teachers": [{"id": "big", "backend": "vllm", "model": str(base),
                                      "max_model_len": 256}]}
    ps = problems_of(data)
    assert len(ps) == 1 and ps[0].stage == "generate", ps
    what, fix = ps[0].what, ps[0].fix
    m = re.search(r"needs up to (\d+) tokens \((\d+) for one image at .*?(\d+) of template "
                  r"text, 96 of sampling.max_tokens\) but generate.teachers\[0\].max_model_len "
                  r"is 256", what)
    assert m, what
    need, img, text = map(int, m.groups())
    assert need == img + text + 96 > 256 and 0 < text < 200
    assert f"raise generate.teachers[0].max_model_len to {need} or more" in fix
    px = int(re.search(r"max_pixels.*? to (\d+) or less", fix).group(1))  # the other fix
    grid = Grid.of(base)
    side = int(px ** 0.5)
    assert image_tokens(side, side, grid, px) + text + 96 <= 256
    # the same teacher with room for the worst case: no problem
    data["generate"]["teachers"][0]["max_model_len"] = need
    assert problems_of(data) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_unwritable_out_dir(synth, tiny_model, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("this user writes into a 0o500 folder (root)")
        data = existing(tmp_path, tiny_model, synth, stages=("prepare", "generate"))
        data["generate"]["out"] = str(ro / "generate")
        ps = problems_of(data)
        assert len(ps) == 1 and ps[0].stage == "generate", ps
        assert "generate.out" in ps[0].what and str(ro) in ps[0].fix
    finally:
        ro.chmod(0o700)


def test_out_dir_under_a_file_and_a_failing_probe(synth, tiny_model, tmp_path, monkeypatch):
    """As root permission bits do not stop a write: a file in the way still does, and a
    probe that fails (a read-only mount, a full quota) is reported the same way."""
    (tmp_path / "afile").write_text("x")
    data = existing(tmp_path, tiny_model, synth, stages=("prepare", "generate"))
    data["generate"]["out"] = str(tmp_path / "afile" / "generate")
    ps = problems_of(data)
    assert len(ps) == 1 and "generate.out" in ps[0].what and "is a file" in ps[0].what, ps

    import tempfile

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    data["generate"].pop("out")
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    ps = problems_of(data)
    assert len(ps) == 1 and "run.run_dir" in ps[0].what and "generate.out" in ps[0].what
    assert "Permission denied" in ps[0].what and "--run-dir" in ps[0].fix


def test_pairs_file_missing_a_column(synth, tiny_model, tmp_path):
    from data_contracts import io
    from data_contracts.schemas import PAIRS

    bad = tmp_path / "pairs.parquet"
    pq.write_table(io.read(synth["pairs"], PAIRS).drop_columns(["meta"]), bad)
    ps = problems_of(existing(tmp_path, tiny_model, synth, pairs=str(bad)))
    assert len(ps) == 1, ps
    assert "missing column(s) ['meta']" in ps[0].what and "prepare.pairs" in ps[0].what
    assert "prepare.pairs" in ps[0].fix
    # an artifact of another contract
    ps = problems_of(existing(tmp_path, tiny_model, synth, pairs=str(synth["eval"])))
    assert len(ps) == 1 and "holds contract 'eval_rows', expected 'pairs'" in ps[0].what


def test_prepare_writing_the_base_makes_missing_tokens_fine(real_layout, synth, tmp_path):
    """With prepare_base the run's prepare stage adds the tokens: no problem; without the
    stage, the same base is refused (stages named, one problem for both)."""
    base = real_layout("qwen2_vl")
    data = existing(tmp_path, base, synth, stages=("prepare", "generate", "score"),
                    prepare_base=True)
    assert problems_of(data) == []
    data["prepare"]["prepare_base"] = False
    ps = problems_of(data)
    assert len(ps) == 1 and "lacks ['<think>', '</think>', '<emb>']" in ps[0].what, ps
    assert "score.model" in ps[0].fix


def test_error_lists_every_problem_numbered():
    e = PreflightError([Problem("prepare", "a is wrong", "set prepare.a"),
                        Problem("train", "b is wrong", "set train.b")])
    text = str(e)
    assert "2 problems" in text and "  1. [prepare] a is wrong" in text
    assert "  2. [train] b is wrong\n     fix: set train.b" in text
