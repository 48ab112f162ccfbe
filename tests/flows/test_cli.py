"""The ``mmemb`` command line: every option documented, embed, status, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flows.cli import build_parser, main


def _subparsers():
    p = build_parser()
    action = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


#: Every command's options (the parser is generated from a table; none may go missing).
OPTIONS = {
    "run": {"config", "--run-dir", "--from", "--only", "--force", "--stages", "--set",
            "--no-tracking", "--json", "--prefect-timeout", "--verify", "--skip-preflight"},
    "stage": {"name", "config", "--run-dir", "--force", "--set", "--parent-run-id",
              "--prefect-timeout", "--verify"},
    "eval": {"config", "--model", "--data", "--modes", "--out", "--run-dir", "--force", "--set",
             "--prefect-timeout"},
    "embed": {"--model", "--input", "--output", "--mode", "--batch-size", "--image-root",
              "--budget", "--threshold", "--vector-dtype"},
    "ui": {"--run-dir", "--host", "--port", "--backend-store-uri", "--workers", "--timeout"},
    "status": {"--run-dir", "--verify"},
    "config": {"config", "--stage", "--run-dir", "--set"},
    "sync": {"--run-dir", "--config", "--tracking-uri", "--experiment"},
}


def test_every_option_of_every_command_has_help():
    subs = _subparsers()
    assert set(subs) == set(OPTIONS)
    top = build_parser().format_help()
    for name, sp in subs.items():
        # a description of its own (a sentence, not the one-line help) and the usage
        # naming every option
        assert sp.description and len(sp.description) > 40, name
        assert sp.description.split(".")[0] not in top, name
        usage = sp.format_usage()
        opts = {(a.option_strings or [a.dest])[0] for a in sp._actions if a.dest != "help"}
        assert opts == OPTIONS[name], name
        for opt in opts:
            assert opt in usage or not opt.startswith("-"), (name, opt)
        for a in sp._actions:
            if a.dest == "help":
                continue
            assert a.help and len(a.help) > 8, f"mmemb {name}: option {a.dest} has no help"
    run = subs["run"]
    assert run.parse_args(["c.yaml", "--from", "train"]).from_stage == "train"
    with pytest.raises(SystemExit):  # --from and --only exclude each other
        run.parse_args(["c.yaml", "--from", "train", "--only", "gate"])


def test_console_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--help"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    for opt in ("--run-dir", "--from", "--only", "--force", "--set", "--stages"):
        assert opt in out


def test_run_refuses_a_bad_config_with_a_clear_message(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {run_dir: x, sed: 1}\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "run.sed" in err and "unknown key" in err
    with pytest.raises(SystemExit):
        main(["run", str(bad), "--from", "nonsense"])


def test_embed_direct_matches_the_embedder(tiny_model, tmp_path):
    import torch

    from data_contracts import io
    from data_contracts.schemas import EMBEDDINGS
    from mmemb.model.embedder import Embedder
    from mmemb.model.prompts import EmbedInput

    rows = [{"id": "a", "text": "2 red circles and 3 blue squares"},
            {"id": "b", "text": "a green triangle", "instruction": "Find the caption"}]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["embed", "--model", str(tiny_model), "--input", str(src), "--output",
                 str(tmp_path / "emb"), "--mode", "direct"]) == 0
    t = io.read(tmp_path / "emb", EMBEDDINGS).to_pylist()
    assert [r["id"] for r in t] == ["a", "b"]
    assert all(r["status"] == "ok" and r["mode"] == "direct" and not r["reasoned"] for r in t)
    got = torch.tensor([r["embedding"] for r in t])
    ref = Embedder.from_pretrained(tiny_model).encode(
        [EmbedInput(text=rows[0]["text"]), EmbedInput(text=rows[1]["text"],
                                                      instruction="Find the caption")]
    ).embeddings
    assert torch.allclose(got, ref, atol=1e-5)
    assert torch.allclose(got.norm(dim=1), torch.ones(2), atol=1e-5)
    # the vectors are one fixed-size-list column; float16 on request
    import pyarrow as pa

    from data_contracts.vectors import matrix

    assert io.read(tmp_path / "emb", EMBEDDINGS).schema.field("embedding").type == \
        pa.list_(pa.float32(), ref.shape[1])
    assert main(["embed", "--model", str(tiny_model), "--input", str(src), "--output",
                 str(tmp_path / "emb16"), "--mode", "direct", "--vector-dtype", "float16"]) == 0
    half = io.read(tmp_path / "emb16", EMBEDDINGS).column("embedding")
    assert half.type == pa.list_(pa.float16(), ref.shape[1])
    assert torch.allclose(torch.from_numpy(matrix(half, "float32")), ref, atol=2e-3)


def test_embed_adaptive_records_the_gate(tiny_model, synth, tmp_path):
    """Each row's reason/direct split is the gate's decision p(think) > threshold, at the
    threshold saved beside the model (mmemb_gate.json), and the budget given wins."""
    import shutil

    import pyarrow.parquet as pq

    from data_contracts import io
    from data_contracts.schemas import EMBEDDINGS, PAIRS
    from mmemb.inference import AdaptiveEncoder
    from mmemb.model.embedder import Embedder
    from mmemb.model.prompts import EmbedInput

    pairs = io.read(synth["pairs"], PAIRS)  # MMEB-style columns: qry_text, qry_img_path...
    pq.write_table(pairs.slice(0, 8), tmp_path / "q.parquet")
    # The gate's own p(think) on these inputs; a threshold between its middle values makes
    # the gate send some rows to reasoning and keep others direct.
    ref = AdaptiveEncoder(Embedder.from_pretrained(tiny_model))
    inputs = [EmbedInput.from_row(r["qry_inst"], r["qry_text"], r["qry_img_path"],
                                  synth["image_root"]) for r in pairs.slice(0, 8).to_pylist()]
    p_ref = ref.p_think(inputs).tolist()
    lo, hi = sorted(p_ref)[3:5]
    threshold = (lo + hi) / 2
    model = tmp_path / "policy"
    shutil.copytree(tiny_model, model)
    (model / "mmemb_gate.json").write_text(json.dumps({"threshold": threshold, "budget": 64}))
    assert main(["embed", "--model", str(model), "--input", str(tmp_path / "q.parquet"),
                 "--output", str(tmp_path / "emb"), "--mode", "adaptive", "--image-root",
                 str(synth["image_root"]), "--budget", "4"]) == 0
    t = io.read(tmp_path / "emb", EMBEDDINGS).to_pylist()
    assert len(t) == 8 and t[0]["id"] == "syn_cls_shape-00000"
    assert all(r["mode"] == "adaptive" and len(r["embedding"]) == 64 for r in t)
    for r in t:  # reasoning stays within the budget; a direct row generates nothing
        assert r["n_gen_tokens"] <= 4
        assert r["reasoned"] or (r["n_gen_tokens"] == 0 and r["rationale"] is None)
    assert [r["p_think"] for r in t] == pytest.approx(p_ref, abs=1e-5)
    assert [r["reasoned"] for r in t] == [p > threshold for p in p_ref]
    assert sum(r["reasoned"] for r in t) == 4  # the split: four reason, four direct
    assert all(r["n_gen_tokens"] > 0 for r in t if r["reasoned"])


def test_embed_bad_input_is_refused(tiny_model, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "ok"}\n{not json\n')
    assert main(["embed", "--model", str(tiny_model), "--input", str(src), "--output",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "line 2 is not JSON" in err and "in.jsonl" in err


def test_status_shows_cached_stages(pipeline_run, capsys):
    assert main(["status", "--run-dir", str(pipeline_run["run_dir"])]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("prepare"))
    assert " ok " in line and pipeline_run["out"]["stages"]["prepare"]["key"][:12] in line
    assert any(x.startswith("train") and x.split()[1] == "-" for x in out.splitlines())


def test_config_prints_the_wired_stage_section(capsys):
    import yaml

    from mmemb.configs.gate import GateConfig

    assert main(["config", "configs/demo.yaml", "--stage", "gate", "--run-dir", "R",
                 "--set", "gate.steps=3"]) == 0
    sec = yaml.safe_load(capsys.readouterr().out)
    assert sec["model"] == "R/train/student" and sec["data"] == "R/select/selections"
    assert sec["steps"] == 3
    assert GateConfig.from_dict(sec).out == "R/gate"  # a valid stage config as printed
