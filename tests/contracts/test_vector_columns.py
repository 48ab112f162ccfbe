"""data_contracts.vectors: fixed-size lists round-trip as zero-copy views; list columns of
unequal rows are refused with the row named (a total-count check alone would let
[H values, [], H values] through with the wrong H)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_contracts.vectors import matrix, vector_array


def test_fixed_size_round_trip_is_a_view(tmp_path):
    v = np.arange(12, dtype=np.float32).reshape(4, 3)
    col = vector_array(v)
    assert np.shares_memory(matrix(col), v)
    pq.write_table(pa.table({"e": col}), tmp_path / "x.parquet")
    back = matrix(pq.read_table(tmp_path / "x.parquet")["e"])
    assert back.shape == (4, 3) and np.array_equal(back, v)
    half = matrix(vector_array(v, "float16"), np.float32)
    assert half.dtype == np.float32 and np.array_equal(half, v)  # small ints are exact in fp16


def test_list_column_reads_and_unequal_rows_name_the_row():
    assert matrix(pa.array([[1.0, 2.0], [3.0, 4.0]])).tolist() == [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match=r"row 1 holds 0 values, row 0 holds 2"):
        matrix(pa.array([[1.0, 2.0], [], [3.0, 4.0]]))
