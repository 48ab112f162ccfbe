"""Stage 0 in its cluster form: real paths are checked and referenced, nothing is built."""

from __future__ import annotations

import hashlib

import pyarrow.parquet as pq
import pytest

from data_contracts import io
from data_contracts.io import ContractError
from data_contracts.schemas import PAIRS
from mmemb.configs.prepare import PrepareConfig
from mmemb.stages.prepare import run


def test_existing_source_references_without_building(tiny_model, synth, tmp_path):
    table = io.read(synth["pairs"], PAIRS)
    plain = tmp_path / "train.parquet"  # a user's plain Parquet file, not an artifact folder
    pq.write_table(table, plain)
    before = sorted(p.name for p in tiny_model.iterdir())
    res = run(PrepareConfig(source="existing", model=str(tiny_model), pairs=str(plain),
                            eval=str(synth["eval"]), image_root=str(synth["image_root"]),
                            prepare_base=False))
    assert res.outputs["pairs"].rows == 120
    assert res.outputs["pairs"].digest == hashlib.sha256(plain.read_bytes()).hexdigest()
    assert res.outputs["eval"] == io.ref(synth["eval"])  # the artifact's own manifest
    assert res.models == {"base": tiny_model}
    assert res.metrics["model_params"] > 1e5 and res.metrics["pairs_rows"] == 120.0
    assert sorted(p.name for p in tiny_model.iterdir()) == before  # nothing written


def test_existing_base_with_the_tokens_is_linked_not_copied(tiny_model, synth, tmp_path):
    out = tmp_path / "base_model"
    res = run(PrepareConfig(source="existing", model=str(tiny_model), pairs=str(synth["pairs"]),
                            model_out=str(out)))
    assert res.models == {"base": out} and res.metrics["base_tokens_added"] == 0
    links = [p for p in out.iterdir() if p.name != "mmemb_prepared.json"]
    assert links and all(p.is_symlink() and p.resolve().parent == tiny_model.resolve()
                         for p in links)


def test_existing_source_refuses_wrong_inputs(tiny_model, synth, tmp_path):
    with pytest.raises(ContractError, match="holds contract 'eval_rows', expected 'pairs'"):
        run(PrepareConfig(source="existing", model=str(tiny_model), pairs=str(synth["eval"])))
    with pytest.raises(ContractError, match="checkpoint folder does not exist"):
        run(PrepareConfig(source="existing", model=str(tmp_path / "nope"),
                          pairs=str(synth["pairs"])))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(ContractError, match="not a readable Parquet file"):
        run(PrepareConfig(source="existing", model=str(tiny_model), pairs=str(bad)))
