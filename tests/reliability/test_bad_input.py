"""Bad and unusual input: a clear error or a defined, documented handling; never a crash
deep in a stack trace, never lost rows. (The fault suite, kill-and-rerun, is tests/faults.)"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from data_contracts import io
from data_contracts.io import ContractError
from data_contracts.schemas import PAIRS
from mmemb.model.embedder import Embedder, load_image
from mmemb.model.prompts import EmbedInput


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("odd")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(d / "cmyk.jpg")
    Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(d / "sixteen.png")
    pal = Image.new("P", (20, 20), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.info["transparency"] = 0
    pal.save(d / "palette.png", transparency=0)
    Image.new("RGB", (1, 1), (255, 0, 0)).save(d / "one.png")
    Image.new("RGB", (10000, 10000), (0, 0, 255)).save(d / "huge.png")
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], loop=0)
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return d


@pytest.mark.parametrize("name", ["cmyk.jpg", "sixteen.png", "palette.png", "one.png",
                                  "huge.png", "anim.gif"])
def test_unusual_images_become_rgb_under_the_pixel_budget(odd_images, name):
    img = load_image(odd_images / name, max_pixels=512 * 512)
    assert img.mode == "RGB"
    assert img.width * img.height <= 512 * 512 and min(img.size) >= 2


def test_unusual_images_embed(tiny_model, odd_images):
    emb = Embedder.from_pretrained(tiny_model, max_pixels=128 * 128)
    xs = [EmbedInput(text="x", images=[str(odd_images / n)])
          for n in ("cmyk.jpg", "sixteen.png", "palette.png", "one.png", "huge.png",
                    "anim.gif")]
    e = emb.encode(xs, batch_size=3).embeddings
    assert torch.isfinite(e).all() and e.shape[0] == 6


def test_corrupt_image_names_the_file(odd_images):
    with pytest.raises(ValueError, match=r"corrupt.png.*cannot be read.*fix or remove"):
        load_image(odd_images / "corrupt.png")


def test_empty_and_huge_texts(tiny_model):
    emb = Embedder.from_pretrained(tiny_model, max_text_tokens=64)
    out = emb.encode([EmbedInput(text=""), EmbedInput(text="red circle " * 50_000)])
    assert torch.isfinite(out.embeddings).all()
    assert out.n_tokens[1] < 64 + 40  # clipped text + the chat markup


def test_non_utf8_bytes_column_is_refused_with_its_name(tmp_path):
    rows = [{"pair_id": "p0", "dataset": "d", "family": None, "qry_inst": "",
             "qry_text": "q", "qry_img_path": "", "pos_inst": "", "pos_text": "t",
             "pos_img_path": "", "neg_text": [], "neg_img_path": [], "meta": None}]
    t = pa.Table.from_pylist(rows, schema=PAIRS.schema)
    t = t.set_column(t.schema.get_field_index("qry_text"), "qry_text",
                     pa.array([b"\xff\xfe bad"], pa.binary()))
    pq.write_table(t, tmp_path / "bytes.parquet")
    with pytest.raises(ContractError, match=r"bytes.parquet, column 'qry_text'.*binary"):
        io.read(tmp_path / "bytes.parquet", PAIRS)


# --------------------------------------------------------------------------- property test
_ids = st.text(min_size=0, max_size=4)
_row = st.fixed_dictionaries({
    "pair_id": st.one_of(st.none(), _ids), "dataset": st.sampled_from(["d", "", " "]),
    "neg_len": st.integers(0, 2), "img_len": st.integers(0, 2)})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.lists(_row, min_size=1, max_size=6))
def test_validator_accepts_exactly_the_valid_tables(tmp_path, rows):
    """Property: ``io.write`` succeeds iff every rule holds; otherwise the error names the
    first broken row, and nothing is written."""
    table_rows = [{"pair_id": r["pair_id"], "dataset": r["dataset"], "family": None,
                   "qry_inst": "", "qry_text": "", "qry_img_path": "", "pos_inst": "",
                   "pos_text": "", "pos_img_path": "", "neg_text": ["n"] * r["neg_len"],
                   "neg_img_path": [""] * r["img_len"], "meta": None} for r in rows]
    bad_rows = set()
    seen = set()
    for i, r in enumerate(rows):
        if r["pair_id"] is None or not r["pair_id"].strip() or not r["dataset"].strip() \
                or r["neg_len"] != r["img_len"] or r["pair_id"] in seen:
            bad_rows.add(i)
        if r["pair_id"] is not None:
            seen.add(r["pair_id"])
    schema = PAIRS.schema.set(0, pa.field("pair_id", pa.string(), nullable=True))
    out = tmp_path / f"a{abs(hash(str(rows)))}"
    table = pa.Table.from_pylist(table_rows, schema=schema)
    if not bad_rows:
        assert io.write(table, out, PAIRS).rows == len(rows)
        assert io.read(out, PAIRS).num_rows == len(rows)
    else:
        with pytest.raises(ContractError) as e:
            io.write(table, out, PAIRS)
        assert e.value.row is not None and e.value.row in bad_rows
        assert not out.exists()
