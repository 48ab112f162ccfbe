"""The evaluate stage threads ``protocol`` to the loader and the scorer and records the
provenance of each number (issue 15), with the real tiny embedder on an official-layout
fixture root."""

from __future__ import annotations

import json
from pathlib import Path

from data_contracts import io
from data_contracts.schemas import EVAL_ROWS
from mmemb.configs.evaluate import EvaluateConfig
from mmemb.data.mmeb import load_mmeb_eval
from mmemb.stages.evaluate import main, run

REPO = Path(__file__).resolve().parents[2]


def _layout():
    """The MMEB layout writers (tests/data/fixtures/mmeb_layout.py)."""
    import mmeb_layout

    return mmeb_layout


def test_stage_protocol_provenance_and_partial_headline(tiny_model, tmp_path, capsys):
    root = _layout().write_mmeb_v2(tmp_path / "mmeb-v2")
    outs = {}
    for protocol in ("official", "strict"):
        cfg = EvaluateConfig(model=str(tiny_model), eval=str(root), modes=["direct"],
                             out=str(tmp_path / protocol), tasks=["N24News", "MSCOCO_t2i"],
                             protocol=protocol, cache_dir=str(tmp_path / "cache"))
        outs[protocol] = run(cfg)
    res = outs["official"]
    rows = io.read(tmp_path / "official" / "data" / "eval_rows", EVAL_ROWS).to_pylist()
    assert {r["tgt_inst"] for r in rows if r["task"] == "N24News"} == {""}  # loader: official
    prov = json.loads(res.files["provenance"].read_text())
    want = load_mmeb_eval(root, ["N24News", "MSCOCO_t2i"], log=lambda _m: None).digests
    assert prov["protocol"] == "official"
    assert {p["task"]: p["data_digest"] for p in prov["tasks"]} == want
    assert {p["data_digest_of"] for p in prov["tasks"]} == {"source files"}
    assert "direct.overall" not in res.metrics and "partial 2/78" in res.summary
    md = res.files["report"].read_text().splitlines()
    assert md[2].startswith("**partial: 2/78** — missing: ImageNet-1K, ")
    strict_prov = json.loads(outs["strict"].files["provenance"].read_text())
    assert {p["protocol"] for p in strict_prov["tasks"]} == {"strict"}
    assert (tmp_path / "official" / "official" / "direct" / "image" /
            "N24News_score.json").is_file()
    # the CLI flag reaches the config
    capsys.readouterr()
    main(["--model", str(tiny_model), "--eval", str(tmp_path / "strict" / "data" /
                                                    "eval_rows"),
          "--out", str(tmp_path / "cli"), "--modes", "direct", "--protocol", "strict",
          "--image-root", str(root), "--cache-dir", str(tmp_path / "cache")])
    cli = json.loads((tmp_path / "cli" / "provenance.json").read_text())
    assert cli["protocol"] == "strict"
    # rows given as an artifact: the digests written beside them by the MMEB load are used
    assert {p["task"]: p["data_digest"] for p in cli["tasks"]} == want
