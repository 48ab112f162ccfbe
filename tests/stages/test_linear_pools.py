"""Negative pools in O(pool size) per pair (stage 2's build_pools, stage 5's _pools): well
formed, independent of order and sharding, uniform over the allowed members."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from mmemb.model.prompts import EmbedInput
from mmemb.pools import PoolIndex
from mmemb.stages import gate
from mmemb.stages.score import build_pools


def _pairs(n: int, datasets: int = 2, targets: int | None = None) -> list[dict]:
    """``n`` pairs over ``datasets`` datasets; pair i's positive is target ``i % targets``
    of its dataset (distinct per pair by default), with one hard negative."""
    targets = targets or n
    out = []
    for i in range(n):
        ds = f"d{i % datasets}"
        out.append({"pair_id": f"p{i:05d}", "dataset": ds, "pos_inst": "",
                    "pos_text": f"{ds} target {i % targets}", "pos_img_path": "",
                    "neg_text": [f"hard {i}"], "neg_img_path": [""]})
    return out


def test_pool_index_samples_distinct_allowed_members():
    idx = PoolIndex(["a", "b", "c", "d", "e", "a"])
    assert len(idx) == 5 and "a" in idx and "z" not in idx
    rng = random.Random(0)
    for n in range(0, 7):
        got = idx.sample(rng, n, exclude=["b", "z"])
        assert len(got) == min(n, 4) and len(set(got)) == len(got) and "b" not in got
    assert idx.sample(rng, 3, exclude=list("abcde")) == []
    big = PoolIndex(range(1000))  # the rejection path: few draws, none excluded
    got = big.sample(random.Random(1), 7, exclude=[0, 1, 2])
    assert len(set(got)) == 7 and not {0, 1, 2} & set(got)


@pytest.mark.parametrize("n", [5, 200])  # the whole-filter path (5) and rejection (200)
def test_pool_index_is_uniform(n):
    """Every allowed member is drawn about equally often, whichever path draws."""
    idx = PoolIndex(range(n))
    counts: Counter = Counter()
    rng = random.Random(7)
    k, trials = min(3, n - 1), 20000 if n == 5 else 4000
    for _ in range(trials):
        counts.update(idx.sample(rng, k, exclude=[0]))
    assert 0 not in counts and len(counts) == n - 1
    expected = trials * k / (n - 1)
    # binomial spread: 5 standard deviations around the expected count
    tol = 5 * (expected * (1 - k / (n - 1)) + 1) ** 0.5
    assert all(abs(c - expected) <= tol for c in counts.values()), counts.most_common(3)


def test_build_pools_well_formed_and_order_independent():
    pairs = _pairs(400)
    pools = build_pools(pairs, pool_size=6, seed=3)
    shuffled = pairs[:]
    random.Random(5).shuffle(shuffled)
    assert pools == build_pools(shuffled, pool_size=6, seed=3)  # any order, any shard
    assert pools != build_pools(pairs, pool_size=6, seed=4)
    for p in pairs:
        pool = pools[p["pair_id"]]
        pos = ("", p["pos_text"], "")
        assert pool[0] == pos and pos not in pool[1:]  # the positive once, first
        assert pool[1] == ("", p["neg_text"][0], "")  # the hard negative next
        assert len(pool) == 6 == len(set(pool))
        assert all(t[1].startswith(p["dataset"] + " ") for t in pool[2:])  # same dataset


def test_build_pools_small_datasets_and_duplicate_positives():
    """3 distinct targets per dataset, shared by many pairs: a pool holds what exists."""
    pairs = _pairs(60, datasets=2, targets=3)
    pools = build_pools(pairs, pool_size=8, seed=0, hard_negatives=False)
    for p in pairs:
        pool = pools[p["pair_id"]]
        members = {("", q["pos_text"], "") for q in pairs if q["dataset"] == p["dataset"]}
        assert set(pool) == members and pool[0] == ("", p["pos_text"], "")


def test_build_pools_in_batch_negatives_are_uniform():
    """Over many pairs, every other positive of the dataset is drawn about equally often."""
    pairs = _pairs(3000, datasets=1, targets=30)
    pools = build_pools(pairs, pool_size=4, seed=0, hard_negatives=False)
    counts = Counter(t for pool in pools.values() for t in pool[1:])
    assert len(counts) == 30
    expected = 3000 * 3 / 30
    assert max(counts.values()) < 1.25 * expected and min(counts.values()) > 0.75 * expected


def _queries(n: int) -> list[gate.Query]:
    return [gate.Query(f"p{i}", f"d{i % 2}", None, EmbedInput(text=f"q{i}"), f"pos {i}",
                       [f"neg {i}", ""]) for i in range(n)]


def test_gate_pools_linear_draw_keeps_its_semantics():
    qs = _queries(300)
    idx = list(range(0, 300, 7))
    a = gate._pools(qs, idx, 5, random.Random(11))
    assert a == gate._pools(qs, idx, 5, random.Random(11))  # the step's rng decides
    assert a != gate._pools(qs, idx, 5, random.Random(12))
    for i, pool in zip(idx, a, strict=True):
        q = qs[i]
        assert pool[:2] == [q.positive, f"neg {i}"] and len(pool) == 5 == len(set(pool))
        assert all(int(p.split()[1]) % 2 == i % 2 for p in pool[2:])  # the same task
    other = _queries(10)  # a new query list is indexed anew, not served the old index
    pool = gate._pools(other, [0], 8, random.Random(0))[0]
    assert set(pool) == {"pos 0", "neg 0", "pos 2", "pos 4", "pos 6", "pos 8"}
