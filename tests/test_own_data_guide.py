"""Issue 13, item 20: the documented commands work. The MMEB conversion commands in the
docs and configs, the own-data guide (its script, its tables, its commands), `mmemb config`
without an eval set, `mmemb embed` on the project's own eval artifact, docs/method.md."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import mmeb_layout as layout  # tests/data/fixtures, on the path (tests/conftest.py)
import pytest
import yaml

from data_contracts import io
from data_contracts.schemas import EMBEDDINGS, EVAL_ROWS, PAIRS

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "own-data.md"


def _documented_mmeb_commands() -> list[tuple[str, str]]:
    out = []
    for f in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
              *sorted((ROOT / "configs").glob("*.yaml"))]:
        for m in re.finditer(r"python -m mmemb\.data\.mmeb (train|eval)[^`\n]*", f.read_text()):
            if " --" in m.group(0):  # a command, not a mention of the program
                out.append((f.name, m.group(0).strip().rstrip(".")))
    return out


def test_every_documented_mmeb_command_runs(tmp_path):
    """Each `python -m mmemb.data.mmeb ...` line of README, docs/ and configs/, with its
    paths pointed at a miniature MMEB download, converts it (argument errors included)."""
    cmds = _documented_mmeb_commands()
    assert {c.split()[3] for _, c in cmds} == {"train", "eval"}
    train_src = layout.write_mmeb_train(tmp_path / "MMEB-train")
    eval_root = layout.write_mmeb_v2(tmp_path / "mmeb-v2")
    for i, (where, cmd) in enumerate(cmds):
        argv = shlex.split(cmd)[3:]
        for flag, value in (("--src", train_src), ("--root", eval_root),
                            ("--out", tmp_path / f"out{i}")):
            if flag in argv:
                argv[argv.index(flag) + 1] = str(value)
        if "--tasks" in argv:  # the miniature holds a few tasks; keep the documented form
            argv[argv.index("--tasks") + 1] = "N24News"
        p = subprocess.run([sys.executable, "-m", "mmemb.data.mmeb", *argv], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"{where}: {cmd}\n{p.stderr[-2000:]}"
        out = tmp_path / f"out{i}"
        if argv[0] == "train":
            assert io.read(out, PAIRS).num_rows > 0, (where, cmd)
        else:
            assert io.read(out / "eval_rows", EVAL_ROWS).num_rows > 0, (where, cmd)


# --------------------------------------------------------------------------- the guide

def _guide_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", GUIDE.read_text(), re.S)


def test_guide_lists_every_contract_column():
    text = GUIDE.read_text()
    for contract in (PAIRS, EVAL_ROWS):
        for col in contract.columns:
            assert f"`{col}`" in text, (contract.name, col)


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    """The guide's script, run as written in a fresh folder."""
    where = tmp_path_factory.mktemp("own")
    (script,) = _guide_blocks("python")
    (where / "write_own_data.py").write_text(script)
    p = subprocess.run([sys.executable, "write_own_data.py"], cwd=where, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    return where


def test_guide_script_writes_valid_tables(own_data):
    root = own_data / "data" / "own"
    pairs = io.read(root / "pairs.parquet", PAIRS, check_paths=True, image_root=root)
    rows = io.read(root / "eval.parquet", EVAL_ROWS, check_paths=True, image_root=root)
    assert pairs.num_rows == 8 and rows.num_rows == 4
    assert rows.column("tgt_rel").to_pylist()[2] == [0.0, 0.0, 1.0, 0.0]


def test_guide_commands_check_and_prepare_the_data(own_data, tiny_model, capsys,
                                                   monkeypatch):
    """The guide's `mmemb config ... --stage prepare` and what `--stages prepare` runs."""
    from flows.cli import main
    from mmemb.configs.prepare import PrepareConfig
    from mmemb.stages import prepare

    bash = "\n".join(_guide_blocks("bash"))
    assert "python write_own_data.py" in bash
    cfg_cmd = next(ln for ln in bash.splitlines() if ln.startswith("mmemb config "))
    argv = [a.replace("/path/to/checkpoint", str(tiny_model)) for a in shlex.split(cfg_cmd)[1:]]
    cfg = own_data / "configs" / "own_data.yaml"
    cfg.parent.mkdir(exist_ok=True)
    cfg.write_text((ROOT / "configs" / "own_data.yaml").read_text())
    monkeypatch.chdir(own_data)
    assert main(argv) == 0
    section = yaml.safe_load(capsys.readouterr().out)
    assert section["pairs"] == "data/own/pairs.parquet" and section["model"] == str(tiny_model)
    res = prepare.run(PrepareConfig(**section))
    assert res.outputs["pairs"].rows == 8 and res.outputs["eval"].rows == 4
    run_cmds = [ln for ln in bash.splitlines() if ln.startswith("mmemb run ")]
    assert any("--stages prepare" in c for c in run_cmds)
    # the documented run without an eval set resolves (its --set/--stages as mmemb config)
    block = next(b for b in _guide_blocks("bash") if "prepare.eval=null" in b)
    no_eval = shlex.split(block.replace("\\\n", " "))
    sets = [no_eval[i + 1] for i, a in enumerate(no_eval) if a == "--set"]
    stages = no_eval[no_eval.index("--stages") + 1]
    sets = [x.replace("/path/to/checkpoint", str(tiny_model)) for x in sets]
    capsys.readouterr()  # drop what prepare printed
    assert main(["config", str(cfg), *sum((["--set", x] for x in sets), []),
                 "--set", f"run.stages=[{stages}]"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["evaluate"] is None and resolved["prepare"]["eval"] is None


def test_config_without_eval_data_suggests_run_stages(tmp_path, tiny_model, capsys):
    from flows.cli import main

    cfg = tmp_path / "noeval.yaml"
    data = yaml.safe_load((ROOT / "configs" / "own_data.yaml").read_text())
    data["prepare"].pop("eval")
    data["prepare"]["model"] = str(tiny_model)
    cfg.write_text(yaml.safe_dump(data))
    assert main(["config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "evaluate.eval: required key is missing" in err
    want = "prepare,generate,score,select,train,gate"
    assert f"--stages {want} --set evaluate=null" in err and "prepare.eval is not set" in err
    assert main(["config", str(cfg), "--set", f"run.stages=[{want}]", "--set",
                 "evaluate=null"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["evaluate"] is None


# --------------------------------------------------------------------------- mmemb embed

def test_embed_runs_on_the_projects_eval_artifact(tiny_model, synth, tmp_path, capsys):
    """The eval rows artifact keys rows by (task, row_id): ids repeat across tasks."""
    from flows.cli import main

    rows = io.read(synth["eval"], EVAL_ROWS)
    n = rows.num_rows
    assert len(set(rows.column("row_id").to_pylist())) < n  # the case that was refused
    out = tmp_path / "emb"
    # the command docs/evaluation.md shows, on this session's eval artifact and model
    doc = (ROOT / "docs" / "evaluation.md").read_text().replace("\\\n", " ")
    argv = shlex.split(re.search(r"mmemb embed --model runs/demo/gate/policy --input "
                                 r"runs/demo/data/eval[^\n]*", doc).group(0))[1:]
    for flag, value in (("--model", tiny_model), ("--input", synth["eval"]),
                        ("--image-root", synth["image_root"]), ("--output", out)):
        argv[argv.index(flag) + 1] = str(value)
    assert argv[argv.index("--mode") + 1] == "adaptive"
    assert main([*argv, "--budget", "4", "--batch-size", "32"]) == 0
    cap = capsys.readouterr()
    printed = json.loads(cap.out)
    t = io.read(out, EMBEDDINGS).to_pylist()
    assert len(t) == n and all(r["status"] == "ok" for r in t)
    assert [(r["task"], r["id"]) for r in t] == list(zip(rows.column("task").to_pylist(),
                                                         rows.column("row_id").to_pylist(),
                                                         strict=True))
    p = [r["p_think"] for r in t]
    assert all(0.0 <= x <= 1.0 for x in p)
    rep = printed["report"]
    assert rep["inputs"] == n and rep["reasoned"] == sum(r["reasoned"] for r in t)
    assert rep["reasoned"] == sum(x > 0.5 for x in p)  # the gate's default threshold
    assert rep["p_think_mean"] == pytest.approx(sum(p) / n, rel=1e-5)
    assert f"{n} inputs (adaptive): {rep['reasoned']} reasoned" in cap.err


def test_embed_still_refuses_duplicate_ids_within_a_task(tiny_model, tmp_path, capsys):
    from flows.cli import main

    src = tmp_path / "q.jsonl"
    src.write_text('{"id": "a", "task": "t", "text": "x"}\n{"id": "a", "task": "t", "text": "y"}\n'
                   '{"id": "a", "task": "u", "text": "z"}\n')
    assert main(["embed", "--model", str(tiny_model), "--input", str(src), "--output",
                 str(tmp_path / "e"), "--mode", "direct"]) == 2
    assert "id 'a' of task 't' appears twice (rows 0 and 1)" in capsys.readouterr().err


# --------------------------------------------------------------------------- docs/method.md

def test_docs_link_only_inside_the_repository():
    for f in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = f.read_text()
        # markdown links, and backticked relative file paths (how method.md named its source)
        for target in re.findall(r"\]\(([^)#\s]+)", text) + \
                re.findall(r"`(\.\./[^`\s]+\.md)`", text):
            if "://" in target:
                continue
            p = (f.parent / target).resolve()
            assert p.is_relative_to(ROOT) and p.exists(), f"{f.name}: {target}"


def test_method_md_describes_both_rollout_backends():
    from typing import get_args

    from mmemb.configs.gate import GateConfig

    row = next(ln for ln in (ROOT / "docs" / "method.md").read_text().splitlines()
               if ln.startswith("| rollouts |"))
    for backend in get_args(GateConfig.model_fields["rollout_backend"].annotation):
        assert f"`{backend}`" in row, backend
    assert "not done in this release" not in row
