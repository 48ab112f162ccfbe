"""MMEB loaders under ``protocol="official"`` vs ``"strict"`` (issue 15), on fixture roots
written in the official layouts (``tests/data/fixtures/mmeb_layout.py``); one test per
data-shaping quirk of the official code, named after it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import mmeb_layout as layout  # tests/data/fixtures, on the path (tests/conftest.py)
import pytest

from mmemb.data.mmeb import (
    SOURCES,
    MMEBFormatError,
    MMEBMissingError,
    load_mmeb_eval,
    load_mmeb_train,
    load_task,
    media_files,
    video_cls_labels,
)
from mmemb.eval.tasks import get_task

#: sha256(json.dumps(list))[:16] of the official lists (TIGER-AI-Lab/VLM2Vec@6e1e1d4).
LABEL_DIGESTS = {"K700": ("2839eff58f87e65f", 700), "UCF101": ("51850b92bae45dea", 101),
                 "HMDB51": ("125ceba8311cb84a", 51), "Breakfast": ("dc57e4bfdc07271c", 10)}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return layout.write_mmeb_v2(tmp_path_factory.mktemp("mmeb-official") / "mmeb-v2")


def _quiet(_msg: str) -> None:
    pass


def test_official_label_lists_match_their_digests():
    for task, (digest, n) in LABEL_DIGESTS.items():
        labels = video_cls_labels(task)
        assert len(labels) == len(set(labels)) == n
        assert hashlib.sha256(json.dumps(labels).encode()).hexdigest()[:16] == digest


def test_official_k700_full_label_corpus(tmp_path):
    labels = video_cls_labels("K700")
    fr = tmp_path / "video-tasks" / "frames" / "video_cls" / "K700"
    rows = [{"video_id": f"v{k}", "pos_text": lb} for k, lb in
            enumerate([labels[5], labels[2], labels[5]])]
    for r in rows:
        layout.frames(fr / r["video_id"], 8)
    layout.to_parquet(rows, tmp_path / "video-tasks" / "Kinetics-700" / "data" /
                      "test-00000-of-00001.parquet")
    lines: list[str] = []
    _, official = load_task(tmp_path, "K700", protocol="official", log=lines.append)
    _, strict = load_task(tmp_path, "K700", protocol="strict")
    ids = [c["cand_id"] for c in official]
    assert len(ids) == len(set(ids)) == 700
    assert ids[:2] == [labels[5], labels[2]]  # test labels first, in row order
    assert ids[2:] == [lb for lb in labels if lb not in (labels[5], labels[2])]
    assert all(c["cand_inst"] == "" and c["cand_img_path"] == "" for c in official)
    assert [c["cand_id"] for c in strict] == [labels[5], labels[2]]
    assert lines == ["[mmeb] K700: corpus = 700 labels (official list) + 0 test-only labels"]


def test_official_ssv2_first_1000(tmp_path):
    rows = [{"video_id": f"v{k}", "pos_text": "b", "neg_text": ["a", "b", "c"]}
            for k in range(1001)]
    layout.to_parquet(rows, tmp_path / "video-tasks" / "SmthSmthV2" / "data" /
                      "test-00000-of-00001.parquet")
    off, _ = load_task(tmp_path, "SmthSmthV2", check_media=False, protocol="official",
                       log=_quiet)
    strict, _ = load_task(tmp_path, "SmthSmthV2", check_media=False, protocol="strict")
    assert len(off) == 1000 and len(strict) == 1001
    assert [r["row_id"] for r in off] == [r["row_id"] for r in strict[:1000]]  # file order
    # the dataset's candidate order, the label where it is
    assert off[0]["tgt_text"] == ["a", "b", "c"] and off[0]["tgt_rel"] == [0.0, 1.0, 0.0]
    assert strict[0]["tgt_text"] == ["b", "a", "c"]
    few, _ = load_task(tmp_path, "SmthSmthV2", check_media=False, protocol="official",
                       max_queries=3, log=_quiet)
    assert len(few) == 3


def test_official_moment_single_last_positive(root):
    vdir = root / SOURCES["QVHighlight"].frames / "qv_001"
    listed = [d for d in os.listdir(vdir) if (vdir / d).is_dir() and d != "query"]
    last = [d for d in listed if d.startswith("positive")][-1]
    lines: list[str] = []
    (off,), _ = load_task(root, "QVHighlight", protocol="official", log=lines.append)
    (strict,), _ = load_task(root, "QVHighlight", protocol="strict")
    assert [p.rsplit("/", 1)[1] for p in off["tgt_img_path"]] == listed  # listdir order
    assert [p.rsplit("/", 1)[1] for p, g in zip(off["tgt_img_path"], off["tgt_rel"],
                                                    strict=True)
            if g > 0] == [last]
    assert sum(strict["tgt_rel"]) == 2  # every positive* clip, positives first
    assert strict["tgt_rel"][:2] == [1.0, 1.0]
    assert lines == ["[mmeb] QVHighlight: 1 rows have several positive clips; official "
                     "scores only the last in directory order (filesystem-dependent)"]


def test_official_keeps_candidate_order(root):
    (off,), _ = load_task(root, "Video-MME", protocol="official")
    (strict,), _ = load_task(root, "Video-MME", protocol="strict")
    assert off["tgt_text"] == ["red", "blue", "green", "black"]
    assert off["tgt_rel"] == [0.0, 0.0, 1.0, 0.0]
    assert strict["tgt_text"] == ["green", "red", "blue", "black"]
    assert strict["tgt_rel"] == [1.0, 0.0, 0.0, 0.0]


def test_official_cls_candidates_without_tgt_inst(root):
    off, _ = load_task(root, "N24News", protocol="official")
    strict, _ = load_task(root, "N24News", protocol="strict")
    assert {r["tgt_inst"] for r in off} == {""}
    assert {r["tgt_inst"] for r in strict} == {"Represent the class label:"}
    # t2i keeps its target instruction (the official t2i parser reads it)
    t2i, _ = load_task(root, "MSCOCO_t2i", protocol="official")
    assert {r["tgt_inst"] for r in t2i} == {"<|image_1|> Represent the given image."}
    assert SOURCES["N24News"].image_parser == "cls"
    for name, src in SOURCES.items():
        if src.parser == "image":
            assert src.image_parser in ("cls", "qa", "i2t", "t2i", "i2i_vg"), name
            assert get_task(name).modality == "image"


def test_official_duplicate_candidate_name_is_relevant(tmp_path):
    it = tmp_path / "image-tasks"
    layout.png(it / "N24News" / "q.jpg")
    layout.to_parquet([
        {"qry_inst": "<|image_1|> cls:", "qry_text": "", "qry_img_path": "N24News/q.jpg",
         "tgt_inst": "Represent the class label:", "tgt_text": ["cat", "dog", "cat"],
         "tgt_img_path": ["", "", ""]}], it / "N24News" / "test-00000-of-00001.parquet")
    (off,), _ = load_task(tmp_path, "N24News", protocol="official")
    (strict,), _ = load_task(tmp_path, "N24News", protocol="strict")
    assert off["tgt_rel"] == [1.0, 0.0, 1.0]
    assert strict["tgt_rel"] == [1.0, 0.0, 0.0]


def test_official_momentseeker_clip_instruction(tmp_path):
    fr = tmp_path / SOURCES["MomentSeeker"].frames / "video_frames"
    for clip in ("vid_a_1", "vid_a_2"):
        layout.frames(fr / clip, 12)
    layout.to_parquet([{"query": "a goal", "input_frames": "",
                        "positive_frames": [{"output_path": "vid/a_1.mp4"}],
                        "negative_frames": [{"output_path": "vid/a_2.mp4"}]}],
                      tmp_path / "video-tasks" / "MomentSeeker" / "data" /
                      "test-00000-of-00001.parquet")
    (off,), _ = load_task(tmp_path, "MomentSeeker", protocol="official")
    (strict,), _ = load_task(tmp_path, "MomentSeeker", protocol="strict")
    assert off["tgt_inst"] == "Understand the content of the provided video clip."
    assert strict["tgt_inst"] == "Understand the content of the provided video."
    assert off["qry_inst"] == "Find the clip that corresponds to the given text:"
    assert off["tgt_rel"] == [1.0, 0.0]


def test_official_frames_no_padding(tmp_path):
    five = layout.frames(tmp_path / "five", 5)
    twelve = layout.frames(tmp_path / "twelve", 12)
    names = lambda fs: [Path(f).stem for f in fs]  # noqa: E731
    assert names(media_files(str(five), pad=False)) == [f"frame_{k:04d}" for k in range(1, 6)]
    assert names(media_files(str(five))) == [f"frame_{k:04d}" for k in (1, 1, 2, 2, 3, 3, 4, 5)]
    want = [f"frame_{k + 1:04d}" for k in (0, 1, 3, 4, 6, 7, 9, 11)]
    assert names(media_files(str(twelve), pad=False)) == names(media_files(str(twelve))) == want
    assert len(media_files(str(twelve), num_frames=None, pad=False)) == 12  # MomentSeeker
    # natural order: frame_2 before frame_10
    layout.png(tmp_path / "nat" / "frame_10.jpg")
    layout.png(tmp_path / "nat" / "frame_2.jpg")
    assert names(media_files(str(tmp_path / "nat"), num_frames=None)) == ["frame_2", "frame_10"]


def test_skip_missing_incomplete_task_one_line(root, tmp_path, capsys):
    import shutil

    part = tmp_path / "part"
    shutil.copytree(root / "image-tasks", part / "image-tasks")
    (part / "image-tasks" / "CIRR").mkdir()  # folder present, parquet absent
    lines: list[str] = []
    ev = load_mmeb_eval(part, ["CIRR", "N24News"], skip_missing=True, log=lines.append)
    assert ev.tasks == ["N24News"] and list(ev.missing) == ["CIRR"]
    assert "no 'test' split files" in ev.missing["CIRR"]
    assert len(lines) == 1 and lines[0].startswith("[evaluate] skip CIRR: missing ")
    assert str(part / "image-tasks" / "CIRR") in lines[0]
    with pytest.raises(MMEBMissingError, match="no 'test' split files"):
        load_mmeb_eval(part, ["CIRR", "N24News"])
    # a malformed file still fails with skip_missing
    layout.to_parquet([{"qry_text": "x", "qry_img_path": ""}],
                      part / "image-tasks" / "CIRR" / "test-00000-of-00001.parquet")
    with pytest.raises(MMEBFormatError, match="missing column") as err:
        load_mmeb_eval(part, ["CIRR", "N24News"], skip_missing=True, log=_quiet)
    assert not isinstance(err.value, MMEBMissingError)


def test_data_digest_per_task_changes_with_the_files(root, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root / "image-tasks", copy / "image-tasks")
    a = load_mmeb_eval(copy, ["N24News"], log=_quiet).digests["N24News"]
    assert a == load_mmeb_eval(copy, ["N24News"], log=_quiet).digests["N24News"]
    layout.to_parquet([{"qry_inst": "", "qry_text": "x", "qry_img_path": "",
                        "tgt_inst": "", "tgt_text": ["a"], "tgt_img_path": [""]}],
                      copy / "image-tasks" / "N24News" / "test-00000-of-00001.parquet")
    assert load_mmeb_eval(copy, ["N24News"], log=_quiet).digests["N24News"] != a


def test_mmeb_train_drops_empty_query_or_positive(tmp_path):
    rows = [("", "", "x", ""), ("<|image_1|>\nq", "images/a.jpg", "", ""), ("q", "", "p", ""),
            (" ", "", "p", "")]
    layout.to_parquet([{"qry": q, "qry_image_path": qi, "pos_text": p, "pos_image_path": pi,
                        "neg_text": "", "neg_image_path": ""} for q, qi, p, pi in rows],
                      tmp_path / "Sub" / "original-00000-of-00001.parquet")
    lines: list[str] = []
    off = load_mmeb_train(tmp_path, log=lines.append)
    assert off.column("pair_id").to_pylist() == ["Sub-original-0000002", "Sub-original-0000003"]
    assert lines == ["[mmeb-train] Sub: dropped 2 rows with an empty query or positive "
                     "(official rule)"]
    assert load_mmeb_train(tmp_path, protocol="strict").num_rows == 4


def test_official_global_corpus_rows_candidates_first(root, tmp_path):
    # ViDoRe fixture: query 10 -> docs 1, 2; query 11 -> doc 0; the corpus file order is 0..3
    _, off = load_task(root, "ViDoRe_arxivqa", protocol="official", image_cache=tmp_path)
    _, strict = load_task(root, "ViDoRe_arxivqa", protocol="strict", image_cache=tmp_path)
    assert [c["cand_id"] for c in off] == ["1", "2", "0", "3"]
    assert [c["cand_id"] for c in strict] == ["0", "1", "2", "3"]
