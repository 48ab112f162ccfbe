"""mmemb.tables: the preview tables the tracking UI shows are valid split-layout JSON with
scalar cells, whatever the stage puts in them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mmemb.tables import MAX_TEXT, SUFFIX, cell, write_table


def test_cells_are_json_scalars_and_text_is_cut():
    long = "word " * 200
    assert cell(None) is None and cell(True) is True and cell(3) == 3
    assert cell(np.float32(0.5)) == 0.5 and isinstance(cell(np.int64(7)), int)
    assert cell(math.nan) is None and cell(float("inf")) is None
    got = cell(long)
    assert len(got) == MAX_TEXT and got.endswith("…") and "\n" not in cell("a\nb")
    assert cell(list(range(8))) == "[0, 1, 2, 3, 4] (+3 more)"
    assert cell(np.array([1.5, 2.5])) == "[1.5, 2.5]"
    assert cell({"b": 1, "a": [1]}) == '{"a": [1], "b": 1}'


def test_write_table_split_layout_in_column_order(tmp_path):
    rows = [{"b": 1, "a": "x", "extra": "dropped"}, {"a": None}]
    path = write_table(tmp_path / f"t{SUFFIX}", rows, ["a", "b"])
    assert json.loads(path.read_text()) == {"columns": ["a", "b"],
                                            "data": [["x", 1], [None, None]]}
    with pytest.raises(ValueError, match=r"\.table\.json"):
        write_table(tmp_path / "t.json", rows, ["a"])
