"""Training data: contract-validated rows, content keys, the resumable epoch order."""

from __future__ import annotations

import pytest

from data_contracts.io import ContractError
from mmemb.model.prompts import EmbedInput
from mmemb.training.data import EpochSampler, content_key, load_rows


def test_selections_rows_keep_rationales_and_direct_rows(selections, synth):
    rows, contract = load_rows(selections, synth["image_root"])
    assert contract == "selections" and len(rows) == 120
    fam = {r.family for r in rows if r.rationale is not None}
    assert fam == {"inference"}  # easy rows: rationale null -> direct mode
    assert sum(r.rationale is not None for r in rows) == 72  # 3 inference tasks x 24
    r = next(r for r in rows if r.rationale)
    assert r.query.images and r.query.images[0].endswith(".png")
    assert len(r.negatives) == 1 and r.negatives[0].text


def test_pairs_fall_back_to_direct_only(synth):
    rows, contract = load_rows(synth["pairs"], synth["image_root"])
    assert contract == "pairs" and all(r.rationale is None for r in rows)


def test_missing_images_are_refused(synth, tmp_path):
    with pytest.raises(ContractError, match="image_root"):
        load_rows(synth["pairs"], tmp_path)  # wrong root: the image paths do not resolve


def test_content_key_equal_for_equal_inputs():
    a = EmbedInput(text="five shapes")
    assert content_key(a) == content_key(EmbedInput(text="five shapes"))
    assert content_key(a) != content_key(EmbedInput(text="six shapes"))
    assert content_key(a) != content_key(EmbedInput(text="five shapes", instruction="x"))
    assert 0 <= content_key(a) < 2**63


def test_epoch_order_is_a_function_of_step_and_covers_the_data():
    s = EpochSampler(n=10, global_batch=4, seed=3)
    assert s.steps_per_epoch == 2  # 2 rows dropped per epoch
    e0 = s.global_indices(0) + s.global_indices(1)
    assert len(set(e0)) == 8 and set(e0) <= set(range(10))
    again = EpochSampler(n=10, global_batch=4, seed=3)
    assert [again.global_indices(m) for m in (3, 0, 2)] == \
        [s.global_indices(m) for m in (3, 0, 2)]  # any order of access, same batches
    assert s.global_indices(2) != s.global_indices(0)  # a new permutation each epoch
    assert EpochSampler(n=10, global_batch=4, seed=4).global_indices(0) != s.global_indices(0)
    r0, r1 = s.indices(5, 0, 2), s.indices(5, 1, 2)
    assert r0 + r1 == s.global_indices(5) and not set(r0) & set(r1)


def test_dataset_smaller_than_a_global_batch_is_refused():
    with pytest.raises(ValueError, match=r"fewer than one global contrastive batch \(16"):
        EpochSampler(n=10, global_batch=16)
